"""Logical axis names -> mesh axes: one rules table per strategy, and the params' placement.

Every parameter carries logical axis names (``k2jax.model.param_axes``); a few activations are
constrained by logical names inside the model (``act_batch``, ``heads``, ``vocab``). A rules
table maps each name to a tuple of mesh axes (or ``()`` for replicated). ``spec_for`` turns an
array's names into a ``PartitionSpec`` and refuses two things flax's own resolver lets through
silently: two logical axes of one array on the same mesh axis, and a split that does not divide
the dimension (384 experts over 7 devices), naming the parameter, the axis and the sizes.

Parameters are placed the same way by both strategies, so a model serves prefill and decode
from one copy without resharding between them:

================  ====================  ==================================================
logical axis      mesh axes             parameters
================  ====================  ==================================================
experts           (expert, tensor)      routed experts' packed INT4 words and bf16 scales
heads             (tensor,)             w_q_up, w_k_up, w_v_up, w_o
mlp, shared_mlp   (tensor,)             dense-layer MLP, shared expert
vocab             (tensor,)             embed, lm_head
everything else   replicated            w_q_down, w_kv_down, norms, router, bias
================  ====================  ==================================================

Experts go over ``expert`` AND ``tensor``: with experts over ``expert`` alone, every tensor-
parallel chip would hold a full copy of its expert shard (on a v6e-64 with expert=8, tensor=8
that is 71 GB a chip against 32 GB of HBM). The low-rank down-projections stay replicated: the
only other axis they have (``q_lora``, ``kv_lora``) meets ``heads`` in the up-projection, and a
split there would cost a collective per layer to save about 2 GB a chip.

The strategies differ in the batch axis of activations:

- ``decode``: ``act_batch -> (data,)``. Memory-bound: every chip of a replica reads the
  attention weights it holds anyway, so attention runs replicated over ``expert``.
- ``prefill``: ``act_batch -> (data, expert)``. Compute-bound: the batch is also split over
  ``expert`` so attention is not computed ``expert`` times over; the MoE gathers its tokens
  over ``expert`` on the way in and reduce-scatters them on the way out.

Where the collectives are, for one layer on a mesh (data d, expert e, tensor t), in
scaling-book notation (``X[A_t]``: A split over tensor; ``{U_t}``: partial sums over tensor
awaiting a reduction). Decode:

- embedding: ``take(embed[V_t, D], tok[B_d, T]) -> x[B_d, T, D] {U_t}``: AllReduce_t (once).
- attention: ``q[B_d, T, N_t, K]`` and the cached latents are local (latents come from the
  replicated w_kv_down, so every head shard writes the same cache, no communication);
  ``out[B_d, T, N_t, U] . w_o[N_t, U, D] -> y[B_d, T, D] {U_t}``: AllReduce_t.
- dense MLP / shared expert: ``h[B_d, T, F_t] . w_down[F_t, D] -> y {U_t}``: AllReduce_t.
- routed experts (``k2jax.model.moe``, a ``shard_map``): the router runs replicated; each device
  applies only its experts ``[E_(e,t)]`` to the tokens that chose them;
  ``y[T_d, D] {U_(e,t)}``: one AllReduce over (expert, tensor) -- the one MoE collective.
  Prefill: ``x[T_(d,e), D]`` -> AllGather_e -> local experts -> ``{U_(e,t)}`` ->
  AllReduce_t + ReduceScatter_e back to ``y[T_(d,e), D]``.
- lm_head: ``h[B_d, T, D] . lm_head[D, V_t] -> logits[B_d, T, V_t]``: local; gathered over
  ``tensor`` only where the caller asks for whole logits.

Per decode step at batch 1 and t = 1 that is one AllReduce of D values per MoE layer: 14 KB
in bf16, 61 of them, microseconds on ICI against milliseconds of HBM reads.
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
from k2jax.model.quant import layout_of
from k2jax.serving import placement

Rules = Mapping[str, tuple[str, ...]]

_PARAMS: dict[str, tuple[str, ...]] = {
    "layers": (),
    "vocab": ("tensor",),
    "embed": (),
    "q_lora": (),
    "kv_lora_rope": (),
    "kv_lora": (),
    "heads": ("tensor",),
    "qk_head_dim": (),
    "head_dim": (),
    "v_head_dim": (),
    "mlp": ("tensor",),
    "shared_mlp": ("tensor",),
    "router_experts": (),
    "experts": ("expert", "tensor"),
    "expert_mlp": (),
    "expert_embed": (),
}

STRATEGIES: dict[str, dict[str, tuple[str, ...]]] = {
    "decode": {**_PARAMS, "act_batch": ("data",)},
    "prefill": {**_PARAMS, "act_batch": ("data", "expert")},
}


class ShardingError(ValueError):
    """A rules table and a mesh cannot place an array as asked."""


def rules_for(strategy: str) -> dict[str, tuple[str, ...]]:
    """The rules table of ``strategy`` (``"decode"`` or ``"prefill"``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (use one of {sorted(STRATEGIES)})")
    return dict(STRATEGIES[strategy])


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
    array's logical axes land on one mesh axis, or when a mesh split does not divide its dim.
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
            used[a] = name
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ShardingError(
                f"{what}: axis {name!r} of size {size} cannot be split over mesh axes "
                f"{split} ({ways} ways): {size} is not divisible by {ways}"
            )
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
