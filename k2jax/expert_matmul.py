"""The routed-expert matmuls: SwiGLU experts over INT4 weights, for the experts tokens chose.

This module owns how packed INT4 expert weights meet the activations. Every caller (the MoE
block, expert parallelism, benchmarks) goes through ``routed_experts``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax.quant import QuantizedWeight


def routed_experts(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    gate_EMD: QuantizedWeight | jax.Array,
    up_EMD: QuantizedWeight | jax.Array,
    down_EDM: QuantizedWeight | jax.Array,
    *,
    expert_offset: int | jax.Array = 0,
) -> jax.Array:
    """Sum over k of weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = expert_ids[t, k].

    The weights hold experts [expert_offset, expert_offset + E) (all of them unless expert
    parallelism passes a shard); choices outside that range contribute zero. Only the chosen
    experts' weights are read and widened. Returns [T, D] in x's dtype; accumulates in float32.
    """
    num_local = _num_experts(gate_EMD)
    local_TK = expert_ids_TK - expert_offset
    mine_TK = (local_TK >= 0) & (local_TK < num_local)
    local_TK = jnp.where(mine_TK, local_TK, 0)
    weights_TK = jnp.where(mine_TK, weights_TK, 0.0)
    gate = _gather_dense(gate_EMD, local_TK, x_TD.dtype)
    up = _gather_dense(up_EMD, local_TK, x_TD.dtype)
    down = _gather_dense(down_EDM, local_TK, x_TD.dtype)
    h_TKM = jax.nn.silu(
        jnp.einsum("TD,TKMD->TKM", x_TD, gate, preferred_element_type=jnp.float32)
    ) * jnp.einsum("TD,TKMD->TKM", x_TD, up, preferred_element_type=jnp.float32)
    y_TKD = jnp.einsum(
        "TKM,TKDM->TKD", h_TKM.astype(x_TD.dtype), down, preferred_element_type=jnp.float32
    )
    y_TD = jnp.einsum("TKD,TK->TD", y_TKD, weights_TK.astype(jnp.float32))
    return y_TD.astype(x_TD.dtype)


def _num_experts(w: QuantizedWeight | jax.Array) -> int:
    return (w.packed if isinstance(w, QuantizedWeight) else w).shape[0]


def _gather_dense(w: QuantizedWeight | jax.Array, ids: jax.Array, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):
        chosen = QuantizedWeight(w.packed[ids], w.scale[ids], w.group_size)
        return chosen.dequantize(jnp.float32).astype(dtype)
    return w[ids].astype(dtype)
