"""The MoE block: sigmoid router with a selection-only bias, routed INT4 experts, shared expert.

Routing, in float32 as the reference does it: s = sigmoid(x W_router). Selection ranks
s + e_score_correction_bias, first keeping the ``topk_group`` groups whose top-two biased scores
sum highest (the rest are masked out), then the top K experts. The mixing weights are the
UNbiased s of the chosen experts, normalized to sum 1 (+1e-20) when ``norm_topk_prob``, times
``routed_scaling_factor``.

Expert parallelism: when a mesh is set (``jax.set_mesh``) and the flax logical-axis rules map
``experts`` (and ``expert_mlp``) to mesh axes, the routed experts run in a ``shard_map`` over
those axes. Each device applies only its own E / n experts (``expert_offset``), and of each only
its slice of the intermediate axis where ``expert_mlp`` splits it (``expert_split``), to the
tokens that chose them; the partial outputs (a down projection over a slice of the intermediate
axis is a partial sum too) are combined by one collective (a psum, or a psum_scatter where the
tokens are split over an expert axis too). Without a mesh or rules the plain single-device path
runs. The model only reads the rules from the context; it never imports ``sharding``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k2jax.model.config import Config
from k2jax.model.expert_matmul import routed_experts
from k2jax.model.layers import MLP, param
from k2jax.model.quant import LAYOUTS, ExpertWeight, QuantizedWeight, layout_of


def route(
    cfg: Config, x_TD: jax.Array, w_router_DE: jax.Array, bias_E: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Choose K experts per token: (expert ids int32 [T, K], mixing weights float32 [T, K])."""
    logits_TE = jnp.einsum(
        "TD,DE->TE",
        x_TD.astype(jnp.float32),
        w_router_DE.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    scores_TE = jax.nn.sigmoid(logits_TE)
    biased_TE = scores_TE + bias_E.astype(jnp.float32)[None, :]
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        t, e = biased_TE.shape
        grouped_TGX = biased_TE.reshape(t, cfg.n_group, e // cfg.n_group)
        group_scores_TG = jax.lax.top_k(grouped_TGX, 2)[0].sum(axis=-1)
        _, kept_TG = jax.lax.top_k(group_scores_TG, cfg.topk_group)
        keep_TG = (
            jnp.zeros_like(group_scores_TG, bool).at[jnp.arange(t)[:, None], kept_TG].set(True)
        )
        keep_TE = jnp.repeat(keep_TG, e // cfg.n_group, axis=1)
        biased_TE = jnp.where(keep_TE, biased_TE, -jnp.inf)
    _, ids_TK = jax.lax.top_k(biased_TE, cfg.num_experts_per_tok)
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=1)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(axis=-1, keepdims=True) + 1e-20)
    return ids_TK.astype(jnp.int32), weights_TK * cfg.routed_scaling_factor


def _packed_init(key, shape, dtype):
    del dtype
    info = jnp.iinfo(jnp.int32)
    return jax.random.randint(key, shape, info.min, info.max, jnp.int32)


def _scale_init(fan_in: int):
    # Uniform nibbles in [-8, 7] have std ~4.6; this scale gives unit fan-in variance.
    def init(key, shape, dtype):
        del key
        return jnp.full(shape, 1.0 / (4.6 * fan_in**0.5), dtype)

    return init


class Experts(nn.Module):
    """E routed SwiGLU experts with INT4 weights: gate/up [E, M, D], down [E, D, M]."""

    cfg: Config
    dtype: jnp.dtype = jnp.bfloat16

    def _int4(self, name: str, out: int, inp: int, axes: tuple[str, str]) -> QuantizedWeight:
        c = self.cfg
        g = c.quantization.group_size
        e = c.n_routed_experts
        packed = param(
            self, f"{name}_packed", (e, out, inp // 8), ("experts", *axes), jnp.int32, _packed_init
        )
        scale = param(
            self,
            f"{name}_scale",
            (e, out, inp // g),
            ("experts", *axes),
            jnp.bfloat16,
            _scale_init(inp),
        )
        return QuantizedWeight(packed, scale, g)

    def _weight(self, name: str, out: int, inp: int, axes: tuple[str, str], stack_index=None):
        """The ``name`` projection in whichever resident layout the params hold (see
        ``k2jax.model.quant``): the checkpoint's words, what ``init`` makes, or TPU int4, made
        once at load time. A whole MoE-layer stack [L, ...] (what k2jax.model.forward passes, so
        the kernels read it in place) is used at layer ``stack_index``."""
        if self.is_initializing():
            return self._int4(name, out, inp, axes)
        params = self.variables["params"]
        layout = layout_of(params)
        group = self.cfg.quantization.group_size
        if layout == "float":  # training's master weights: fake-quantized iff the experts are INT4
            group = group if self.cfg.quantization.kind == "int4" else 0
        return LAYOUTS[layout].from_params(params, name, group, stack_index)

    @nn.compact
    def __call__(self, x_TD, ids_TK, weights_TK, expert_offset=0, batch=1, stack_index=None):
        """Routed output [T, D]; the T tokens come from ``batch`` sequences of T / batch each.

        ``batch`` only matters under expert parallelism: tokens are split over the batch's mesh
        axes when ``batch`` divides by them, so the split matches the residual stream's.
        ``stack_index``: this layer's index in the MoE stack, used when the int4 expert params
        are the whole stack (see ``Int4Weight.layer``).
        """
        c = self.cfg
        d, m = c.hidden_size, c.moe_intermediate_size
        gate = self._weight("gate", m, d, ("expert_mlp", "expert_embed"), stack_index)
        up = self._weight("up", m, d, ("expert_mlp", "expert_embed"), stack_index)
        down = self._weight("down", d, m, ("expert_embed", "expert_mlp"), stack_index)
        expert_axes, mlp_axes = expert_split(
            c,
            gate.layout,
            mesh_axes("experts"),
            mesh_axes("expert_mlp"),
            dict(jax.sharding.get_abstract_mesh().shape),
        )
        if not expert_axes and not mlp_axes:
            return routed_experts(
                x_TD, ids_TK, weights_TK, gate, up, down, expert_offset=expert_offset
            )
        return _expert_parallel(
            x_TD, ids_TK, weights_TK, (gate, up, down), expert_axes, mlp_axes, batch
        )


# The smallest slice of an expert's intermediate axis a shard may hold, by resident layout: the
# TPU kernel's blocks are lane-dense only for 256-wide chunks of it (gate/up's output columns,
# down's input chunks of 8 groups: ``int4_pallas.tiling``); FP8's flattened scale grid cannot
# be sliced at all (None). Other layouts: one quantization group.
_INTERMEDIATE_UNIT = {"int4": 256, "fp8": None}


def expert_split(
    cfg: Config,
    layout: str,
    expert_axes: tuple[str, ...],
    mlp_axes: tuple[str, ...],
    mesh_shape: Mapping[str, int],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mesh axes splitting the expert stack, mesh axes splitting each expert's intermediate
    axis), from the rules' ``experts`` and ``expert_mlp`` axes. The intermediate axis takes the
    largest subset of ``mlp_axes`` that leaves every shard whole units of it
    (``_INTERMEDIATE_UNIT``); an axis it takes is no longer an expert axis. The params'
    placement (``sharding.rules.param_specs``) and the MoE's shard_map both call this, so they
    agree.

    Why split an expert at all: at decode a chip holding whole experts reads every chosen one
    of its share whole; with the intermediate axis split t ways, t chips share each expert's
    reads, so the busiest chip reads ~1/t as much (K2 at batch 1 on v5p-64, docs/sharding.md),
    at no extra collective (the down projection's partial sums join the MoE's one psum).
    """
    unit = _INTERMEDIATE_UNIT.get(layout, cfg.quantization.group_size or 1)
    units = cfg.moe_intermediate_size // unit if unit else 0
    mlp = tuple(a for a in mlp_axes if mesh_shape.get(a, 1) > 1)
    mlp = dividing_axes(mlp, units, mesh_shape) if units else ()
    return tuple(a for a in expert_axes if a not in mlp), mlp


def dividing_axes(axes: tuple[str, ...], size: int, mesh_shape) -> tuple[str, ...]:
    """The ordered subset of ``axes`` with the most devices whose product divides ``size``
    (earliest first on ties); ``()`` when none does."""
    best: tuple[str, ...] = ()
    for k in range(len(axes), 0, -1):
        for subset in itertools.combinations(axes, k):
            ways = math.prod(mesh_shape[a] for a in subset)
            if size % ways == 0 and ways > math.prod(mesh_shape[a] for a in best):
                best = subset
    return best


def mesh_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that the context's logical rules give ``logical``; () if none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return ()
    (entry,) = nn.logical_to_mesh_axes((logical,))
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _expert_parallel(
    x_TD, ids_TK, weights_TK, weights: tuple[ExpertWeight, ...], expert_axes, mlp_axes, batch
):
    """``routed_experts`` in a shard_map: each device its own experts (and its slice of their
    intermediate axis over ``mlp_axes``), one combining collective.

    Tokens stay split as ``act_batch`` says where that divides them. Token axes that are also
    expert (or intermediate) axes (prefill) are all-gathered on the way in, since every expert
    shard must see every token that may choose it, and reduce-scattered on the way out; the
    remaining axes are summed with one psum (decode: the only collective).
    """
    mesh = jax.sharding.get_abstract_mesh()
    total = weights[0].num_experts
    split_axes = (*expert_axes, *mlp_axes)
    shards = math.prod(mesh.shape[a] for a in expert_axes)
    if total % shards:
        raise ValueError(
            f"{total} routed experts cannot be split over mesh axes {expert_axes} "
            f"({shards} devices)"
        )
    local = total // shards
    token_axes = mesh_axes("act_batch")
    gathered = tuple(a for a in token_axes if a in split_axes)
    # Gathering is only contiguous when the gathered axes are the minor end of the token split.
    if (
        batch % math.prod(mesh.shape[a] for a in token_axes)
        or token_axes[len(token_axes) - len(gathered) :] != gathered
    ):
        token_axes, gathered = (), ()
    summed = tuple(a for a in split_axes if a not in gathered)
    tok = PartitionSpec(token_axes or None)

    def body(x_TD, ids_TK, weights_TK, gate, up, down):
        if gathered:
            x_TD, ids_TK, weights_TK = (
                jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                for a in (x_TD, ids_TK, weights_TK)
            )
        offset = jax.lax.axis_index(expert_axes) * local if expert_axes else 0
        y_TD = routed_experts(
            x_TD, ids_TK, weights_TK, gate, up, down, expert_offset=offset, num_experts_total=total
        )
        if summed:
            y_TD = jax.lax.psum(y_TD, summed)
        if gathered:
            y_TD = jax.lax.psum_scatter(y_TD, gathered, scatter_dimension=0, tiled=True)
        return y_TD

    # check_vma=False: routed_experts may branch (lax.cond) on data whose per-device variance the
    # checker cannot match across branches; the psum / psum_scatter above are explicit anyway.
    # Each weight pytree (payload + scales, any layout) is split on its expert axis and the
    # intermediate axis (``ExpertWeight.shard_spec``), matching the params' own sharding, so
    # nothing is resharded at the boundary.
    gate, up, down = weights
    in_specs = (
        tok,
        tok,
        tok,
        gate.shard_spec(expert_axes, out_axes=mlp_axes),
        up.shard_spec(expert_axes, out_axes=mlp_axes),
        down.shard_spec(expert_axes, in_axes=mlp_axes),
    )
    return jax.shard_map(body, in_specs=in_specs, out_specs=tok, check_vma=False)(
        x_TD, ids_TK, weights_TK, *weights
    )


class MoE(nn.Module):
    """Routed experts plus the shared expert, over x [B, T, D]."""

    cfg: Config
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD: jax.Array, stack_index=None) -> jax.Array:
        """``stack_index``: this layer's index in the MoE stack (see ``Experts``)."""
        c = self.cfg
        b, t, d = x_BTD.shape
        w_router = param(
            self, "w_router", (d, c.n_routed_experts), ("embed", "router_experts"), self.dtype
        )
        bias = param(
            self,
            "e_score_correction_bias",
            (c.n_routed_experts,),
            ("router_experts",),
            jnp.float32,
            nn.initializers.zeros,
        )
        x_TD = x_BTD.reshape(b * t, d).astype(self.dtype)
        # Training reads the router's input back (apply(..., mutable="intermediates")) for the
        # expert load and the balance loss; a no-op otherwise.
        self.sow("intermediates", "router_input", x_TD)
        with jax.named_scope("router"):
            ids_TK, weights_TK = route(c, x_TD, w_router, bias)
        with jax.named_scope("routed_experts"):
            routed_TD = Experts(c, self.dtype, name="experts")(
                x_TD, ids_TK, weights_TK, batch=b, stack_index=stack_index
            )
        routed_BTD = routed_TD.reshape(b, t, d)
        if not c.n_shared_experts:
            return routed_BTD
        shared = MLP(
            d,
            c.moe_intermediate_size * c.n_shared_experts,
            "shared_mlp",
            self.dtype,
            name="shared",
        )
        with jax.named_scope("shared_expert"):
            return routed_BTD + shared(x_BTD.astype(self.dtype))
