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
and the HBM-bandwidth lower bound on step time; then the FLOPs, the collectives read from the
compiled HLO (``sharding.collectives``), the roofline step (max of HBM and compute time, plus the
collectives at the chip's stated latency and ICI bandwidth, ``sharding.topologies``), tokens/s
per user and per chip, and the cached tokens that fit beside the weights. Without ``--mesh`` the
layout is searched (``sharding.search``); ``--batch 1,8,64`` gives one row per batch and
``--plot FILE`` draws TPOT and tokens/s per chip against batch.

Example::

    python -m sharding.plan --config ../shared/k2/kimi-k2-thinking.config.json \\
        --topology v5p-64 --batch 1,8,64,256,512 --context 8192 --plot plan.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from k2jax.model.moe import expert_split
from k2jax.model.quant import expert_layout_for
from k2jax.serving import placement
from sharding import collectives, rules, search, topologies
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


def decode_step(cfg: Config, dtype, scan_layers: bool = True, moe_passes: int = 1):
    """The decode step the engine runs: (params, tokens [B, 1], positions [B, 1], cache).

    ``moe_passes`` 2 runs the MoE stack a second time after the first (a second loop over the
    same layers, writing the same cache layers again): a program for measuring, not for use
    (``_per_step``)."""

    def step(params, tokens_B1, positions_B1, cache):
        run = functools.partial(
            k2model.run_layers, params, cfg=cfg, dtype=dtype, scan_layers=scan_layers
        )
        x_BTD = k2model.embed(params, tokens_B1, cfg=cfg, dtype=dtype)
        x_BTD, pages = run(x_BTD, positions_B1, cache)
        for _ in range(moe_passes - 1):
            again = kv_cache.PagedCache(pages, cache.block_tables)
            x_BTD, pages = run(x_BTD, positions_B1, again, stacks=("moe_layers",))
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
        return _plan_searched(cfg, slice_, batch, context, page_size, topology, dtype)
    devices, compiler = _devices(slice_, math.prod(mesh_sizes[a] for a in AXES))
    count = math.prod(mesh_sizes[a] for a in AXES)
    if len(devices) != count:
        raise ValueError(
            f"--mesh {mesh_sizes} has {count} devices but {topology} has {len(devices)}"
        )
    mesh = make_mesh(**mesh_sizes, devices=devices)
    dtype = jnp.dtype(dtype)
    # Weight bytes of the experts as stored: words for INT4 (jnp's int4 has a 1-byte itemsize).
    stored = "fp8" if cfg.quantization.kind == "fp8" else "words"
    split = rules.param_bytes_per_device(cfg, mesh, dtype, strategy, stored)
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
    pool_ways = math.prod(mesh_sizes[a] for a in rules.kv_pages_axes(mesh_sizes, strategy))
    kv_bytes = math.prod(pool_shape) // pool_ways * dtype.itemsize  # one chip's share
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
    flops_once = float(cost.get("flops", 0.0))
    xla_accessed, per_moe_layer, xla_flops = (
        _per_step(cfg, mesh, dtype, strategy, shape, scan_body_once, flops_once)
        if compiled is not None
        else (0.0, 0.0, 0.0)
    )
    table = rules.rules_for(strategy)
    # The mesh axes the routed experts' stack and each expert's intermediate axis are split over,
    # as the MoE's shard_map resolves them (``k2jax.model.moe.expert_split``).
    split_axes = expert_split(
        cfg, _expert_layout(cfg, mesh), table["experts"], table["expert_mlp"], dict(mesh_sizes)
    )
    kernel = {}
    if compiled is not None:
        kernel = _kernel_expert_bytes(cfg, mesh, batch, split_axes, table)
    attention = (
        _kernel_attention_bytes(cfg, mesh, strategy, batch, context, page_size, dtype)
        if compiled is not None
        else 0.0
    )
    accessed = xla_accessed + kernel.get("busiest", 0.0) + attention
    flops = xla_flops + kernel.get("flops", 0.0)
    ici = collectives.collectives(compiled.as_text(), len(devices)) if compiled is not None else {}
    roof = _roofline(slice_, compiler, len(devices), accessed, flops, ici, batch)
    if per_moe_layer < 0:
        # XLA's count is not a count here (see "warnings"): no roofline is made up from it.
        roof = dict.fromkeys(roof)
    free = hbm - weight_bytes - temp_bytes if hbm else 0
    # A token's latent is on every chip of its pool shard: the slice holds pool_ways times what
    # one chip's free memory holds.
    per_token = cfg.num_layers * cfg.cache_width * dtype.itemsize
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
        "kernel_bytes": kernel.get("busiest", 0.0) + attention,
        "kernel_bytes_experts": kernel.get("busiest", 0.0),
        "kernel_bytes_experts_mean": kernel.get("mean", 0.0),
        "kernel_bytes_attention": attention,
        "expert_split": dict(zip(("experts", "intermediate"), split_axes, strict=True)),
        "kernel_routing": f"uniform random top-{cfg.num_experts_per_tok}, seed "
        f"{ROUTING_SEED} + layer; busiest expert shard per layer",
        "step_time_lower_bound_s": (
            accessed / bandwidth if bandwidth and accessed and per_moe_layer >= 0 else None
        ),
        "flops": flops,
        "flops_xla": xla_flops,
        "kernel_flops": kernel.get("flops", 0.0),
        "ici_bytes": {k: v["bytes"] for k, v in ici.items()},
        "ici_ops": {k: v["count"] for k, v in ici.items()},
        **roof,
        "kv_capacity_tokens": pool_ways * (max(free, 0) // per_token)
        if compiled is not None
        else 0,
        "kv_pool_shards": pool_ways,
        "warnings": (
            [
                "XLA's per-MoE-layer bytes came out negative (the program with the MoE stack "
                "run twice counted less than the real one): bytes_accessed_xla is not "
                "reliable for this case"
            ]
            if per_moe_layer < 0
            else []
        ),
        "argument_bytes": int(args_out[0]),
        "output_bytes": int(args_out[1]),
        "alias_bytes": int(args_out[2]),
        "total_weight_bytes_all_devices": total_weights,
        "weight_split": groups,
        "bytes_accessed_scan_body_once": scan_body_once,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }


def _plan_searched(cfg, slice_, batch, context, page_size, topology, dtype, tries: int = 3):
    """The plan of the best layout the search finds for ``slice_`` (``sharding.search``).

    The best-ranked fitting layout is compiled; if the compiler finds that it does not fit
    after all (its temporaries), the next, up to ``tries``. With a batch of more than one, the
    best layout of each other strategy whose weights and pool fit in HBM is compiled too and
    the lowest compiled roofline step among those that fit wins: the estimate counts weights
    and cache but not activations, which grow with the batch and differ by strategy
    (measured, K2 on v5p-64 at batch 512: estimated 13 ms for ``context_parallel``, compiled
    83 ms, against 37 ms for ``dp_attention``).
    """
    ranked = search.rank(
        cfg, slice_, batch=batch, context=context, page_size=page_size, dtype=dtype
    )
    if not ranked:
        raise ValueError(f"no mesh of {slice_.chips} chips places this model by the rules")
    why = search.explain(ranked)
    tried = []

    def first_fitting(candidates):
        result = None
        for cand in [c for c in candidates if c.fits][:tries] or candidates[:1]:
            result = plan(
                cfg,
                cand.mesh,
                batch=batch,
                context=context,
                page_size=page_size,
                topology=topology,
                strategy=cand.strategy,
                dtype=dtype,
            )
            step = result["roofline_step_s"]
            ms = "" if step is None or not result["fits"] else f", {step * 1e3:.2f} ms"
            tried.append(f"{cand.label()}: {'fits' if result['fits'] else 'does not fit'}{ms}")
            if result["fits"]:
                break
        return result

    result = first_fitting(ranked)
    if batch > 1:
        # Each other strategy's best layout whose weights and pool fit in HBM, even inside the
        # estimate's headroom (the compiler's temporaries decide; K2 on v6e-64 at batch 512:
        # dp_attention at 30.9 of 32 GB compiled, fits and is 2.5x faster than the pick).
        hbm = slice_.chip.hbm_bytes
        near = [c for c in ranked if c.fits or c.weight_bytes + c.kv_bytes <= hbm]
        for strategy in dict.fromkeys(c.strategy for c in near):
            if strategy == result["strategy"]:
                continue
            other = first_fitting([c for c in near if c.strategy == strategy])
            if other["fits"] and (not result["fits"] or _step(other) < _step(result)):
                result = other
        if len(tried) > 1:
            why += (
                "\ncompiled the best fitting layout of each strategy (batch > 1: the estimate "
                f"leaves out activations); lowest compiled roofline: {result['mesh']} "
                f"{result['strategy']}"
            )
    result["layout_search"] = {
        "chosen": f"{result['mesh']} {result['strategy']}",
        "why": why,
        "compiled": tried,
        "ranking": [
            {
                "mesh": c.mesh,
                "strategy": c.strategy,
                "fits_estimate": c.fits,
                "step_s_estimate": c.step_s,
            }
            for c in ranked[:8]
        ],
    }
    return result


def _step(result: dict) -> float:
    """A compiled case's roofline step, infinite where the plan has none (unreliable bytes)."""
    step = result.get("roofline_step_s")
    return float("inf") if step is None else step


def _compile(cfg, mesh, dtype, strategy, shape, scan_layers, moe_passes=1):
    """(compiled or None, compile error or None, pool shape, lowering seconds)."""
    batch, context, page_size = shape
    # The resident expert layout the target platform runs (int4 on TPU, packed words on CPU).
    layout = _expert_layout(cfg, mesh)
    shardings = rules.param_shardings(cfg, mesh, dtype, strategy, layout)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        k2model.abstract_params(cfg, dtype, layout),
        shardings,
    )
    pages_per_seq = -(-context // page_size)
    # Every head shard needs the whole latent cache of its sequences (it is shared by all
    # heads): whole on every chip under ``decode``, split by batch shard under
    # ``dp_attention`` (each shard with its own scratch page).
    pool_axes = rules.kv_pages_axes(dict(mesh.shape), strategy)
    shards = math.prod(mesh.shape[a] for a in pool_axes)
    num_pages = search.pool_pages(batch, context, page_size, shards, rules.striped(strategy))
    pool_shape = (cfg.num_layers, num_pages, page_size, cfg.cache_width)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pool = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, pool_axes or None))
    cache = kv_cache.PagedCache(
        jax.ShapeDtypeStruct(pool_shape, dtype, sharding=pool),
        jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32, sharding=replicated),
    )
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=replicated)
    # The pool row-major in and out, as the engine's step pins it (``placement.row_major``).
    pinned = placement.row_major(pool, 4)
    step = jax.jit(
        decode_step(cfg, dtype, scan_layers, moe_passes),
        donate_argnums=(3,),
        in_shardings=(None, None, None, kv_cache.PagedCache(pinned, None)),
        out_shardings=(None, pinned),
    )
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


