"""Which platform k2jax targets: for a traced program (``target_platform``), and for a
command-line run, decided before JAX is imported (``default_to_cpu_without_accelerators``).

libtpu is installed with the test extra (for ahead-of-time TPU compilation on any host), and
on start-up it probes for TPU chips, printing errors on hosts that have none before JAX falls
back to the CPU. The CLIs call ``default_to_cpu_without_accelerators()`` first: on a host with
no TPU (``/dev/accel*``, ``/dev/vfio``) and no NVIDIA GPU device, and no ``JAX_PLATFORMS``
chosen by the user, they start on the CPU directly. An explicit ``JAX_PLATFORMS`` always wins.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections.abc import Iterator

ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def has_accelerator_device() -> bool:
    """Whether this host shows a TPU or NVIDIA GPU device file (cheap: no JAX, no libtpu)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def default_to_cpu_without_accelerators() -> None:
    """Set ``JAX_PLATFORMS=cpu`` when unset and this host shows no accelerator device."""
    if "JAX_PLATFORMS" in os.environ or has_accelerator_device():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (e.g. by the package): set its flag too
        sys.modules["jax"].config.update("jax_platforms", "cpu")


TARGET_ENV = "K2JAX_TARGET"
TARGETS = ("tpu", "cpu")
_target_stack: list[str] = []


@contextlib.contextmanager
def target(platform: str) -> Iterator[None]:
    """Within this block k2jax chooses exactly what it chooses on ``platform`` (expert layout,
    kernels, attention form), whatever the backend: ``with target("tpu"):`` on a CPU runs the
    TPU path, its Pallas kernels in TPU interpret mode (``interpret_params``). The same as
    ``K2JAX_TARGET=tpu`` in the environment, for one block."""
    if platform not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {platform!r}")
    _target_stack.append(platform)
    try:
        yield
    finally:
        _target_stack.pop()


def target_override() -> str | None:
    """The target chosen by ``target(...)`` or ``K2JAX_TARGET``; None when neither is set."""
    if _target_stack:
        return _target_stack[-1]
    chosen = os.environ.get(TARGET_ENV, "").strip().lower()
    if not chosen:
        return None
    if chosen not in TARGETS:
        raise ValueError(f"{TARGET_ENV}={chosen!r}: must be one of {TARGETS} (or unset)")
    return chosen


def interpret_params():
    """How Pallas TPU kernels run off TPU: the TPU interpreter, reading out of bounds an
    error, uninitialized memory NaN, and races between DMAs and compute detected.

    One exception, measured: inside a ``shard_map`` over several fake CPU devices the TPU
    interpreter hangs (every kernel call waits on a barrier across all devices, which the
    devices' serialized host callbacks never reach together; seen with 2 and 8 devices, any
    InterpretParams), so there the kernel runs in Pallas' plain interpreter (``True``), which
    computes the same values but clamps block indices instead of raising. The out-of-bounds
    and race checks therefore run in the single-device tests.
    """
    import jax
    from jax.experimental.pallas import tpu as pltpu

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return True
    return pltpu.InterpretParams(
        out_of_bounds_reads="raise", detect_races=True, uninitialized_memory="nan"
    )


def target_platform() -> str:
    """The platform the program being traced runs on: the target chosen by ``target(...)`` or
    ``K2JAX_TARGET`` if any, else the context mesh's devices if a mesh is set (so
    ahead-of-time compilation for a TPU topology from a CPU host picks TPU forms), else JAX's
    default backend."""
    import jax  # not at the top: the CLIs import this module before JAX may start

    override = target_override()
    if override is not None:
        return override
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()
