"""The MoE block: sigmoid router with a selection-only bias, routed INT4 experts, shared expert.

Routing, in float32 as the reference does it: s = sigmoid(x W_router). Selection ranks
s + e_score_correction_bias, first keeping the ``topk_group`` groups whose top-two biased scores
sum highest (the rest are masked out), then the top K experts. The mixing weights are the
UNbiased s of the chosen experts, normalized to sum 1 (+1e-20) when ``norm_topk_prob``, times
``routed_scaling_factor``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import Config
from k2jax.expert_matmul import routed_experts
from k2jax.layers import MLP, param
from k2jax.quant import QuantizedWeight


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

    @nn.compact
    def __call__(self, x_TD, ids_TK, weights_TK, expert_offset=0):
        c = self.cfg
        d, m = c.hidden_size, c.moe_intermediate_size
        gate = self._int4("gate", m, d, ("expert_mlp", "expert_embed"))
        up = self._int4("up", m, d, ("expert_mlp", "expert_embed"))
        down = self._int4("down", d, m, ("expert_embed", "expert_mlp"))
        return routed_experts(x_TD, ids_TK, weights_TK, gate, up, down, expert_offset=expert_offset)


class MoE(nn.Module):
    """Routed experts plus the shared expert, over x [B, T, D]."""

    cfg: Config
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
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
        with jax.named_scope("router"):
            ids_TK, weights_TK = route(c, x_TD, w_router, bias)
        with jax.named_scope("routed_experts"):
            routed_TD = Experts(c, self.dtype, name="experts")(x_TD, ids_TK, weights_TK)
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
