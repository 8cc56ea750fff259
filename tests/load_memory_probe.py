"""Load a checkpoint onto 8 fake devices with the TPU target and report host memory as JSON.

Run as a subprocess by tests/test_load_memory.py (the fake devices and the target must be set
before JAX starts). On CPU devices a device buffer is host memory, so the finished params are
part of the process's RSS; what the loader must bound is the rest: the peak RSS during the load
minus the RSS before it minus the bytes of the finished params (every device's shards). The
peak is the kernel's own ``VmHWM``, reset just before the load through ``/proc/self/clear_refs``.

    python tests/load_memory_probe.py CHECKPOINT_DIR EXPERT TENSOR
"""

from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def nbytes(array) -> int:
    """Bytes ``array`` occupies: XLA stores int4 packed two to a byte, while ``.nbytes``
    counts one byte per element."""
    bits = 4 if array.dtype in (jnp.int4, jnp.uint4) else array.dtype.itemsize * 8
    return array.size * bits // 8


def held_bytes(arrays) -> int:
    """Bytes of the device buffers behind ``arrays`` (every shard on every device)."""
    return sum(nbytes(s.data) for a in arrays for s in a.addressable_shards)


def main() -> None:
    path, expert, tensor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import jax

    import k2jax
    from k2jax.model.config import Config
    from sharding.mesh import make_mesh

    mesh = make_mesh(expert=expert, tensor=tensor)
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # JAX's runtime up before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    model = k2jax.load(path, dtype="bfloat16", mesh=mesh)
    jax.block_until_ready(model.params)
    peak = _status_bytes("VmHWM")
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    held = held_bytes(leaf for _, leaf in leaves)
    whole_expert_stack_on_a_device = [
        jax.tree_util.keystr(p)
        for p, leaf in leaves
        if "experts" in jax.tree_util.keystr(p)
        and any(s.data.shape == leaf.shape for s in leaf.addressable_shards)
    ]
    cfg = Config.from_hf(os.path.join(path, "config.json"))
    experts = model.params["moe_layers"]["moe"]["experts"]
    one_layer = sum(nbytes(leaf) // cfg.num_moe_layers for leaf in experts.values()) + sum(
        nbytes(leaf) // leaf.shape[0]
        for p, leaf in jax.tree_util.tree_flatten_with_path(model.params["moe_layers"])[0]
        if "experts" not in jax.tree_util.keystr(p)
    )
    print(
        json.dumps(
            {
                "rss_before": before,
                "peak": peak,
                "params_bytes_on_devices": held,
                "one_layer_bytes": one_layer,
                "expert_bytes": sum(nbytes(leaf) for leaf in experts.values()),
                "layout": sorted(experts),
                "whole_expert_stack_on_a_device": whole_expert_stack_on_a_device,
            }
        )
    )


if __name__ == "__main__":
    main()
