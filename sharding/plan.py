"""Size a K2 deployment on a slice without the slice: ``python -m sharding.plan``.

Builds the full model abstractly (``jax.eval_shape``: nothing is allocated), places it by the
rules table, then lowers and compiles the real decode step (``k2jax.model.forward`` over a
``PagedCache``, one new token per sequence, cache donated) ahead of time. With libtpu present and
``--topology`` given, the devices are those of the TPU slice
(``jax.experimental.topologies.get_topology_desc``) and the compiler is XLA:TPU; otherwise fake
CPU devices stand in and the output says so. Per device it reports the weight bytes (by the
rules' arithmetic, checked against the compiler's argument bytes), the KV-cache bytes, the
compiler's temporary bytes, their total against the chip's HBM, the bytes one decode step reads
and writes (the compiler's cost analysis over every layer, plus the routed experts' weight reads
inside the Pallas kernel, which that analysis cannot see, counted from the kernel's BlockSpecs),
and the HBM-bandwidth lower bound on step time.

Example::

    python -m sharding.plan --config ../shared/k2/kimi-k2-thinking.config.json \\
        --topology v5p-64 --mesh data=1,expert=32,tensor=1 --batch 8 --context 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from k2jax import cli_errors
from k2jax import model as k2model
from k2jax.model import kv_cache
from k2jax.model.config import Config
from k2jax.model.quant import expert_layout_for
from sharding import rules, topologies
from sharding.mesh import AXES, make_mesh, parse_mesh

GB = 1e9


def _devices(topology: topologies.Slice | None, count: int):
    """(devices, description): the TPU slice's when libtpu can describe it, else fake CPUs."""
    if topology is not None:
        try:
            desc = topologies.topology_desc(topology.topology)
            return list(desc.devices), f"XLA:TPU ({topology.topology}, libtpu, ahead of time)"
        except Exception as err:  # libtpu absent or the name unknown to it
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            fallback = f"fake CPU devices (TPU topology {topology.topology} unavailable: {reason})"
    else:
        fallback = "fake CPU devices (no --topology given)"
    cpus = jax.devices("cpu")
    if len(cpus) < count:
        raise RuntimeError(
            f"{count} CPU devices needed, {len(cpus)} present: run as `python -m sharding.plan` "
            "(it sets jax_num_cpu_devices before JAX starts) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        )
    return cpus[:count], fallback


def decode_step(cfg: Config, dtype, scan_layers: bool = True):
    """The decode step the engine runs: (params, tokens [B, 1], positions [B, 1], cache)."""

    def step(params, tokens_B1, positions_B1, cache):
        x_BTD, pages = k2model.forward(
            params, tokens_B1, positions_B1, cache, cfg=cfg, dtype=dtype, scan_layers=scan_layers
        )
        logits_BTV = k2model.lm_logits(params, x_BTD, cfg=cfg, dtype=dtype)
        return logits_BTV, pages

    return step


def plan(
    cfg: Config,
    mesh_sizes: dict[str, int] | None,
    *,
    batch: int = 1,
    context: int = 4096,
    page_size: int = 64,
    topology: str | None = None,
    strategy: str = "decode",
    dtype=jnp.bfloat16,
) -> dict:
    """Compile the decode step for ``mesh_sizes`` and return the per-device figures (bytes)."""
    slice_ = topologies.resolve(topology) if topology else None
    if mesh_sizes is None:
        if slice_ is None:
            raise ValueError("give a mesh, a topology or both")
        devices, compiler = _devices(slice_, slice_.chips)
        # Default: every device an expert shard, the layout decode wants.
        mesh_sizes = {"data": 1, "expert": len(devices), "tensor": 1}
    else:
        devices, compiler = _devices(slice_, math.prod(mesh_sizes[a] for a in AXES))
    count = math.prod(mesh_sizes[a] for a in AXES)
    if len(devices) != count:
        raise ValueError(
            f"--mesh {mesh_sizes} has {count} devices but {topology} has {len(devices)}"
        )
    mesh = make_mesh(**mesh_sizes, devices=devices)
    dtype = jnp.dtype(dtype)
    split = rules.param_bytes_per_device(cfg, mesh, dtype, strategy)
    shape = (batch, context, page_size)
    t0 = time.perf_counter()
    compiled, error, pool_shape, lower_s = _compile(cfg, mesh, dtype, strategy, shape, True)
    compile_s = time.perf_counter() - t0 - lower_s
    if compiled is not None:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        temp_bytes = int(mem.temp_size_in_bytes)
        args_out = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes)
    else:
        # No program, so no temporaries or costs to report: the compiler's message (what it
        # needed against what the chip has) goes out as compile_error instead.
        cost, temp_bytes, args_out = {}, 0, (0, 0, 0)
    weight_bytes = sum(per for _, per in split.values())
    total_weights = sum(tot for tot, _ in split.values())
    kv_bytes = math.prod(pool_shape) * dtype.itemsize
    # Arguments are weights + cache + tokens; the donated cache is aliased by the new pool.
    total_bytes = weight_bytes + kv_bytes + temp_bytes
    if slice_ is not None and compiler.startswith("XLA:TPU"):
        per_chip = len(devices) // slice_.chips
        hbm = slice_.chip.hbm_bytes // per_chip
        bandwidth = slice_.chip.hbm_bandwidth / per_chip
    elif slice_ is not None:
        hbm, bandwidth = slice_.chip.hbm_bytes, slice_.chip.hbm_bandwidth
    else:
        hbm, bandwidth = 0, 0.0
    scan_body_once = float(cost.get("bytes accessed", 0.0))
    xla_accessed, per_moe_layer = (
        _bytes_per_step(cfg, mesh, dtype, strategy, shape, scan_body_once)
        if compiled is not None
        else (0.0, 0.0)
    )
    kernel = _kernel_expert_bytes(cfg, mesh, batch) if compiled is not None else {}
    accessed = xla_accessed + kernel.get("busiest", 0.0)
    groups = _group_split(split)
    return {
        "compiler": compiler,
        "topology": topology,
        "devices": len(devices),
        "mesh": dict(mesh_sizes),
        "strategy": strategy,
        "batch": batch,
        "context": context,
        "page_size": page_size,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes": kv_bytes,
        "temp_bytes": temp_bytes,
        "total_bytes": total_bytes,
        "hbm_bytes": hbm,
        "fits": bool(hbm) and error is None and total_bytes <= hbm,
        "compile_error": error,
        "bytes_accessed": accessed,
        "bytes_accessed_xla": xla_accessed,
        "bytes_accessed_xla_per_moe_layer": per_moe_layer,
        "kernel_bytes": kernel.get("busiest", 0.0),
        "kernel_bytes_mean": kernel.get("mean", 0.0),
        "kernel_routing": f"uniform random top-{cfg.num_experts_per_tok}, seed "
        f"{ROUTING_SEED} + layer; busiest expert shard per layer",
        "step_time_lower_bound_s": accessed / bandwidth if bandwidth and accessed else None,
        "argument_bytes": int(args_out[0]),
        "output_bytes": int(args_out[1]),
        "alias_bytes": int(args_out[2]),
        "total_weight_bytes_all_devices": total_weights,
        "weight_split": groups,
        "bytes_accessed_scan_body_once": scan_body_once,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }


