"""Decode speed of the k2jax engine on this machine, against transformers on the same weights.

    JAX_PLATFORMS=cpu python benchmarks/decode.py            # the full table (minutes)
    JAX_PLATFORMS=cpu python benchmarks/decode.py --quick    # smaller model, fewer steps

A mid-size K2-structured model (hidden 1024, 8 layers = 1 dense + 7 MoE, 64 experts top-8,
INT4 group-32 experts, MLA with K2's head dims, YaRN) is built once by tests/reference.py: the
transformers model (float32, experts dequantized, which is what a CPU user of it gets) and the
K2-format checkpoint that k2jax loads (experts stay packed INT4; dense weights float32, since
XLA's bf16 dot is ~20x slower than float32 on a CPU). Rows:

- decode tokens/s at batch 1 and 8, context 512: k2jax's engine vs transformers ``generate``;
  both count only tokens after the first (prefill excluded);
- routed experts of one layer at decode shapes: INT4 packed through the CPU kernel (the
  default, k2jax.int4_cpu) and through the jnp formulation (``words_tiled``), vs the same
  experts in bf16 and float32 (``k2jax.expert_matmul.routed_experts``, the model's entry point);
- decode step time with 32 vs 256 experts at top-8 (random weights, same everything else);
- decode step time at context 1K, 8K, 32K (batch 1; a synthetic filled cache, since the step's
  cost does not depend on the cached values).

Prints a markdown table; writes benchmarks/decode.png if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import k2jax  # noqa: E402
from k2jax import engine as k2engine  # noqa: E402
from k2jax import expert_matmul, kv_cache  # noqa: E402
from k2jax import model as k2model  # noqa: E402
from k2jax.loaded_model import Model  # noqa: E402
from k2jax.page_allocator import pages_for  # noqa: E402
from k2jax.quant import QuantizedWeight  # noqa: E402
from k2jax.sampling import BatchSampling, SamplingParams  # noqa: E402

MID = {
    "vocab_size": 32768,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 512,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 65536,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
}
QUICK = {
    **MID,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "vocab_size": 4096,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
}


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


def hf_decode_tps(torch_model, batch: int, context: int, new: int) -> float:
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, torch_model.config.vocab_size, (batch, context)))

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            torch_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t

    run(2)
    return batch * (new - 1) / (run(new) - run(1))


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
        pages, seen, tok, _ = step(params, pages, seen, *args)
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
        ws = [expert_matmul.dequantize_reference(w).astype(dtype) for w in ws]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, fewer steps")
    ap.add_argument("--new", type=int, default=17, help="tokens generated per request")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    import reference

    over = QUICK if args.quick else MID
    contexts = (1024, 8192) if args.quick else (1024, 8192, 32768)
    rows: list[tuple[str, str]] = []

    def add(name, value):
        rows.append((name, value))
        print(f"{name}: {value}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    ref = reference.build(seed=0, **over)
    with tempfile.TemporaryDirectory() as d:
        model = k2jax.load(reference.write_checkpoint(ref, d), dtype="float32")
    print(f"built the model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    add("device", f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores")
    for batch in (1, 8):
        ours = k2jax_decode_tps(model, batch, 512, args.new)
        add(f"k2jax decode tokens/s, batch {batch}, context 512", f"{ours:.1f}")
        if not args.skip_hf:
            theirs = hf_decode_tps(ref.torch_model, batch, 512, args.new)
            add(f"transformers decode tokens/s, batch {batch}, context 512", f"{theirs:.1f}")
            add(f"k2jax / transformers, batch {batch}", f"{ours / theirs:.2f}x")
    for batch in (1, 8):
        int4 = experts_time(model, batch, None)
        int4_jnp = experts_time(model, batch, None, impl="words_tiled")
        bf16 = experts_time(model, batch, jnp.bfloat16)
        f32 = experts_time(model, batch, jnp.float32)
        add(
            f"routed experts of one layer, batch {batch}: "
            "INT4 (CPU kernel) / INT4 (jnp) / bf16 / f32 (ms)",
            f"{int4 * 1e3:.2f} / {int4_jnp * 1e3:.2f} / {bf16 * 1e3:.2f} / {f32 * 1e3:.2f}",
        )
    del ref
    small, big = random_model(over, 32), random_model(over, 256)
    t32, t256 = step_time(small, 1, 512), step_time(big, 1, 512)
    add(
        "decode step, 32 vs 256 experts (top-8), batch 1, ctx 512 (ms)",
        f"{t32 * 1e3:.1f} vs {t256 * 1e3:.1f} ({t256 / t32:.2f}x)",
    )
    del small, big
    times = {c: step_time(model, 1, c) for c in contexts}
    for c, s in times.items():
        add(f"decode step at context {c} (ms)", f"{s * 1e3:.1f}")

    print("\n| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(times), [s * 1e3 for s in times.values()], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms), batch 1")
    ax.set_title("k2jax decode step vs context")
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode.png"), dpi=120)


if __name__ == "__main__":
    main()
