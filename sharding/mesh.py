"""The device mesh: three axes named by role, ``('data', 'expert', 'tensor')``.

- ``data``: independent replicas of the model, each serving its own slice of the batch.
- ``expert``: routed experts are split over it (with ``tensor``, see ``sharding.rules``).
- ``tensor``: attention heads, the dense and shared MLPs and the vocabulary are split over it.

Axis types are always ``Auto``. With ``Explicit`` axes (JAX's default now) every op's output
sharding becomes part of its type: ``shard_map`` then insists on inputs already sharded as its
``in_specs`` and einsums over a sharded contraction raise instead of inserting the reduction.
The model is written in logical names and lets the partitioner place the collectives (with a
few ``with_sharding_constraint`` hints and one ``shard_map`` for the experts), which is what
``Auto`` is for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "expert", "tensor")


def make_mesh(
    data: int = 1, expert: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A ``Mesh`` of shape (data, expert, tensor) over ``devices`` (default: all of JAX's).

    The product must equal the number of devices: a mesh that leaves devices idle is almost
    always a mistake in a launch command, so it is refused rather than silently using a subset.
    Device order follows ``jax.make_mesh`` (topology-aware on TPU, so ``tensor`` neighbours sit
    on the fastest links), splitting a physical torus axis where a mesh axis needs it.
    """
    shape = (data, expert, tensor)
    for name, size in zip(AXES, shape, strict=True):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x tensor={tensor} = {math.prod(shape)} devices, "
            f"but {len(devices)} devices are available ({devices[0].platform}); "
            "the product of the axis sizes must equal the device count"
        )
    axis_types = (AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # jax.make_mesh maps each mesh axis onto whole physical torus axes, and some shapes
        # have no such assignment (expert=8 on a v5p 4x4x2 torus). Splitting a physical axis
        # between mesh axes still places every device once; neighbours are then less regular.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=axis_types)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,expert=32,tensor=1"`` -> ``{"data": 1, "expert": 32, "tensor": 1}``.

    Axes left out default to 1; unknown axis names are refused.
    """
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"--mesh: expected comma-separated {'/'.join(AXES)}=N, got {part!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: {name} must be an integer, got {value!r}") from None
    return sizes