def _compile(cfg, mesh, dtype, strategy, shape, scan_layers):
    """(compiled or None, compile error or None, pool shape, lowering seconds)."""
    batch, context, page_size = shape
    # The resident expert layout the target platform runs (int4 on TPU, packed words on CPU).
    layout = expert_layout_for(mesh.devices.flat[0].platform)
    shardings = rules.param_shardings(cfg, mesh, dtype, strategy, layout)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        k2model.abstract_params(cfg, dtype, layout),
        shardings,
    )
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq + 1  # + the scratch page
    pool_shape = (cfg.num_layers, num_pages, page_size, cfg.cache_width)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Every head shard needs the whole latent cache (it is shared by all heads), so the pool is
    # replicated; sharding it by sequence or batch is the change long contexts need.
    cache = kv_cache.PagedCache(
        jax.ShapeDtypeStruct(pool_shape, dtype, sharding=replicated),
        jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32, sharding=replicated),
    )
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=replicated)
    step = jax.jit(decode_step(cfg, dtype, scan_layers), donate_argnums=(3,))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), rules.logical_rules_context(strategy):
        lowered = step.lower(params, tokens, tokens, cache)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
            error = None
        except jax.errors.JaxRuntimeError as err:
            # XLA:TPU refuses a program whose buffers exceed HBM; that is a plan's answer too.
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            compiled, error = None, str(err).splitlines()[0]
    return compiled, error, pool_shape, t1 - t0


