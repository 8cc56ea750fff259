"""Stacked parameters built on their devices one layer at a time.

A K2 layer stack is ``[L, ...]`` and its full size is hundreds of gigabytes; a loader that
assembled it on the host, or repacked it in one program, would need a second copy of it. Here
the stack is allocated once, already sharded, and each layer is written into it in place (a
donated ``dynamic_update_slice``), so a load holds at most one layer beyond the finished params:
on the host (the layer being read) and on the devices (the layer being placed or repacked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.serving import placement


def layer_sharding(stack_sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer ``stack[i]`` of a stack laid out by ``stack_sharding``."""
    if isinstance(stack_sharding, NamedSharding):
        spec = tuple(stack_sharding.spec)
        if spec and spec[0] is not None:
            raise ValueError(f"a stack split over its layer axis ({spec}) cannot be built by layer")
        return NamedSharding(stack_sharding.mesh, PartitionSpec(*spec[1:]))
    return stack_sharding  # one device: a layer lives where its stack does


def zeros(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """An array of zeros created directly in its sharding (no host copy, no one-device copy)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), index, 0)


def write_layer(stack: jax.Array, index: int, layer) -> jax.Array:
    """``stack`` with layer ``index`` set to ``layer`` (a device array in the layer's sharding,
    or a host array, which is placed shard by shard first). ``stack`` is donated: its buffers
    are updated in place, and the old handle must not be used again."""
    sharding = stack.sharding
    if not isinstance(layer, jax.Array):
        layer = placement.place(np.asarray(layer), layer_sharding(sharding))
    out = _write_layer(stack, layer, jnp.int32(index))
    if not out.sharding.is_equivalent_to(sharding, out.ndim):
        raise AssertionError(f"a layer write moved the stack from {sharding} to {out.sharding}")
    return out
