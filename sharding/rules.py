"""Logical axis names -> mesh axes: one rules table per strategy, and the params' placement.

Every parameter carries logical axis names (``k2jax.model.param_axes``); a few activations are
constrained by logical names inside the model (``act_batch``, ``vocab``). A rules table maps each
name to a tuple of mesh axes (or ``()`` for replicated). ``spec_for`` turns an array's names into
a ``PartitionSpec`` and refuses two logical axes of one array on the same mesh axis.

Weights are split over every mesh axis the batch does not use at decode (``expert`` and
``tensor``; ``data`` holds the batch), so a batch-1 step reads about 1/N of them per chip
(N = expert x tensor). Parameters are placed the same way by both strategies, so a model serves
prefill and decode from one copy without resharding between them:

================  ==================  ==================================================
logical axis      mesh axes           parameters
================  ==================  ==================================================
experts           (expert, tensor)    routed experts' INT4 payload and bf16 scales
expert_mlp        (tensor,) decode    each routed expert's intermediate axis, where it divides
                  and context_par.    into the kernel's slices (``moe.expert_split``); an axis
                                      it takes splits the experts no more
heads             (expert, tensor)    w_q_up (q_b), w_k_up + w_v_up (kv_b), w_o (o)
mlp, shared_mlp   (expert, tensor)    dense-layer MLP, shared expert
vocab             (expert, tensor)    embed, lm_head
down_in           (expert, tensor)    w_q_down (q_a) and w_kv_down (kv_a) over their 7,168
                  decode and          inputs: a contraction split whose two partial outputs
                  context_par.        are summed by one psum a layer
everything else   replicated          router, norms
================  ==================  ==================================================

q_a and kv_a (K2: 30 MB a layer, 1.84 GB a chip when whole) are split over their inputs under
``decode`` and ``context_parallel`` (``MLAttention._down_projections``: each device multiplies
its slice of x, which stays whole, by its rows of both weights, and one float32 psum of the
concatenated partials joins them). Measured on v5p-64 (K2, batch 1, 8K, expert=4, tensor=8):
4.69 -> 2.83 GB read a step, 123 -> 184 all-reduces, 2.93 -> 2.87 ms at the stated 10 us a
collective. Left to XLA's partitioner (the weights' input axis named, plain einsums), the same
split compiled to 429 all-reduces (5.57 ms): the x slice the weights asked for propagated
back into the residual stream, and every norm and the router took an all-reduce of its own.
Not under ``dp_attention``: there the weights are split over ``tensor`` only, and a collective
a layer costs more than the half of 1.84 GB it would save.

What stays replicated, and why: the router (5.5 MB a layer, 0.33 GB a chip) and the norms.
The router's logits need the whole input before top-k; a split would add a collective a
layer (~10 us of latency, ``sharding.topologies``) to save ~2 us of HBM reads on v5p. (Splitting
q_a over q_lora and kv_a over its 576 outputs instead was also measured: XLA:TPU then sharded
the rope slice of the queries and keys too and all-reduced the [S, heads] score partials over
``tensor``, 33 MB a layer at 256K positions, plus ~10 collective-permutes a layer for the
latent's C|R slice that crosses shard boundaries.)

Expert stacks must divide exactly (refused otherwise, naming the sizes: 384 experts over 7
devices); a dense weight whose dimension a rule's axes do not divide takes the largest ordered
subset of them that does (4 heads over expert=8: replicated), which keeps tiny test models and
odd meshes running; ``param_bytes_per_device`` reports what each chip really holds.

The strategies differ in the batch axis of activations (and ``dp_attention`` and
``context_parallel`` in the pool):

- ``decode``: ``act_batch -> (data,)``.
- ``prefill``: ``act_batch -> (data, expert)``. Compute-bound: the batch is also split over
  ``expert`` so attention is not computed ``expert`` times over; the MoE gathers its tokens
  over ``expert`` on the way in and reduce-scatters them on the way out, and the partitioner
  gathers the head-split weights over ``expert`` where the batch holds that axis.
- ``dp_attention`` (data-parallel attention): ``act_batch`` and ``kv_pages`` (the page pool's
  page axis) -> ``(data, expert)``; heads, MLPs and vocab -> ``(tensor,)``; routed experts as
  above. Each batch shard owns its sequences' pages on its own chips (the engine's
  ``PartitionedAllocator``), so the pool per chip is 1/(data x expert) of the slice's.
- ``context_parallel`` (long sequences): ``kv_stripes`` -> every axis, ``act_batch`` -> ();
  weights as ``decode``. Logical page j of every sequence is in pool shard j mod N (the
  engine's ``StripedAllocator``): each chip holds and reads 1/N of every sequence, and the
  shards' partial attentions are merged by their log-sum-exp (``k2jax.model.context_parallel``).

Where each collective happens and its size: ``sharding``'s package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax import model as k2model
from k2jax.model.config import Config
from k2jax.model.moe import dividing_axes, expert_split
from k2jax.model.quant import layout_of
from k2jax.serving import placement

Rules = Mapping[str, tuple[str, ...]]

_PARAMS: dict[str, tuple[str, ...]] = {
    "layers": (),
    "vocab": ("expert", "tensor"),
    "embed": (),
    "down_in": (),
    "q_lora": (),
    "kv_lora_rope": (),
    "kv_lora": (),
    "heads": ("expert", "tensor"),
    "qk_head_dim": (),
    "head_dim": (),
    "v_head_dim": (),
    "mlp": ("expert", "tensor"),
    "shared_mlp": ("expert", "tensor"),
    "router_experts": (),
    "experts": ("expert", "tensor"),
    "expert_mlp": (),
    "expert_embed": (),
}

# Logical axes whose split must divide exactly: the expert stacks (the MoE's shard_map gives
# each device E / shards experts). Every other name takes the largest subset that divides.
STRICT = frozenset({"experts"})

# Small-batch decode: each routed expert's intermediate axis over ``tensor`` (where it divides
# into whole kernel blocks, ``k2jax.model.moe.expert_split``), the experts over ``expert``.
# The busiest chip then reads 1/tensor of each chosen expert of its group instead of whole
# experts: at batch 1 the 8 chosen experts fall unevenly on 32 one-expert-group chips (~1.7 on
# the busiest, K2 on v5p-64), while over 4 groups x 8 slices the busiest reads ~3.5 x 1/8.
# Not for dp_attention: there a chip's tokens are its expert group's, and the same experts
# would see tensor-times the rows (the activation copies that dominate at batch 512).
_SPLIT_EXPERTS = {"expert_mlp": ("tensor",)}

# Small-batch decode: q_a's and kv_a's 7,168 inputs over every weight axis (a contraction
# split; MLAttention._down_projections sums both partial outputs in one psum a layer). At
# batch 1 on v5p-64 every chip otherwise reads the same 1.84 GB of them a step.
_SPLIT_DOWN = {"down_in": ("expert", "tensor")}

# Data-parallel attention: the batch and its page pool over (data, expert), so each chip
# attends over its own sequences' pages and the slice holds data x expert times the tokens of
# a replicated pool; the routed experts stay split over (expert, tensor) (not copied), the MoE
# gathering its tokens over expert; MLA, the MLPs and the vocab over tensor only (a head split
# over an axis the batch uses would be all-gathered every layer).
_DATA_PARALLEL_ATTENTION = {
    **_PARAMS,
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "shared_mlp": ("tensor",),
    "vocab": ("tensor",),
    "act_batch": ("data", "expert"),
    "kv_pages": ("data", "expert"),
}

# Context-parallel decode: every sequence's pages striped over all the mesh's axes (the
# engine's StripedAllocator), so one long sequence's cache and its attention reads are 1/N per
# chip; weights as ``decode`` places them; the batch whole on every chip (each shard attends
# every row over its own pages, and the shards' partial softmaxes are merged by log-sum-exp).
_CONTEXT_PARALLEL = {
    **_PARAMS,
    **_SPLIT_EXPERTS,
    **_SPLIT_DOWN,
    "act_batch": (),
    "kv_pages": (),
    "kv_stripes": ("data", "expert", "tensor"),
}


STRATEGIES: dict[str, dict[str, tuple[str, ...]]] = {
    "decode": {
        **_PARAMS,
        **_SPLIT_EXPERTS,
        **_SPLIT_DOWN,
        "act_batch": ("data",),
        "kv_pages": (),
        "kv_stripes": (),
    },
    "prefill": {**_PARAMS, "act_batch": ("data", "expert"), "kv_pages": (), "kv_stripes": ()},
    "dp_attention": {**_DATA_PARALLEL_ATTENTION, "kv_stripes": ()},
    "context_parallel": _CONTEXT_PARALLEL,
}


class ShardingError(ValueError):
    """A rules table and a mesh cannot place an array as asked."""


def rules_for(strategy: str) -> dict[str, tuple[str, ...]]:
    """The rules table of ``strategy`` (``"decode"`` or ``"prefill"``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (use one of {sorted(STRATEGIES)})")
    return dict(STRATEGIES[strategy])


def kv_pages_axes(mesh_shape: Mapping[str, int], strategy: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) ``strategy`` splits the page pool's pages over, by rows
    (``kv_pages``) or by stripes of every sequence (``kv_stripes``); () when the pool is whole
    on every chip."""
    table = rules_for(strategy)
    axes = table.get("kv_pages", ()) or table.get("kv_stripes", ())
    return tuple(a for a in axes if mesh_shape.get(a, 1) > 1)


def striped(strategy: str) -> bool:
    """Whether ``strategy`` stripes every sequence over the pool's shards (context-parallel)."""
    return bool(rules_for(strategy).get("kv_stripes"))


def flax_rules(strategy: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The table in ``flax.linen.logical_axis_rules`` form, for the model's activation hints."""
    return tuple(
        (name, None if not axes else axes[0] if len(axes) == 1 else axes)
        for name, axes in rules_for(strategy).items()
    )


def spec_for(
    names: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Rules,
    what: str = "array",
) -> PartitionSpec:
    """The ``PartitionSpec`` for an array with logical ``names`` and ``shape`` on ``mesh``.

    Raises ``ShardingError`` naming ``what`` when a logical name has no rule, when two of the
    array's logical axes land on one mesh axis, or when the mesh does not divide an expert
    stack (``STRICT``). Other dimensions take the largest subset of their axes that divides.
    """
    if len(names) != len(shape):
        raise ShardingError(f"{what}: {len(names)} axis names {names} for shape {shape}")
    used: dict[str, str] = {}
    parts = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            parts.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule in the table")
        axes = tuple(a for a in rules[name] if a in mesh.shape)
        for a in axes:
            if a in used:
                raise ShardingError(
                    f"{what}: logical axes {used[a]!r} and {name!r} both map to mesh axis "
                    f"{a!r}; an array can be split over a mesh axis only once"
                )
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways and name in STRICT:
            split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ShardingError(
                f"{what}: axis {name!r} of size {size} cannot be split over mesh axes "
                f"{split} ({ways} ways): {size} is not divisible by {ways}"
            )
        if size % ways:
            axes = dividing_axes(axes, size, mesh.shape)
        for a in axes:
            used[a] = name
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_specs(
    cfg: Config,
    mesh: Mesh,
    dtype=jnp.bfloat16,
    strategy: str = "decode",
    expert_layout: str = "words",
) -> dict:
    """A ``PartitionSpec`` for every parameter, as a tree shaped like the params (with the
    routed experts in ``expert_layout``, see ``k2jax.model.to_expert_layout``)."""
    rules = rules_for(strategy)
    # The experts' split as the MoE's shard_map resolves it: an axis that splits each expert's
    # intermediate axis does not split the stack too (and every array of a weight alike).
    experts, expert_mlp = expert_split(
        cfg, expert_layout, rules["experts"], rules["expert_mlp"], dict(mesh.shape)
    )
    rules = {**rules, "experts": experts, "expert_mlp": expert_mlp}
    axes = k2model.param_axes(cfg, dtype, expert_layout)
    shapes = k2model.abstract_params(cfg, dtype, expert_layout)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    axes_flat = treedef.flatten_up_to(axes)
    specs = [
        spec_for(tuple(names), tuple(s.shape), mesh, rules, _path_name(path))
        for (path, s), names in zip(flat, axes_flat, strict=True)
    ]
    return jax.tree.unflatten(treedef, specs)


def param_shardings(
    cfg: Config,
    mesh: Mesh,
    dtype=jnp.bfloat16,
    strategy: str = "decode",
    expert_layout: str = "words",
) -> dict:
    """A ``NamedSharding`` for every parameter on ``mesh``, as a tree shaped like the params.

    This is what ``k2jax.load(..., mesh=)`` restores each array into. Raises ``ShardingError``
    (naming the parameter, axis and sizes) when the mesh does not divide the model.
    """
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(cfg, mesh, dtype, strategy, expert_layout),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params: dict, cfg: Config, mesh: Mesh, strategy: str = "decode") -> dict:
    """``params`` (host or device arrays, the same on every process) placed by the rules.

    On one process this is a ``device_put``. Across processes each one builds only the shards
    of its own devices from its copy (``make_array_from_callback``), which is how a multi-host
    test or a small model gets placed; a full K2 is restored shard by shard by ``k2jax.load``.
    """
    leaf = jax.tree.leaves(params)[0]
    experts = params.get("moe_layers", {}).get("moe", {}).get("experts")
    # The placement follows the params actually given: int4 or words expert layout.
    layout = "words" if experts is None else layout_of(experts)
    shardings = param_shardings(cfg, mesh, jnp.asarray(leaf).dtype, strategy, layout)
    if jax.process_count() == 1:
        return jax.device_put(params, shardings)
    return jax.tree.map(lambda x, s: placement.place(jax.device_get(x), s), params, shardings)


def param_bytes_per_device(
    cfg: Config, mesh: Mesh, dtype=jnp.bfloat16, strategy="decode", expert_layout="words"
):
    """{param path: (total bytes, bytes on each device)} by the rules, without allocating."""
    shapes = k2model.abstract_params(cfg, dtype, expert_layout)
    specs = param_specs(cfg, mesh, dtype, strategy, expert_layout)
    out = {}
    for (path, s), spec in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(specs), strict=True
    ):
        total = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
        ways = 1
        for part in spec:
            for a in (part,) if isinstance(part, str) else part or ():
                ways *= mesh.shape[a]
        out[_path_name(path)] = (total, total // ways)
    return out


def logical_rules_context(strategy: str):
    """A context manager that makes the model's activation hints follow ``strategy``."""
    return nn.logical_axis_rules(flax_rules(strategy))


def check_mesh(cfg: Config, text: str, num_devices: int) -> dict[str, int]:
    """The ``--mesh`` sizes, checked without devices or weights: a ``ValueError`` naming the flag
    when they do not multiply to ``num_devices`` or do not divide the model's dimensions."""
    from sharding.mesh import AXES, parse_mesh

    sizes = parse_mesh(text)
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"--mesh {text}: axis {name} must be >= 1, got {size}")
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(
            f"--mesh {text} spans {total} devices but {num_devices} are available: the axis "
            "sizes must multiply to the device count"
        )
    abstract = jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)
    try:
        param_specs(cfg, abstract)
    except ShardingError as e:
        raise ShardingError(f"--mesh {text} does not divide the model: {e}") from None
    return sizes