def _cost(
    cfg, mesh, dtype, strategy, shape, scan_layers: bool, moe_passes: int = 1
) -> tuple[float, float]:
    """(bytes accessed, flops) of one program by XLA's cost analysis."""
    compiled, error, _, _ = _compile(cfg, mesh, dtype, strategy, shape, scan_layers, moe_passes)
    if compiled is None:
        raise RuntimeError(f"the {cfg.num_layers}-layer program did not compile: {error}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("bytes accessed", 0.0)), float(cost.get("flops", 0.0))


def _per_step(cfg, mesh, dtype, strategy, shape, scanned: float, scanned_flops: float):
    """(bytes one decode step reads and writes per device by XLA's cost analysis, counting every
    layer; of which per MoE layer; FLOPs per device, every layer, the same way). ``scanned``,
    ``scanned_flops``: the real (scanned) program's figures.

    XLA's cost analysis counts a while loop's body once, whatever its trip count, so the scanned
    program's figure holds one layer of each stack. One MoE layer is the same program with the
    MoE stack run a second time (``decode_step(moe_passes=2)``: a second loop, the same body)
    less the real program: the two differ by one loop body and nothing else, both are full size
    (the real stacks, 60 layers' buffers), so XLA:TPU schedules what they share alike.
    Subtracting the program without the MoE stack, used before, did not: on v6e-64 at batch 1
    the smaller program alone prefetched its lm_head shard into VMEM, and one MoE layer came
    out at -95 MB (now 14.5 MB; on v5p-64 both ways agree, 18.6 MB). Small unrolled programs
    with 1 and 2 MoE layers, used before that, are not representative either: a 1-layer stack
    is sliced for free where a real one is not, and XLA:TPU keeps a small program's whole
    expert stacks in VMEM. A dense stack of more than one layer is measured by two small
    unrolled dense-only programs (no custom calls there). See docs/sharding.md.

    Pallas kernels are opaque to the cost analysis (a call is counted for its small operands
    only), so the routed experts' weight reads are not in this figure: see
    ``_kernel_expert_bytes``.
    """
    dense = cfg.num_dense_layers
    per_moe = per_moe_flops = 0.0
    if cfg.num_moe_layers:
        twice = _cost(cfg, mesh, dtype, strategy, shape, True, moe_passes=2)
        per_moe = twice[0] - scanned
        per_moe_flops = twice[1] - scanned_flops
    per_dense = per_dense_flops = 0.0
    if dense > 1:
        one, two = (
            _cost(dataclasses.replace(cfg, num_layers=n), mesh, dtype, strategy, shape, False)
            for n in (1, 2)
        )
        per_dense, per_dense_flops = two[0] - one[0], two[1] - one[1]
    extra_moe, extra_dense = cfg.num_moe_layers - 1, max(dense - 1, 0)
    total = scanned + extra_moe * per_moe + extra_dense * per_dense
    flops = scanned_flops + extra_moe * per_moe_flops + extra_dense * per_dense_flops
    return total, per_moe, flops


def _roofline(slice_, compiler, devices, accessed, flops, ici, batch) -> dict:
    """The roofline of one decode step per chip: ``max(bytes / HBM bw, flops / peak)`` plus the
    collectives (each op's stated latency + its bytes over ICI), and the token rates it gives.
    None where no chip is known (CPU devices without a topology)."""
    if slice_ is None or not accessed:
        return dict.fromkeys(
            (
                "hbm_s",
                "compute_s",
                "collective_s",
                "roofline_step_s",
                "tokens_per_s_per_user",
                "tokens_per_s_per_chip",
            )
        )
    chip = slice_.chip
    cores = devices // slice_.chips if compiler.startswith("XLA:TPU") else 1
    hbm_s = accessed / (chip.hbm_bandwidth / cores)
    compute_s = flops / (chip.peak_flops / cores)
    coll_s = collectives.collective_seconds(ici, chip.ici_bandwidth, chip.collective_latency_s)
    step = max(hbm_s, compute_s) + coll_s
    chips = devices // cores
    return {
        "hbm_s": hbm_s,
        "compute_s": compute_s,
        "collective_s": coll_s,
        "roofline_step_s": step,
        "tokens_per_s_per_user": 1.0 / step,
        "tokens_per_s_per_chip": batch / step / chips,
    }


ROUTING_SEED = 0


def _expert_layout(cfg: Config, mesh) -> str:
    """FP8 experts (an FP8 config, or ``--experts fp8``) as stored; INT4 in the platform's
    layout (int4 on TPU, packed words on CPU)."""
    fp8 = cfg.quantization.kind == "fp8"
    return "fp8" if fp8 else expert_layout_for(mesh.devices.flat[0].platform)


def with_experts(cfg: Config, experts: str | None) -> Config:
    """``cfg`` with its routed experts in format ``experts`` (``--experts``: ``fp8`` or
    ``int4``, K2 Thinking's INT4 that ``k2jax.load(..., experts="int4")`` re-quantizes to)."""
    from k2jax.model.config import ExpertQuantization

    if experts in (None, cfg.quantization.kind):
        return cfg
    return dataclasses.replace(cfg, quantization=ExpertQuantization(experts))


def _kernel_attention_bytes(cfg, mesh, strategy, batch, context, page_size, dtype) -> float:
    """Bytes the Pallas paged-MLA kernel moves per decode step on one chip, every layer, which
    XLA's cost analysis cannot see (a Mosaic call is opaque to it). Counted, not assumed: its
    own index maps over its grid (``mla_pallas.counted_bytes``) for one call of this chip's
    rows and heads (the model's own split, ``attention.kernel_split``), every row at position
    ``context - 1`` with its own pages, plus the call's float32 output. Zero off TPU (attention
    runs as XLA ops there)."""
    import numpy as np

    from k2jax.kernels import mla_pallas
    from k2jax.model.attention import kernel_split

    if mesh.devices.flat[0].platform != "tpu":
        return 0.0
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    # The split the model's shard_map uses, resolved as the traced step resolves it.
    pool_axes = rules.kv_pages_axes(sizes, strategy)
    width = -(-context // page_size)
    if rules.striped(strategy):
        # Context-parallel: each chip runs the kernel over every row and head, through its own
        # stripe of each row's table (shard 0's, the widest), and writes an lse beside it.
        rows, heads = batch, cfg.num_heads
        width = -(-width // math.prod(sizes[a] for a in pool_axes))
        out_width = cfg.kv_lora_rank + 1
        position = width * page_size - 1  # the local position of a query that sees it all
    else:
        with jax.set_mesh(mesh), rules.logical_rules_context(strategy):
            row_axes, head_axes = kernel_split(batch, cfg.num_heads, pool_axes)
        rows = batch // math.prod(sizes[a] for a in row_axes)
        heads = cfg.num_heads // math.prod(sizes[a] for a in head_axes)
        out_width, position = cfg.kv_lora_rank, context - 1
    plan_ = mla_pallas.tiling(
        rows,
        1,
        heads,
        cfg.kv_lora_rank,
        cfg.qk_rope_head_dim,
        width,
        page_size,
        q_dtype=dtype,
        cache_dtype=dtype,
    )
    tables = 1 + np.arange(rows * width, dtype=np.int32).reshape(rows, width)
    positions = np.full((rows, 1), position, np.int32)
    read = mla_pallas.counted_bytes(plan_, tables, positions, page_size)["total"]
    written = rows * heads * out_width * 4  # the float32 latent output (and lse)
    return float((read + written) * cfg.num_layers)


def _kernel_expert_bytes(cfg, mesh, batch: int, split_axes, table) -> dict[str, float]:
    """Routed-expert bytes the Pallas kernels copy per decode step, which XLA's cost analysis
    cannot see (zero where the experts run as XLA ops, e.g. CPU devices). Counted, not assumed.

    A stated routing: uniform random top-K, each of a device's T decode tokens choosing K
    distinct experts, seeded (``ROUTING_SEED`` + layer). For every MoE layer and every expert
    shard the kernels' block copies are counted from their own index maps
    (``k2jax.model.expert_matmul.pallas_reads``). Each layer's combining collective waits for
    its busiest shard, so ``busiest`` sums the per-layer maximum over shards (the critical
    path); ``mean`` sums the per-layer mean. ``split_axes``: (the axes splitting the expert
    stack, those splitting each expert's intermediate axis); ``table``: the strategy's rules.
    """
    import numpy as np

    from k2jax.model.expert_matmul import pallas_reads

    layout = _expert_layout(cfg, mesh)
    on_tpu = mesh.devices.flat[0].platform == "tpu"  # elsewhere the experts run as XLA ops
    if layout not in ("int4", "fp8") or not on_tpu or not cfg.num_moe_layers:
        return {"busiest": 0.0, "mean": 0.0, "flops": 0.0}
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    expert_axes, mlp_axes = split_axes
    shards = math.prod(mesh_axes.get(a, 1) for a in expert_axes)
    inter = cfg.moe_intermediate_size // math.prod(mesh_axes[a] for a in mlp_axes)
    local = cfg.n_routed_experts // shards
    # Decode: one token per sequence; a chip's MoE sees the batch less the token axes it does
    # not gather (the token axes that split experts are gathered).
    token_axes = [a for a in table["act_batch"] if a not in (*expert_axes, *mlp_axes)]
    tokens = max(batch // math.prod(mesh_axes.get(a, 1) for a in token_axes), 1)
    k = cfg.num_experts_per_tok
    busiest = mean = pairs = 0.0
    for layer in range(cfg.num_moe_layers):
        rng = np.random.default_rng(ROUTING_SEED + layer)
        ids = np.stack([rng.choice(cfg.n_routed_experts, k, replace=False) for _ in range(tokens)])
        pairs += np.bincount(ids.ravel() // local, minlength=shards).max()
        per_shard = [
            pallas_reads(
                ids,
                expert_offset=d * local,
                num_local=local,
                hidden=cfg.hidden_size,
                inter=inter,
                group_size=cfg.quantization.group_size,
                num_total=cfg.n_routed_experts,
                layout=layout,
            )["total"]
            for d in range(shards)
        ]
        busiest += max(per_shard)
        mean += sum(per_shard) / shards
    # Three matmuls of D x M (this chip's slice of M) per (token, expert) pair, on the busiest
    # shard of each layer.
    flops = pairs * 2 * 3 * cfg.hidden_size * inter
    return {"busiest": busiest, "mean": mean, "flops": float(flops)}


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
        ("KV cache (latent pool, one chip's share)", r["kv_cache_bytes"]),
        ("compiler temporaries", r["temp_bytes"]),
        ("total", r["total_bytes"]),
        ("HBM", r["hbm_bytes"]),
        ("bytes accessed per decode step", r["bytes_accessed"]),
        ("  XLA cost analysis (all layers)", r["bytes_accessed_xla"]),
        ("    of which per MoE layer", r["bytes_accessed_xla_per_moe_layer"]),
        ("  + Pallas kernel copies, counted", r["kernel_bytes"]),
        ("    routed experts, busiest shard", r["kernel_bytes_experts"]),
        ("      (mean shard, for comparison)", r["kernel_bytes_experts_mean"]),
        ("    paged-MLA attention", r["kernel_bytes_attention"]),
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
    lines.append(f"{'FLOPs per step (XLA + kernels)':34s} {r['flops'] / 1e12:10.3f} TFLOP")
    for kind, nbytes in r["ici_bytes"].items():
        ops = int(r["ici_ops"][kind])
        lines.append(f"{'ICI ' + kind:34s} {nbytes / 1e6:10.3f} MB in {ops} ops")
    if r.get("roofline_step_s"):
        lines += [
            f"{'roofline step':34s} {r['roofline_step_s'] * 1e3:10.2f} ms "
            f"(HBM {r['hbm_s'] * 1e3:.2f}, compute {r['compute_s'] * 1e3:.2f}, "
            f"collectives {r['collective_s'] * 1e3:.2f})",
            f"{'tokens/s per user, per chip':34s} {r['tokens_per_s_per_user']:10.1f} "
            f"{r['tokens_per_s_per_chip']:10.1f}",
        ]
    lines.append(f"{'KV capacity beside the weights':34s} {r['kv_capacity_tokens']:14,d} tokens")
    lines += [f"WARNING: {w}" for w in r.get("warnings", [])]
    if "layout_search" in r:
        lines += [
            "",
            r["layout_search"]["why"],
            "compiled: " + "; ".join(r["layout_search"]["compiled"]),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli_errors.ArgumentParser(
        prog="python -m sharding.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="HF config.json (or its directory)")
    parser.add_argument("--mesh", default="", help="e.g. data=1,expert=32,tensor=1")
    parser.add_argument("--topology", default=None, help="e.g. v5p-64, v6e-64, v5e-16, v5p:4x4x2")
    parser.add_argument(
        "--batch", type=_batches, default=[1], help="sequences per step; a list gives one row each"
    )
    parser.add_argument("--context", type=int, default=4096, help="cache positions per sequence")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--strategy", default="decode", choices=sorted(rules.STRATEGIES))
    parser.add_argument(
        "--experts", choices=("fp8", "int4"), help="routed experts (default: the config's own)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (a list for several)")
    parser.add_argument("--plot", default=None, help="draw TPOT and tokens/s per chip vs batch")
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
    cfg = with_experts(Config.from_hf(args.config), args.experts)
    results = []
    for batch in args.batch:
        results.append(
            plan(
                cfg,
                sizes,
                batch=batch,
                context=args.context,
                page_size=args.page_size,
                topology=args.topology,
                strategy=args.strategy,
            )
        )
        if not args.json:
            print(format_table(results[-1]), flush=True)
            print(flush=True)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    elif len(results) > 1:
        print(format_rows(results))
    if args.plot:
        plot(results, args.plot)
    return 0


def _batches(text: str) -> list[int]:
    """``"1,8,64"`` -> [1, 8, 64]; each a positive integer."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,64, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return out


ROW_HEADER = (
    f"{'batch':>6s} {'mesh (data,expert,tensor)':>26s} {'fits':>5s} {'weights':>8s} {'KV':>7s} "
    f"{'temp':>7s} {'read':>7s} {'TFLOP':>7s} {'ICI MB':>8s} {'colls':>6s} {'step ms':>8s} "
    f"{'tok/s/user':>10s} {'tok/s/chip':>10s} {'KV capacity':>12s}"
)


def format_rows(results: list[dict]) -> str:
    """One row per case (GB per chip; step = the roofline)."""
    lines = [ROW_HEADER]
    for r in results:
        mesh = f"{r['mesh']['data']},{r['mesh']['expert']},{r['mesh']['tensor']} {r['strategy']}"
        step = r.get("roofline_step_s")
        lines.append(
            f"{r['batch']:6d} {mesh:>26s} {'yes' if r['fits'] else 'NO':>5s} "
            f"{r['weight_bytes'] / GB:8.2f} {r['kv_cache_bytes'] / GB:7.2f} "
            f"{r['temp_bytes'] / GB:7.2f} {r['bytes_accessed'] / GB:7.2f} "
            f"{r['flops'] / 1e12:7.3f} {sum(r['ici_bytes'].values()) / 1e6:8.2f} "
            f"{int(sum(r['ici_ops'].values())):6d} "
            + (
                f"{step * 1e3:8.2f} {r['tokens_per_s_per_user']:10.1f} "
                f"{r['tokens_per_s_per_chip']:10.1f} "
                if step
                else f"{'-':>8s} {'-':>10s} {'-':>10s} "
            )
            + f"{r['kv_capacity_tokens']:12,d}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """TPOT (ms) and tokens/s per chip against batch, one line per topology, to ``path``; the
    cases that do not fit, and those whose byte count the plan flags as unreliable
    (``warnings``), are left out and named under the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    by_topology: dict[str, list[dict]] = {}
    for r in results:
        by_topology.setdefault(str(r["topology"]), []).append(r)
    batches_all = sorted({r["batch"] for r in results})
    misfits, unreliable = [], []
    for name, rows in by_topology.items():
        rows = sorted(
            (r for r in rows if r.get("roofline_step_s") and not r.get("warnings")),
            key=lambda r: r["batch"],
        )
        misfits += [f"{name} batch {r['batch']}" for r in by_topology[name] if not r["fits"]]
        unreliable += [f"{name} batch {r['batch']}" for r in by_topology[name] if r.get("warnings")]
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        ax_t.plot(batches, [r["roofline_step_s"] * 1e3 for r in rows], marker="o", label=name)
        ax_c.plot(batches, [r["tokens_per_s_per_chip"] for r in rows], marker="o", label=name)
    context = results[0]["context"]
    ax_t.set(xscale="log", xlabel="batch", ylabel="TPOT, roofline (ms)")
    ax_c.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s per chip, roofline")
    ax_t.set_title(f"decode step, context {context}")
    ax_c.set_title("throughput per chip")
    for ax in (ax_t, ax_c):
        ax.set_xticks(batches_all, [str(b) for b in batches_all])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left")
    notes = []
    if misfits:
        notes.append("does not fit: " + ", ".join(misfits))
    if unreliable:
        notes.append("left out, byte count unreliable (see warnings): " + ", ".join(unreliable))
    if notes:
        fig.text(0.5, 0.01, "; ".join(notes), ha="center", fontsize=8)
        fig.subplots_adjust(bottom=0.2)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
