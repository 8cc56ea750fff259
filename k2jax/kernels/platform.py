"""Which platform k2jax targets: for a traced program (``target_platform``), and for a
command-line run, decided before JAX is imported (``default_to_cpu_without_accelerators``).

libtpu is installed with the test extra (for ahead-of-time TPU compilation on any host), and
on start-up it probes for TPU chips, printing errors on hosts that have none before JAX falls
back to the CPU. The CLIs call ``default_to_cpu_without_accelerators()`` first: on a host with
no TPU (``/dev/accel*``, ``/dev/vfio``) and no NVIDIA GPU device, and no ``JAX_PLATFORMS``
chosen by the user, they start on the CPU directly. An explicit ``JAX_PLATFORMS`` always wins.
"""

from __future__ import annotations

import glob
import os
import sys

ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def default_to_cpu_without_accelerators() -> None:
    """Set ``JAX_PLATFORMS=cpu`` when unset and this host shows no accelerator device."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (e.g. by the package): set its flag too
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def target_platform() -> str:
    """The platform the program being traced runs on: the context mesh's devices if a mesh is
    set (so ahead-of-time compilation for a TPU topology from a CPU host picks TPU forms), else
    JAX's default backend."""
    import jax  # not at the top: the CLIs import this module before JAX may start

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()
