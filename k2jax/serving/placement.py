"""Host arrays onto devices, the one way that works on one process and on several.

Every process holds the same host copy (each read the same checkpoint file or built the same
step inputs), so each device's shard can be cut from it locally: no device ever receives a
whole array it does not own, and no process needs another's data.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def place(host, sharding: jax.sharding.Sharding) -> jax.Array:
    """``host`` (numpy-convertible) as a global array laid out by ``sharding``."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: Mesh) -> NamedSharding:
    """A copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def row_major(sharding: jax.sharding.Sharding, ndim: int) -> Format:
    """``sharding`` with the array's layout pinned row-major (the page pool's).

    XLA:TPU's default layout for a pool such as bf16[L, P, 64, W] can put the page axis
    minor-most (W = 576 or 40 fills 128 lanes poorly); the Pallas kernels and the cache scatter
    need it row-major, so a step with the default layout copied the whole pool in and out every
    step (two whole-pool copies; measured in the compiled TPU program, docs/sharding.md)."""
    return Format(Layout(tuple(range(ndim))), sharding)


def place_replicated(tree, mesh: Mesh):
    """Every host array of ``tree`` copied to every device of ``mesh`` (any process)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda host: place(host, sharding), tree)
