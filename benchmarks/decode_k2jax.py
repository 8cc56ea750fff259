"""The k2jax side of benchmarks/decode.py, run by it in processes of its own (no torch here).

    python benchmarks/decode_k2jax.py --checkpoint DIR --part tokens --new 17
    python benchmarks/decode_k2jax.py --checkpoint DIR --part extras [--quick]

``tokens`` prints {batch: decode tokens/s} as JSON; ``extras`` prints the other rows of the
table ([name, value] pairs) and the context sweep. See benchmarks/decode.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from decode import MID, QUICK  # noqa: E402  (this folder: the model's shape, one definition)

import k2jax  # noqa: E402
from k2jax import model as k2model  # noqa: E402
from k2jax.model import expert_matmul, kv_cache  # noqa: E402
from k2jax.model.quant import DenseWeight, QuantizedWeight  # noqa: E402
from k2jax.serving import engine as k2engine  # noqa: E402
from k2jax.serving.loaded_model import Model  # noqa: E402
from k2jax.serving.page_allocator import pages_for  # noqa: E402
from k2jax.serving.sampling import BatchSampling, SamplingParams  # noqa: E402


def k2jax_decode_tps(model: Model, batch: int, context: int, new: int) -> float:
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.config.vocab_size, (batch, context)).tolist()
    ec = k2engine.EngineConfig(max_batch=batch, prefill_chunk=256)
    requests = [
        k2engine.Request(tuple(p), new, SamplingParams(temperature=0.0), stop_token_ids=())
        for p in prompts
    ]
    engine = k2engine.Engine(model.config, model.params, model.dtype, ec)
    for _ in engine.run(requests):  # compile every shape once
        pass
    count, start = 0, None
    for events in engine.run(requests):
        if start is None and len(events) == batch:  # every row has its first token
            start = time.perf_counter()
            continue
        if start is not None:
            count += len(events)
    return count / (time.perf_counter() - start)


def step_time(model: Model, batch: int, context: int, iters: int = 10) -> float:
    """Seconds per decode step of ``batch`` rows each at position ``context``."""
    cfg, page = model.config, 16
    width = k2engine._next_pow2(pages_for(context + 1, page))
    cache_dtype = jnp.float32 if model.dtype == jnp.float32 else jnp.bfloat16
    pages = kv_cache.empty_pages(
        cfg.num_layers, 1 + batch * width, page, cfg.cache_width, cache_dtype
    )
    tables = (1 + np.arange(batch * width, dtype=np.int32)).reshape(batch, width)
    seen = jnp.zeros((batch, cfg.vocab_size), jnp.int8)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pages, seen = jax.device_put((pages, seen), dev)
    args = (
        np.ones((batch, 1), np.int32),
        np.full((batch, 1), context, np.int32),
        tables,
        np.zeros(batch, np.int32),
        np.ones(batch, bool),
        np.zeros(batch, np.int32),
        BatchSampling.from_params([SamplingParams(temperature=0.0)] * batch),
    )
    step = k2engine._step_fn(cfg, model.dtype, True, None)
    params = k2engine.Engine(cfg, model.params, model.dtype).params  # the engine's own form
    times = []
    for i in range(iters + 2):
        t = time.perf_counter()
        pages, seen, tok = step(params, pages, seen, *args)  # tok: the packed step output
        tok.block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def experts_time(model: Model, batch: int, dtype, iters: int = 20, impl=None) -> float:
    """One MoE layer's routed experts at decode shapes, with the experts stored as ``dtype``
    (None = the checkpoint's packed INT4), through formulation ``impl`` (None = the default)."""
    cfg = model.config
    e = model.params["moe_layers"]["moe"]["experts"]
    ws = [
        QuantizedWeight(e[f"{n}_packed"][0], e[f"{n}_scale"][0], cfg.quantization.group_size)
        for n in ("gate", "up", "down")
    ]
    if dtype is not None:
        ws = [DenseWeight(w.dequantize().astype(dtype)) for w in ws]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, cfg.hidden_size)), jnp.float32)
    ids = jnp.asarray(
        np.stack(
            [
                rng.choice(cfg.n_routed_experts, cfg.num_experts_per_tok, replace=False)
                for _ in range(batch)
            ]
        ),
        jnp.int32,
    )
    w = jnp.full((batch, cfg.num_experts_per_tok), 0.3, jnp.float32)
    f = jax.jit(functools.partial(expert_matmul.routed_experts, impl=impl))
    f(x, ids, w, *ws).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        f(x, ids, w, *ws).block_until_ready()
    return (time.perf_counter() - t) / iters


def random_model(overrides: dict, experts: int) -> Model:
    import reference

    cfg = k2jax.Config.from_hf(
        reference.hf_config_dict(**{**overrides, "n_routed_experts": experts})
    )
    params = jax.jit(lambda k: k2model.init_params(cfg, k, jnp.float32))(jax.random.key(0))
    return Model(cfg, params, jnp.float32)


def extras(model: Model, quick: bool) -> dict:
    over = QUICK if quick else MID
    contexts = (1024, 8192) if quick else (1024, 8192, 32768)
    rows = [["device", f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores"]]
    for batch in (1, 8):
        int4 = experts_time(model, batch, None)
        int4_jnp = experts_time(model, batch, None, impl="words_tiled")
        bf16 = experts_time(model, batch, jnp.bfloat16)
        f32 = experts_time(model, batch, jnp.float32)
        rows.append(
            [
                f"routed experts of one layer, batch {batch}: "
                "INT4 (CPU kernel) / INT4 (jnp) / bf16 / f32 (ms)",
                f"{int4 * 1e3:.2f} / {int4_jnp * 1e3:.2f} / {bf16 * 1e3:.2f} / {f32 * 1e3:.2f}",
            ]
        )
    small, big = random_model(over, 32), random_model(over, 256)
    t32, t256 = step_time(small, 1, 512), step_time(big, 1, 512)
    rows.append(
        [
            "decode step, 32 vs 256 experts (top-8), batch 1, ctx 512 (ms)",
            f"{t32 * 1e3:.1f} vs {t256 * 1e3:.1f} ({t256 / t32:.2f}x)",
        ]
    )
    del small, big
    times = {c: step_time(model, 1, c) for c in contexts}
    rows += [[f"decode step at context {c} (ms)", f"{s * 1e3:.1f}"] for c, s in times.items()]
    return {"rows": rows, "contexts": {str(c): s for c, s in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--part", choices=("tokens", "extras"), required=True)
    ap.add_argument("--new", type=int, default=17, help="tokens generated per request")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    model = k2jax.load(args.checkpoint)  # dtype "auto": float32 dense weights on the CPU
    if args.part == "tokens":
        out = {str(b): k2jax_decode_tps(model, b, 512, args.new) for b in (1, 8)}
    else:
        out = extras(model, args.quick)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
