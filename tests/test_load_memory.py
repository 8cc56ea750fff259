"""Loading K2 onto a slice holds one layer beyond the params, never a second copy of a stack.

Two converted checkpoints with the same layer shapes, 3 and 17 layers (synthetic weights in
K2's on-disk format, ``benchmarks/convert_memory.py``), are loaded with the TPU target onto 8
fake devices, expert-parallel, each in its own process (``load_memory_probe.py``). On CPU
devices the params are host memory, so the probe reports the peak RSS during the load beyond the
RSS before it and beyond the finished params' bytes: what the loader itself held at its worst.
That must stay under one layer plus a constant, and must not grow with the number of layers (a
loader that repacked a whole projection stack at once, assembled the model on the host, or let
asynchronous dispatch run several layers ahead, grows by tens of megabytes a layer here).

glibc's dynamic mmap threshold would keep freed per-layer buffers in the heap (RSS that counts
memory the process has already freed, growing with the number of layers read), so the probe
runs with a fixed threshold (``MALLOC_MMAP_THRESHOLD_``): large buffers go back to the system
when freed, and RSS measures what is held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import convert_memory  # noqa: E402

MB = 1 << 20
CONSTANT = 128 * MB  # JAX/XLA programs compiled by the load, orbax and tensorstore buffers


def _probe(path) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "K2JAX_TARGET": "tpu",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "load_memory_probe.py"), str(path), "8", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["beyond_params"] = (
        report["peak"] - report["rss_before"] - report["params_bytes_on_devices"]
    )
    return report


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from convert.converter import convert

    root = tmp_path_factory.mktemp("load_memory")
    out = {}
    for layers in (3, 17):
        hf = root / f"hf{layers}"
        convert_memory.build(str(hf), layers=layers, experts=32, vocab=1024)
        convert(hf, root / f"k2_{layers}", dtype="bfloat16", quiet=True)
        out[layers] = root / f"k2_{layers}"
    return out


def test_a_converted_load_holds_one_layer_beyond_the_params(checkpoints):
    shallow, deep = _probe(checkpoints[3]), _probe(checkpoints[17])
    for report in (shallow, deep):
        assert report["whole_expert_stack_on_a_device"] == []
        assert report["layout"] == sorted(
            f"{p}_{n}" for p in ("gate", "up", "down") for n in ("values", "group_scale")
        )
    layer = deep["one_layer_bytes"]
    assert deep["params_bytes_on_devices"] > 3 * (layer + CONSTANT)  # a bound that can bite
    assert deep["beyond_params"] <= layer + CONSTANT, (
        f"the load held {deep['beyond_params'] / MB:.0f} MB beyond its params; one layer is "
        f"{layer / MB:.0f} MB"
    )
    growth = deep["beyond_params"] - shallow["beyond_params"]
    assert growth <= layer, (
        f"14 more layers made the load hold {growth / MB:.0f} MB more (one layer is "
        f"{layer / MB:.0f} MB): something is held per layer"
    )
