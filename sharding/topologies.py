"""TPU chips and slice names: per-chip HBM and bandwidth, and slice name -> topology string.

Slice names follow Cloud TPU: ``v5e-N`` and ``v6e-N`` count chips; ``v5p-N`` and ``tpu7x-N``
count TensorCores, two a chip (a v5p-64 is 32 chips). The topology strings are what
``jax.experimental.topologies.get_topology_desc(topology_name=..., platform="tpu")`` takes.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 2**30

# A stated assumption, not a measurement: every collective costs at least this long whatever
# its size. ICI's per-hop latency is about 1 us (the scaling book, "How to Think About TPUs",
# jax-ml.github.io/scaling-book); a small all-reduce over the ~10 hops of a bidirectional ring
# across a 32-64 chip torus is then ~10 us. At decode, where every collective carries a few KB,
# this term, not the bandwidth, is what collectives cost.
COLLECTIVE_LATENCY_S = 10e-6


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, HBM bandwidth (bytes/s), TensorCores a slice name counts, peak
    bf16 FLOP/s, ICI bandwidth (bytes/s per chip, one direction summed over its links) and the
    latency charged per collective (seconds)."""

    name: str
    hbm_bytes: int
    hbm_bandwidth: float
    cores_per_chip_in_name: int
    peak_flops: float = 0.0
    ici_bandwidth: float = 0.0
    collective_latency_s: float = COLLECTIVE_LATENCY_S


# HBM and bandwidth as in ../shared/K2_REFERENCE.md ("Sizes that set the hardware"). Peak bf16
# FLOP/s and the bidirectional ICI bandwidth per chip from Cloud TPU's system-architecture pages
# (cloud.google.com/tpu/docs/v5e, /v5p, /v6e, /tpu7x): v5e 197 TFLOP/s, 400 GB/s; v5p 459
# TFLOP/s, 1200 GB/s; v6e 918 TFLOP/s, 800 GB/s; TPU7x (Ironwood) 4614 TFLOP/s FP8, taken as
# 2307 bf16, 1200 GB/s. A collective's bytes are charged against half the ICI figure (what a
# chip receives, one direction).
CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", 16 * 10**9, 819e9, 1, 197e12, 400e9 / 2),
    "v5p": Chip("v5p", 95 * GIB, 2765e9, 2, 459e12, 1200e9 / 2),
    "v6e": Chip("v6e", 32 * 10**9, 1638e9, 1, 918e12, 800e9 / 2),
    "tpu7x": Chip("tpu7x", 192 * GIB, 7.4e12, 2, 2307e12, 1200e9 / 2),
}

# Chips -> physical topology. 2-D tori for v5e/v6e, 3-D for v5p and TPU7x.
_TOPOLOGY_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_TOPOLOGY_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "4x4x2",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named slice: its chip, chip count and ``get_topology_desc`` name."""

    name: str
    chip: Chip
    chips: int
    topology: str


def resolve(name: str) -> Slice:
    """``"v5p-64"`` -> Slice(v5p, 32 chips, "v5p:4x4x2"); also accepts ``"v6e:8x8"`` itself."""
    m = re.fullmatch(r"(v5e|v5p|v6e|tpu7x)-(\d+)", name)
    if m:
        chip = CHIPS[m.group(1)]
        cores = int(m.group(2))
        if cores % chip.cores_per_chip_in_name:
            raise ValueError(f"{name}: {chip.name} slice names count TensorCores, two a chip")
        chips = cores // chip.cores_per_chip_in_name
        table = _TOPOLOGY_2D if chip.name in ("v5e", "v6e") else _TOPOLOGY_3D
        if chips not in table:
            raise ValueError(f"{name}: no known {chip.name} topology of {chips} chips")
        return Slice(name, chip, chips, f"{chip.name}:{table[chips]}")
    m = re.fullmatch(r"(v5e|v5p|v6e|tpu7x):(\d+(?:x\d+)+)", name)
    if m:
        dims = [int(d) for d in m.group(2).split("x")]
        chips = 1
        for d in dims:
            chips *= d
        return Slice(name, CHIPS[m.group(1)], chips, name)
    raise ValueError(
        f"unknown topology {name!r}: use e.g. v5e-16, v5p-64, v6e-64, tpu7x-8 or v5p:4x4x2"
    )


def topology_desc(topology: str):
    """``jax.experimental.topologies.get_topology_desc`` for TPU ``topology``, ahead of time.

    On a host with no TPU, libtpu (loaded on first use) prints five lines of errors while it
    looks for the local chips (accelerator type, worker hostnames) unless told what it runs on;
    saying "this one host, the named slice type" keeps it quiet and changes nothing about the
    program compiled for ``topology``. A real TPU VM's own settings are left alone.
    """
    import os

    from jax.experimental import topologies as jtop

    from k2jax.kernels.platform import has_accelerator_device

    if has_accelerator_device():
        return jtop.get_topology_desc(topology_name=topology, platform="tpu")
    defaults = {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": _accelerator_type(topology),
        "TPU_WORKER_HOSTNAMES": "localhost",
    }
    saved = {name: os.environ.get(name) for name in defaults}
    for name, value in defaults.items():
        # libtpu writes "WARNING: could not determine ..." into these when it found nothing,
        # and child processes inherit that: treat it as unset.
        if not saved[name] or saved[name].startswith("WARNING"):
            os.environ[name] = value
    try:
        return jtop.get_topology_desc(topology_name=topology, platform="tpu")
    finally:
        # libtpu read them when it loaded; left set they would tell this process's children
        # (a multi-host launcher, for one) that they run on a TPU VM.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _accelerator_type(topology: str) -> str:
    """``"v5p:4x4x2"`` -> ``"v5p-64"`` (the Cloud TPU accelerator-type string libtpu expects)."""
    slice_ = resolve(topology)
    return f"{slice_.chip.name}-{slice_.chips * slice_.chip.cores_per_chip_in_name}"
