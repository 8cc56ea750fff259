"""Which layout the plan compiles when no ``--mesh`` is given: every mesh factorization and
strategy, ranked by an arithmetic estimate of the decode step.

For a slice of n chips every (data, expert, tensor) with data x expert x tensor = n is a
candidate, with each strategy searched (``DECODE_STRATEGIES``), if the rules place the model on
it (the expert stacks divide) and data divides the batch. The estimate, per chip and decode
step, uses only arithmetic (no compile, milliseconds a candidate):

- weights: ``rules.param_bytes_per_device`` (what the rules put on a chip);
- KV: the latent pool, whole on every chip, or its shard under ``dp_attention`` (each batch
  shard's sequences only; see docs/sharding.md, "Data-parallel attention") and
  ``context_parallel`` (1/N of every sequence: "Context-parallel decode");
- reads: the dense weights a chip holds + the routed experts its tokens choose on the busiest
  chip (each layer's combine waits for it: the distinct experts chosen in its expert group,
  the mean over seeded uniform routings of the group with the most, times the chip's slice of
  an expert when ``expert_mlp`` splits them) + the cache of its sequences (its stripes of
  every sequence under ``context_parallel``);
- FLOPs: 2 x tokens x the dense weights a chip holds + attention over the context for its heads
  + the chosen experts;
- collectives: two all-reduces per layer (attention output; MoE combine, into which XLA
  merges the shared expert's) and one for the embedding, each at the chip's stated latency;
  two more per layer under ``context_parallel`` (the merge's all-max and all-reduce), one more
  where q_a and kv_a are split over their inputs (``down_in``: their partial outputs' sum).

A candidate fits when weights + KV leave 5% of HBM for the compiler's temporaries. The plan
compiles the best fitting one, and the next when the compiler says it does not fit; the
compiled program's figures (not this estimate) are what it reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.model.config import Config
from k2jax.model.moe import expert_split
from sharding import rules, topologies
from sharding.mesh import AXES

HEADROOM = 0.95
# The strategies searched for the decode step. ``prefill`` (the batch over ``expert`` too) is
# left out: with the heads split over ``expert`` and the latent pool replicated, XLA:TPU
# regathers per layer; measured on v5p-64 at batch 64, context 8192, it read 18.9 TB and sent
# 67 GB over ICI a step (6.97 s). Splitting the batch for attention needs the partitioned
# pool: ``dp_attention``, searched; so is ``context_parallel`` (a striped pool).
DECODE_STRATEGIES = ("decode", "dp_attention", "context_parallel")


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: dict[str, int]
    strategy: str
    weight_bytes: int
    kv_bytes: int
    read_bytes: float
    flops: float
    collectives: int
    step_s: float
    fits: bool

    def label(self) -> str:
        sizes = ",".join(f"{a}={self.mesh[a]}" for a in AXES)
        return f"{sizes} {self.strategy}"


def factorizations(n: int) -> list[dict[str, int]]:
    """Every (data, expert, tensor) whose product is ``n``."""
    out = []
    for d in range(1, n + 1):
        if n % d:
            continue
        for e in range(1, n // d + 1):
            if (n // d) % e:
                continue
            out.append({"data": d, "expert": e, "tensor": n // d // e})
    return out


def pool_pages(
    batch: int, context: int, page_size: int, shards: int = 1, striped: bool = False
) -> int:
    """Pages of a pool for ``batch`` sequences of ``context`` positions in ``shards`` equal
    shards, each with its own scratch page: a shard holds the sequences of its batch rows
    (``batch`` divisible by ``shards``), or, ``striped``, every sequence's 1/shards."""
    pages = -(-context // page_size)
    if striped:
        return shards * (batch * -(-pages // shards) + 1)
    return shards * (batch // shards * pages + 1)


def pool_bytes(
    cfg: Config,
    batch: int,
    context: int,
    page_size: int,
    itemsize: int,
    shards: int = 1,
    striped: bool = False,
) -> int:
    """Bytes of one chip's share of that pool (one shard)."""
    pages = pool_pages(batch, context, page_size, shards, striped) // shards
    return cfg.num_layers * pages * page_size * cfg.cache_width * itemsize


def estimate(
    cfg: Config,
    chip: topologies.Chip,
    sizes: dict[str, int],
    strategy: str,
    *,
    batch: int,
    context: int,
    page_size: int,
    dtype=jnp.bfloat16,
) -> Candidate | None:
    """The arithmetic estimate for one layout, or None when the rules cannot place the model."""
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)
    try:
        # Expert bytes in the checkpoint's own format: FP8 experts at 1 byte a weight, INT4
        # ones at 4.5 bits (the words layout holds the same bytes as the TPU's int4 layout).
        layout = "fp8" if cfg.quantization.kind == "fp8" else "words"
        split = rules.param_bytes_per_device(cfg, mesh, dtype, strategy, layout)
    except rules.ShardingError:
        return None
    itemsize = jnp.dtype(dtype).itemsize
    d, e, t = sizes["data"], sizes["expert"], sizes["tensor"]
    if d > 1 and e * t == 1:
        # Experts unsplit: the MoE runs outside its shard_map, and XLA cannot partition the
        # Pallas expert kernel over ``data`` itself (Mosaic kernels are not auto-partitioned).
        return None
    batch_axes = rules.rules_for(strategy)["act_batch"]
    ways = math.prod(sizes[a] for a in batch_axes)
    if batch % ways:
        return None
    weights = sum(per for _, per in split.values())
    experts_total = sum(tot for p, (tot, _) in split.items() if "/experts/" in p)
    dense_per_chip = sum(per for p, (_, per) in split.items() if "/experts/" not in p)
    pool_ways = math.prod(sizes[a] for a in rules.kv_pages_axes(sizes, strategy))
    striped = rules.striped(strategy)
    if batch % pool_ways and not striped:
        return None
    kv = pool_bytes(cfg, batch, context, page_size, itemsize, pool_ways, striped)
    tokens = batch // d  # the tokens the MoE of one chip sees (gathered over expert if split)
    attn_tokens = batch // ways
    # The positions of each sequence a chip attends over: all, or its stripes.
    attn_context = -(-context // pool_ways) if striped else context
    layers, moe_layers = cfg.num_layers, cfg.num_moe_layers
    num_e = cfg.n_routed_experts
    table = rules.rules_for(strategy)
    # Split as the TPU runs them (the int4 layout's kernel blocks bound the intermediate split).
    runtime = "fp8" if layout == "fp8" else "int4"
    expert_axes, mlp_axes = expert_split(cfg, runtime, table["experts"], table["expert_mlp"], sizes)
    groups = math.prod(sizes[a] for a in expert_axes)
    slices = math.prod(sizes[a] for a in mlp_axes)
    per_expert = experts_total / max(moe_layers * num_e, 1)
    pairs = tokens * cfg.num_experts_per_tok
    busiest = busiest_group_experts(num_e, groups, tokens, cfg.num_experts_per_tok)
    kv_read = attn_tokens * attn_context * layers * cfg.cache_width * itemsize
    read = dense_per_chip + moe_layers * busiest * per_expert / slices + kv_read
    head_axes = rules.dividing_axes(
        tuple(a for a in rules.rules_for(strategy)["heads"] if a in sizes), cfg.num_heads, sizes
    )
    heads = cfg.num_heads // math.prod(sizes[a] for a in head_axes)
    if striped:
        heads = cfg.num_heads  # every chip attends all heads over its own pages
    width = cfg.kv_lora_rank * 2 + cfg.qk_rope_head_dim
    flops = (
        2 * tokens * dense_per_chip / itemsize
        + 2 * attn_tokens * heads * attn_context * width * layers
        + 2 * 3 * pairs / (e * t) * cfg.hidden_size * cfg.moe_intermediate_size * moe_layers
    )
    # Attention output and the MoE combine (XLA merges the shared expert's reduction into it).
    collectives = 2 * layers + 1 if e * t > 1 else 0
    if strategy == "prefill" and e > 1:
        # The batch holds ``expert``: the head-split attention weights are gathered per layer.
        collectives += 2 * layers
    if striped and pool_ways > 1:
        collectives += 2 * layers  # the shards' partials merged: an all-max and an all-reduce
    down_axes = tuple(a for a in table.get("down_in", ()) if sizes[a] > 1)
    if rules.dividing_axes(down_axes, cfg.hidden_size, sizes):
        collectives += layers  # q_a's and kv_a's partial outputs, summed over their input split
    step = (
        max(read / chip.hbm_bandwidth, flops / chip.peak_flops)
        + collectives * chip.collective_latency_s
    )
    fits = weights + kv <= HEADROOM * chip.hbm_bytes
    return Candidate(dict(sizes), strategy, weights, kv, read, flops, collectives, step, fits)


@functools.lru_cache(maxsize=256)
def busiest_group_experts(num_experts: int, groups: int, tokens: int, k: int) -> float:
    """The distinct experts chosen in the busiest of ``groups`` equal groups of experts when
    each of ``tokens`` tokens chooses ``k`` distinct ones uniformly: the mean over 32 seeded
    draws (the plan's own kernel count uses a seeded routing too)."""
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(32):
        chosen = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :k]
        hit = np.zeros(num_experts, bool)
        hit[chosen.ravel()] = True
        total += hit.reshape(groups, -1).sum(axis=1).max()
    return total / 32


def rank(
    cfg: Config,
    slice_: topologies.Slice,
    *,
    batch: int,
    context: int,
    page_size: int,
    dtype=jnp.bfloat16,
    strategies: tuple[str, ...] = DECODE_STRATEGIES,
) -> list[Candidate]:
    """Every placeable layout of ``slice_``, fitting ones first, then by estimated step time."""
    out = []
    for sizes in factorizations(slice_.chips):
        for strategy in strategies:
            c = estimate(
                cfg,
                slice_.chip,
                sizes,
                strategy,
                batch=batch,
                context=context,
                page_size=page_size,
                dtype=dtype,
            )
            if c is not None:
                out.append(c)
    # Ties (expert x tensor factorizations place the decode step alike) go to the decode
    # strategy, then to the larger expert axis: the layout whose prefill splits the batch most.
    return sorted(
        out,
        key=lambda c: (
            not c.fits,
            round(c.step_s, 9),
            c.weight_bytes,
            c.strategy != "decode",
            -c.mesh["expert"],
        ),
    )


def explain(ranked: list[Candidate], top: int = 5) -> str:
    """The ranking as text: why the first one was chosen."""
    gb = 1e9
    lines = [
        f"layout search: {len(ranked)} placeable layouts; estimate (arithmetic, per chip): "
        "weights + KV vs HBM, step = max(reads / HBM bw, FLOPs / peak) + collectives x latency",
        f"  {'mesh, strategy':38s} {'fits':>5s} {'weights GB':>10s} {'KV GB':>7s} "
        f"{'reads GB':>9s} {'colls':>6s} {'est. ms':>8s}",
    ]
    for c in ranked[:top]:
        lines.append(
            f"  {c.label():38s} {'yes' if c.fits else 'no':>5s} {c.weight_bytes / gb:10.2f} "
            f"{c.kv_bytes / gb:7.2f} {c.read_bytes / gb:9.2f} {c.collectives:6d} "
            f"{c.step_s * 1e3:8.2f}"
        )
    best = ranked[0]
    if best.fits:
        lines.append(
            f"chosen: {best.label()}, the fitting layout with the lowest estimated step "
            "(ties: the larger expert axis); the compiled program's figures are reported"
        )
    else:
        lines.append(
            f"no layout fits weights + KV in {HEADROOM:.0%} of HBM; compiled the closest, "
            f"{best.label()}, to report what the compiler says"
        )
    return "\n".join(lines)
