"""``sharding.plan``: the full K2 Thinking decode step compiled by XLA:TPU for real slices.

The full-size runs compile the 1T-parameter model ahead of time on this CPU-only machine
(about a minute each here), so they are marked slow; CI runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import reference

from k2jax import model as k2model
from k2jax.model.config import Config
from sharding import plan, rules, topologies
from sharding.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K2_CONFIG = os.path.join(ROOT, "..", "shared", "k2", "kimi-k2-thinking.config.json")
GB = 1e9


def _have_libtpu() -> bool:
    try:
        from jax.experimental import topologies as jtop

        jtop.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
        return True
    except Exception:
        return False


def test_topology_names():
    s = topologies.resolve("v5p-64")
    assert (s.chips, s.topology) == (32, "v5p:4x4x2")
    assert topologies.resolve("v6e-64").topology == "v6e:8x8"
    assert topologies.resolve("v5e-16").topology == "v5e:4x4"
    assert topologies.resolve("v5p:2x2x1").chips == 4
    with pytest.raises(ValueError, match="unknown topology"):
        topologies.resolve("v9-8")


def test_k2_weights_total_594_gb_and_split_by_rules():
    """The arithmetic the plan reports: 570.8 GB INT4 experts + 23.4 GB bf16 = 594.2 GB."""
    cfg = Config.from_hf(K2_CONFIG)
    mesh = make_mesh(expert=8, tensor=1)  # the 8 CPU devices; only the mesh shape matters
    split = rules.param_bytes_per_device(cfg, mesh)
    total = sum(t for t, _ in split.values())
    experts = sum(t for p, (t, _) in split.items() if "/experts/" in p)
    assert round(total / GB, 1) == 594.2
    assert round(experts / GB, 1) == 570.8
    per_device = sum(d for _, d in split.values())
    assert per_device == (total - experts) + experts // 8


def test_plan_tiny_on_tpu_topology_or_cpu_fallback():
    cfg = Config.from_hf(reference.hf_config_dict(num_attention_heads=8, num_key_value_heads=8))
    r = plan.plan(cfg, {"data": 1, "expert": 2, "tensor": 2}, topology="v5p-8", context=256)
    if _have_libtpu():
        assert r["compiler"].startswith("XLA:TPU (v5p:2x2x1")
    else:
        assert r["compiler"].startswith("fake CPU devices")
    shapes = k2model.abstract_params(cfg, jnp.bfloat16)
    total = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    assert r["total_weight_bytes_all_devices"] == total
    assert r["temp_bytes"] >= 0 and r["bytes_accessed"] > 0
    assert r["total_bytes"] == r["weight_bytes"] + r["kv_cache_bytes"] + r["temp_bytes"]
    # The compiler's argument bytes are the weights plus the cache plus the token inputs.
    assert r["argument_bytes"] >= r["weight_bytes"] + r["kv_cache_bytes"]


def _run_plan(*args: str) -> dict:
    # This pytest process may already hold libtpu (the in-process plan test); without this the
    # child cannot load it and falls back to CPU devices.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)  # the CLI sizes the CPU fallback itself
    out = subprocess.run(
        [sys.executable, "-m", "sharding.plan", "--config", K2_CONFIG, "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("topology", "mesh", "expert_ways"),
    [("v5p-64", "data=1,expert=32,tensor=1", 32), ("v6e-64", "data=1,expert=8,tensor=8", 64)],
)
def test_full_k2_plan_compiles_for_tpu(topology, mesh, expert_ways):
    assert _have_libtpu(), "libtpu is part of the test extra; the TPU compiler must be used"
    r = _run_plan("--topology", topology, "--mesh", mesh, "--batch", "1", "--context", "8192")
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    # The kernels' copies are counted for a stated routing, on the busiest shard per layer:
    # at batch 1 the 8 choices land on at most 8 shards, so the busiest copies at least one
    # expert's INT4 payload per layer (24.8 MB) and at most 8; the mean is far below it.
    per_expert, layers = 3 * (2048 * 7168 // 2 + 2048 * 7168 // 32 * 2), 60
    assert per_expert * layers <= r["kernel_bytes"] <= 8 * per_expert * layers * 1.1
    assert r["kernel_bytes_mean"] < r["kernel_bytes"]
    assert r["bytes_accessed"] == r["bytes_accessed_xla"] + r["kernel_bytes"]
    assert "seed" in r["kernel_routing"]
    for key in ("weight_bytes", "kv_cache_bytes", "temp_bytes", "total_bytes", "hbm_bytes"):
        assert isinstance(r[key], int) and r[key] >= 0, key
    assert r["bytes_accessed"] > 0
    # Weight bytes per device agree with the arithmetic: experts / ways + the rest by its rules.
    split = r["weight_split"]
    assert round(r["total_weight_bytes_all_devices"] / GB, 1) == 594.2
    experts = split["routed experts (INT4 + scales)"]
    assert experts["per_device"] == experts["total"] // expert_ways
    tensor = int(mesh.rsplit("=", 1)[1])
    for kind in ("attention (MLA)", "dense MLP", "shared experts", "embed + lm_head"):
        assert split[kind]["per_device"] <= split[kind]["total"] // tensor + 3 * GB, kind
    assert r["weight_bytes"] == sum(row["per_device"] for row in split.values())
    assert r["fits"], r


@pytest.mark.slow
def test_v6e_16_does_not_fit():
    """16 v6e chips hold 512 GB: less than the 594 GB of weights alone."""
    r = _run_plan("--topology", "v6e-16", "--mesh", "expert=4,tensor=4")
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    assert r["weight_bytes"] > r["hbm_bytes"] and not r["fits"]
    assert "RESOURCE_EXHAUSTED" in r["compile_error"]