def _cost_bytes(cfg, mesh, dtype, strategy, shape, scan_layers: bool) -> float:
    compiled, error, _, _ = _compile(cfg, mesh, dtype, strategy, shape, scan_layers)
    if compiled is None:
        raise RuntimeError(f"the {cfg.num_layers}-layer program did not compile: {error}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("bytes accessed", 0.0))


def _bytes_per_step(cfg, mesh, dtype, strategy, shape, scanned: float) -> tuple[float, float]:
    """(bytes one decode step reads and writes per device by XLA's cost analysis, counting every
    layer; of which per MoE layer). ``scanned``: the real (scanned) program's figure.

    XLA's cost analysis counts a while loop's body once, whatever its trip count, so the scanned
    program's figure holds one layer of each stack. One MoE layer (the scan body, compiled in
    the real program with the real stacked operands) is that figure less the same program
    without the MoE stack (``num_layers = num_dense_layers``); the full model has
    ``num_moe_layers`` of them. Small unrolled programs with 1 and 2 MoE layers, used before, are
    not representative: a 1-layer stack is sliced for free where a real one is not (that
    attributed two layers' expert copies to one), and XLA:TPU keeps a small program's whole
    expert stacks in VMEM, which it cannot do for real ones (on v6e-64 3 unrolled MoE layers
    then cost less than 1). A dense stack of more than one layer is measured by two small
    unrolled dense-only programs (no custom calls there). See docs/sharding.md.

    Pallas kernels are opaque to the cost analysis (a call is counted for its small operands
    only), so the routed experts' weight reads are not in this figure: see
    ``_kernel_expert_bytes``.
    """
    dense = cfg.num_dense_layers
    per_moe = 0.0
    if cfg.num_moe_layers:
        without_moe = _cost_bytes(
            dataclasses.replace(cfg, num_layers=dense), mesh, dtype, strategy, shape, True
        )
        per_moe = scanned - without_moe
    per_dense = 0.0
    if dense > 1:
        one, two = (
            _cost_bytes(dataclasses.replace(cfg, num_layers=n), mesh, dtype, strategy, shape, False)
            for n in (1, 2)
        )
        per_dense = two - one
    total = scanned + (cfg.num_moe_layers - 1) * per_moe + max(dense - 1, 0) * per_dense
    return total, per_moe


ROUTING_SEED = 0


def _kernel_expert_bytes(cfg, mesh, batch: int) -> dict[str, float]:
    """Routed-expert bytes the Pallas kernels copy per decode step, which XLA's cost analysis
    cannot see (zero where the experts run as XLA ops, e.g. CPU devices). Counted, not assumed.

    A stated routing: uniform random top-K, each of a device's T decode tokens choosing K
    distinct experts, seeded (``ROUTING_SEED`` + layer). For every MoE layer and every expert
    shard the kernels' block copies are counted from their own index maps
    (``k2jax.model.expert_matmul.pallas_reads``). Each layer's combining collective waits for
    its busiest shard, so ``busiest`` sums the per-layer maximum over shards (the critical
    path); ``mean`` sums the per-layer mean.
    """
    import numpy as np

    from k2jax.model.expert_matmul import pallas_reads

    layout = expert_layout_for(mesh.devices.flat[0].platform)
    if layout != "int4" or not cfg.num_moe_layers:
        return {"busiest": 0.0, "mean": 0.0}
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    shards = math.prod(mesh_axes.get(a, 1) for a in rules.rules_for("decode")["experts"])
    local = cfg.n_routed_experts // shards
    tokens = max(batch // mesh_axes.get("data", 1), 1)  # decode: one token per sequence
    k = cfg.num_experts_per_tok
    busiest = mean = 0.0
    for layer in range(cfg.num_moe_layers):
        rng = np.random.default_rng(ROUTING_SEED + layer)
        ids = np.stack([rng.choice(cfg.n_routed_experts, k, replace=False) for _ in range(tokens)])
        per_shard = [
            pallas_reads(
                ids,
                expert_offset=d * local,
                num_local=local,
                hidden=cfg.hidden_size,
                inter=cfg.moe_intermediate_size,
                group_size=cfg.quantization.group_size,
                num_total=cfg.n_routed_experts,
            )["total"]
            for d in range(shards)
        ]
        busiest += max(per_shard)
        mean += sum(per_shard) / shards
    return {"busiest": busiest, "mean": mean}


def _group_split(split: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Weight bytes (total, per device) by kind: routed experts, attention, MLPs, embeddings."""

    def kind(path: str) -> str:
        if "/experts/" in path:
            return "routed experts (INT4 + scales)"
        if "/attn/" in path or "attn_norm" in path:
            return "attention (MLA)"
        if "/shared/" in path:
            return "shared experts"
        if "/mlp/" in path:
            return "dense MLP"
        if "w_router" in path or "e_score" in path:
            return "routers"
        if path.startswith(("embed", "lm_head")):
            return "embed + lm_head"
        return "norms"

    out: dict[str, dict[str, int]] = {}
    for path, (total, per) in split.items():
        row = out.setdefault(kind(path), {"total": 0, "per_device": 0})
        row["total"] += total
        row["per_device"] += per
    return out


def format_table(r: dict) -> str:
    """The plan as a human-readable table (GB = 1e9 bytes)."""
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"compiler: {r['compiler']}",
        f"mesh {mesh} over {r['devices']} devices; strategy {r['strategy']}; batch {r['batch']}, "
        f"context {r['context']}, page size {r['page_size']}",
        f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s",
        "",
        f"{'weights by kind':34s} {'total GB':>10s} {'per device GB':>14s}",
    ]
    for name, row in r["weight_split"].items():
        lines.append(f"{name:34s} {row['total'] / GB:10.2f} {row['per_device'] / GB:14.3f}")
    lines.append(
        f"{'all weights':34s} {r['total_weight_bytes_all_devices'] / GB:10.2f} "
        f"{r['weight_bytes'] / GB:14.3f}"
    )
    lines += ["", f"{'per device':34s} {'GB':>10s}"]
    rows = [
        ("weights", r["weight_bytes"]),
        ("KV cache (replicated latent pool)", r["kv_cache_bytes"]),
        ("compiler temporaries", r["temp_bytes"]),
        ("total", r["total_bytes"]),
        ("HBM", r["hbm_bytes"]),
        ("bytes accessed per decode step", r["bytes_accessed"]),
        ("  XLA cost analysis (all layers)", r["bytes_accessed_xla"]),
        ("    of which per MoE layer", r["bytes_accessed_xla_per_moe_layer"]),
        ("  + Pallas kernel copies, counted", r["kernel_bytes"]),
        ("    (mean device, for comparison)", r["kernel_bytes_mean"]),
    ]
    lines += [f"{name:34s} {value / GB:10.3f}" for name, value in rows]
    if r["compile_error"]:
        lines.append(f"the TPU compiler refused the program: {r['compile_error']}")
    if r["hbm_bytes"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"{'':34s} {verdict} ({r['total_bytes'] / r['hbm_bytes']:.0%} of HBM)")
    if r["step_time_lower_bound_s"] is not None:
        bound_ms = r["step_time_lower_bound_s"] * 1e3
        lines.append(f"{'decode step lower bound (HBM bw)':34s} {bound_ms:10.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli_errors.ArgumentParser(
        prog="python -m sharding.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="HF config.json (or its directory)")
    parser.add_argument("--mesh", default="", help="e.g. data=1,expert=32,tensor=1")
    parser.add_argument("--topology", default=None, help="e.g. v5p-64, v6e-64, v5e-16, v5p:4x4x2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096, help="cache positions per sequence")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--strategy", default="decode", choices=sorted(rules.STRATEGIES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    cli_errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    return cli_errors.run(lambda: _plan_cli(parser, args), debug=args.debug)


def _plan_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    sizes = parse_mesh(args.mesh) if args.mesh else None
    if sizes is not None:
        count = math.prod(sizes.values())
    elif args.topology:
        count = topologies.resolve(args.topology).chips
    else:
        parser.error("give --mesh, --topology or both")
    try:
        # Only takes effect before JAX starts a backend; needed for the CPU fallback.
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:
        pass
    if not os.path.exists(args.config):
        raise cli_errors.UsageError(f"--config {args.config}: no such file or directory")
    cfg = Config.from_hf(args.config)
    result = plan(
        cfg,
        sizes,
        batch=args.batch,
        context=args.context,
        page_size=args.page_size,
        topology=args.topology,
        strategy=args.strategy,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
