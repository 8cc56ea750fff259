"""Small building blocks: RMSNorm, a logically partitioned parameter helper, the SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def fan_in_init(axis: int | Sequence[int] = 0) -> Initializer:
    """Normal init with std 1/sqrt(fan-in), fan-in being the product of ``axis`` sizes."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=axes, out_axis=-1)


def param(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype,
    init: Initializer | None = None,
) -> jax.Array:
    """Declare a parameter with its logical axis names (used by ``sharding``'s rules)."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names for shape {tuple(shape)}")
    init = init or fan_in_init(0)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to x's dtype, then times the weight."""

    dim: int
    eps: float
    axis_name: str
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = param(self, "scale", (self.dim,), (self.axis_name,), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = w.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (self.dim,))
        return w * normed.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); used by dense layers and the shared expert."""

    hidden: int
    inner: int
    inner_axis: str
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d, f = self.hidden, self.inner
        w_gate = param(self, "w_gate", (d, f), ("embed", self.inner_axis), self.dtype)
        w_up = param(self, "w_up", (d, f), ("embed", self.inner_axis), self.dtype)
        w_down = param(self, "w_down", (f, d), (self.inner_axis, "embed"), self.dtype)
        x = x_BTD.astype(self.dtype)
        h_BTF = jax.nn.silu(jnp.einsum("BTD,DF->BTF", x, w_gate)) * jnp.einsum(
            "BTD,DF->BTF", x, w_up
        )
        return jnp.einsum("BTF,FD->BTD", h_BTF, w_down)
