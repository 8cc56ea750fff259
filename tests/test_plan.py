"""``sharding.plan``: the full K2 Thinking decode step compiled by XLA:TPU for real slices.

The full-size runs compile the 1T-parameter model ahead of time on this CPU-only machine
(about a minute each here), so they are marked slow; CI runs them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import reference

from k2jax import model as k2model
from k2jax.model.config import Config
from sharding import collectives, plan, rules, search, topologies
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
    # Everything is split over the 8 chips but the routers and the norms (q_a and kv_a over
    # their inputs: the decode table's ``down_in``).
    whole = ("w_router", "e_score", "norm")
    per_device = sum(d for _, d in split.values())
    assert per_device == sum(
        t if any(w in p for w in whole) else t // 8 for p, (t, _) in split.items()
    )


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


def test_a_negative_xla_count_gives_a_warning_and_no_roofline(monkeypatch):
    """XLA's per-MoE-layer bytes are a difference of two programs' counts; where that comes
    out negative (K2 at batch 1 on v6e-64 with the MoE-less program as the reference, before:
    XLA:TPU prefetched the lm_head into VMEM in the smaller program only) the plan warns and
    makes no roofline from the count."""
    real = plan._per_step

    def negative(*args):
        total, _, flops = real(*args)
        return total, -1.0, flops

    monkeypatch.setattr(plan, "_per_step", negative)
    r = plan.plan(_tiny_cfg(), {"data": 1, "expert": 2, "tensor": 2}, topology="v5p-8")
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    assert len(r["warnings"]) == 1 and "negative" in r["warnings"][0]
    for key in ("roofline_step_s", "tokens_per_s_per_chip", "hbm_s", "step_time_lower_bound_s"):
        assert r[key] is None, key


def test_each_extra_moe_pass_adds_one_layer_of_xla_bytes():
    """The plan's one MoE layer is (the MoE stack run twice) less (run once): a premise that
    each extra loop over the stack adds the same body. A third pass must add what the second
    did (K2 on v5p-64 at batch 1, 8 and 512 and on v6e-64 at batch 1 it does to 0.6%; at batch
    256 on v5p-64 the third added 304 MB to the second's 259, docs/sharding.md)."""
    cfg = _tiny_cfg()
    devices = plan._devices(topologies.resolve("v5p-8"), 4)[0]
    mesh = make_mesh(1, 2, 2, devices=devices)
    shape = (2, 256, 16)
    counts = [plan._cost(cfg, mesh, jnp.bfloat16, "decode", shape, True, n)[0] for n in (1, 2, 3)]
    second, third = counts[1] - counts[0], counts[2] - counts[1]
    assert second > 0 and third == pytest.approx(second, rel=0.01), counts


def _tiny_cfg() -> Config:
    return Config.from_hf(reference.hf_config_dict(num_attention_heads=8, num_key_value_heads=8))


def test_plan_picks_a_layout_and_reports_the_roofline():
    """No mesh: the search ranks every factorization of the slice and compiles the best that
    fits; the roofline fields follow from the compiled program's figures and the chip's."""
    cfg = _tiny_cfg()
    r = plan.plan(cfg, None, topology="v5p-8", batch=1, context=256)
    chips = topologies.resolve("v5p-8").chips
    assert math.prod(r["mesh"].values()) == chips and r["fits"]
    ranked = search.rank(cfg, topologies.resolve("v5p-8"), batch=1, context=256, page_size=64)
    best = ranked[0]
    assert r["layout_search"]["chosen"] == f"{best.mesh} {best.strategy}"
    assert r["mesh"] == best.mesh and "est. ms" in r["layout_search"]["why"]
    # libtpu is part of the test extra: the roofline below needs the TPU compiler's program.
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    # The decode step's collectives, from the compiled HLO: per layer the attention output's
    # all-reduce and the MoE's (the shared expert's merged into it), each of [batch = 1, 1, D]
    # bf16, plus the embedding's, over the chips that split the weights; and where the layout
    # splits q_a and kv_a over their inputs, their partial outputs summed in one float32
    # all-reduce a layer. (On this tiny model that costs more latency than it saves reads, so
    # the search may well pick a layout without it.)
    assert r["strategy"] in ("decode", "dp_attention"), r["layout_search"]
    ways = r["mesh"]["expert"] * r["mesh"]["tensor"]
    down = any(r["mesh"][a] > 1 for a in rules.rules_for(r["strategy"])["down_in"])
    assert r["ici_ops"] == {"all-reduce": 1 + (3 if down else 2) * cfg.num_layers}
    ring = 2 * (ways - 1) / ways  # bytes a chip sends per byte of the reduced array
    low_rank = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    sent = (1 + 2 * cfg.num_layers) * cfg.hidden_size * 2 + down * cfg.num_layers * low_rank * 4
    assert r["ici_bytes"]["all-reduce"] == pytest.approx(ring * sent)
    chip = topologies.CHIPS["v5p"]
    coll = r["ici_ops"]["all-reduce"] * chip.collective_latency_s
    coll += r["ici_bytes"]["all-reduce"] / chip.ici_bandwidth
    assert r["collective_s"] == pytest.approx(coll)
    assert r["hbm_s"] == pytest.approx(r["bytes_accessed"] / chip.hbm_bandwidth)
    assert r["compute_s"] == pytest.approx(r["flops"] / chip.peak_flops)
    assert r["flops"] >= r["flops_xla"] > 0
    step = max(r["hbm_s"], r["compute_s"]) + r["collective_s"]
    assert r["roofline_step_s"] == pytest.approx(step)
    assert r["tokens_per_s_per_user"] == pytest.approx(1 / step)
    assert r["tokens_per_s_per_chip"] == pytest.approx(1 / step / chips)
    per_token = cfg.num_layers * cfg.cache_width * 2
    free = r["hbm_bytes"] - r["weight_bytes"] - r["temp_bytes"]
    assert r["kv_capacity_tokens"] == free // per_token


def test_at_batch_above_one_each_strategy_is_compiled_and_the_fastest_kept():
    """The estimate leaves out activations, which grow with the batch and differ by strategy,
    so with a batch of 8 the plan compiles the best fitting layout of every strategy and keeps
    the lowest compiled roofline step."""
    assert _have_libtpu(), "libtpu is part of the test extra; the TPU compiler must be used"
    cfg = _tiny_cfg()
    r = plan.plan(cfg, None, topology="v5p-8", batch=8, context=256)
    compiled = r["layout_search"]["compiled"]
    ranked = search.rank(cfg, topologies.resolve("v5p-8"), batch=8, context=256, page_size=64)
    assert {c.split(" ")[1].rstrip(":") for c in compiled} == {c.strategy for c in ranked}
    steps = {c.split(":")[0]: float(c.rsplit(", ", 1)[1].split()[0]) for c in compiled}
    fastest = min(steps, key=steps.get)
    assert fastest.endswith(r["strategy"]) and steps[fastest] == pytest.approx(
        r["roofline_step_s"] * 1e3, abs=0.01
    )


def test_collectives_counts_loop_trips_and_group_sizes():
    """A hand-written HLO module: an all-reduce at the top, an async all-gather in a loop body
    run 5 times (bound read from the loop condition), groups written both ways."""
    text = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %ag = (f32[2], f32[8]) all-gather-start(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[8] all-gather-done(%ag)
  ROOT %t = (s32[], f32[8]) tuple(%i, %agd)
}

ENTRY %main (a: bf16[4,16]) -> bf16[4,16] {
  %a = bf16[4,16] parameter(0)
  %ar = bf16[4,16] all-reduce(%a), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%sum
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[4,16] copy(%ar)
}
"""
    ops = collectives.collectives(text, 8)
    mesh_form = "replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_0','axis_1'},"
    assert collectives.group_size(mesh_form, 16) == 8
    assert collectives.group_size("replica_groups=[2,4]<=[8]", 8) == 4
    assert ops["all-reduce"] == {"count": 1, "bytes": 2 * (1 / 2) * 4 * 16 * 2}
    assert ops["all-gather"] == {"count": 5, "bytes": 5 * (3 / 4) * 8 * 4}
    assert collectives.collective_seconds(ops, 1e9, 1e-5) == pytest.approx(6e-5 + (128 + 120) / 1e9)


def test_cli_batch_list_and_plot(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(reference.hf_config_dict(num_attention_heads=8, num_key_value_heads=8))
    )
    png = tmp_path / "plan.png"
    args = ["--config", str(path), "--topology", "v5p-8", "--context", "128", "--json"]
    assert plan.main([*args, "--batch", "1,4", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in rows] == [1, 4]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = plan.format_rows(rows)
    assert len(text.splitlines()) == 3 and "tok/s/chip" in text
    with pytest.raises(SystemExit):
        plan.main([*args, "--batch", "1,x"])
    assert "expected integers" in capsys.readouterr().err


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
    ("topology", "mesh", "ways"), [("v5p-64", None, 32), ("v6e-64", "data=1,expert=8,tensor=8", 64)]
)
def test_full_k2_plan_compiles_for_tpu(topology, mesh, ways):
    """v5p-64 with the layout the plan picks, v6e-64 with a given mesh."""
    assert _have_libtpu(), "libtpu is part of the test extra; the TPU compiler must be used"
    chosen = ("--mesh", mesh) if mesh else ()
    r = _run_plan("--topology", topology, *chosen, "--batch", "1", "--context", "8192")
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    assert r["mesh"]["data"] == 1 and r["mesh"]["expert"] * r["mesh"]["tensor"] == ways
    # The kernels' copies are counted for a stated routing, on the busiest shard per layer:
    # at batch 1 the 8 choices land on at most 8 shards, so the busiest copies at least one
    # expert's INT4 payload per layer (24.8 MB) and at most 8; the mean is far below it. Where
    # the decode table splits each expert's intermediate axis over tensor (into slices of at
    # least 256 of its 2,048), a chip copies its slice of each: 1/tensor of an expert.
    assert r["expert_split"] == {"experts": ["expert"], "intermediate": ["tensor"]}
    slices = r["mesh"]["tensor"]
    assert 2048 // slices >= 256
    per_expert, layers = 3 * (2048 * 7168 // 2 + 2048 * 7168 // 32 * 2) // slices, 60
    experts = r["kernel_bytes_experts"]
    assert per_expert * layers <= experts <= 8 * per_expert * layers * 1.1
    assert r["kernel_bytes_experts_mean"] < experts
    # The paged-MLA kernel reads each layer's 8,192 cached latents (576 bf16 values) once.
    kv_read = 61 * 8192 * 576 * 2
    assert kv_read <= r["kernel_bytes_attention"] <= 1.05 * kv_read
    assert r["kernel_bytes"] == experts + r["kernel_bytes_attention"]
    assert r["bytes_accessed"] == r["bytes_accessed_xla"] + r["kernel_bytes"]
    assert "seed" in r["kernel_routing"]
    for key in ("weight_bytes", "kv_cache_bytes", "temp_bytes", "total_bytes", "hbm_bytes"):
        assert isinstance(r[key], int) and r[key] >= 0, key
    # Weight bytes per device agree with the arithmetic: everything split over all chips but
    # q_a, kv_a, routers and norms (2.2 GB whole on every chip).
    split = r["weight_split"]
    assert round(r["total_weight_bytes_all_devices"] / GB, 1) == 594.2
    experts = split["routed experts (INT4 + scales)"]
    assert experts["per_device"] == experts["total"] // ways
    for kind in ("dense MLP", "shared experts", "embed + lm_head"):
        assert split[kind]["per_device"] == split[kind]["total"] // ways, kind
    # MLA all split but its norms (the input norm and the two low-rank ones: 1.1 MB whole on
    # every chip).
    attn = split["attention (MLA)"]
    norms = 61 * (7168 + 1536 + 512) * 2
    assert attn["per_device"] <= attn["total"] // ways + norms
    assert r["weight_bytes"] == sum(row["per_device"] for row in split.values())
    # Three all-reduces a layer (attention output, MoE, q_a + kv_a) and one for the embedding,
    # read from the compiled program.
    assert r["ici_ops"] == {"all-reduce": 3 * 61 + 1}
    assert r["roofline_step_s"] >= max(r["hbm_s"], r["compute_s"]) > 0
    assert r["kv_capacity_tokens"] > 0
    assert r["fits"], r


@pytest.mark.slow
def test_k2_at_256k_is_planned_context_parallel_with_1_over_32_of_the_cache_a_chip():
    """v5p-64, batch 1, 262,144 positions, no mesh given: the search picks the striped pool
    (``context_parallel``) and the compiled program holds and reads 1/32 of the sequence's
    cache a chip (the kernel's copies counted over its grid), merged by two collectives a
    layer more than decode."""
    assert _have_libtpu(), "libtpu is part of the test extra; the TPU compiler must be used"
    r = _run_plan("--topology", "v5p-64", "--batch", "1", "--context", "262144")
    assert r["strategy"] == "context_parallel" and r["kv_pool_shards"] == 32, r["chosen"]
    pages = 262_144 // 64 // 32 + 1  # a chip's stripe of the sequence and its scratch page
    assert r["kv_cache_bytes"] == 61 * pages * 64 * 576 * 2 <= 1.0 * GB
    whole = 61 * 262_144 * 576 * 2  # the sequence's cache, 18.4 GB
    assert whole / 32 <= r["kernel_bytes_attention"] <= 1.05 * whole / 32
    assert r["ici_ops"]["all-reduce"] == 5 * 61 + 1 and r["ici_ops"]["all-gather"] == 61
    assert r["fits"] and r["kv_capacity_tokens"] > 20_000_000


@pytest.mark.slow
def test_v6e_16_does_not_fit():
    """16 v6e chips hold 512 GB: less than the 594 GB of weights alone."""
    r = _run_plan("--topology", "v6e-16", "--mesh", "expert=4,tensor=4")
    assert r["compiler"].startswith("XLA:TPU"), r["compiler"]
    assert r["weight_bytes"] > r["hbm_bytes"] and not r["fits"]
    assert "RESOURCE_EXHAUSTED" in r["compile_error"]


def test_the_engine_step_on_one_tpu_chip_keeps_the_pool_row_major():
    """The engine's step for a model on one TPU chip (no mesh), compiled ahead of time by
    XLA:TPU: the page pool comes in row-major, as the Pallas kernel and the cache scatter read
    it, and the step reads less than the same step without the pin (which the compiler gives a
    layout of its own, relaid out every step)."""
    import numpy as np
    from jax.experimental import topologies as jtop

    from k2jax.kernels.platform import target
    from k2jax.serving import engine, sampling

    assert _have_libtpu(), "libtpu is part of the test extra; the TPU compiler must be used"
    cfg = _tiny_cfg()
    device = jtop.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
    one = jax.sharding.SingleDeviceSharding(device)

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=one)

    slots, width, page = 8, 256, 64
    batch_sampling = sampling.BatchSampling.from_params([sampling.SamplingParams()] * slots)
    inputs = (
        jax.tree.map(
            lambda s: abstract(s.shape, s.dtype), k2model.abstract_params(cfg, jnp.bfloat16, "int4")
        ),
        abstract((cfg.num_layers, slots * width + 1, page, cfg.cache_width), jnp.bfloat16),
        abstract((slots, cfg.vocab_size), jnp.int8),
        *(abstract(s, jnp.int32) for s in ((slots, 1), (slots, 1), (slots, width), (slots,))),
        abstract((slots,), jnp.bool_),
        abstract((slots,), jnp.int32),
        jax.tree.map(lambda x: abstract(np.shape(x), np.asarray(x).dtype), batch_sampling),
    )
    costs, layouts = {}, {}
    with target("tpu"):
        for pin in (True, False):
            step = engine._step_fn(
                cfg, jnp.dtype(jnp.bfloat16), True, None, "tpu", None, (), device if pin else None
            )
            compiled = step.lower(*inputs).compile()
            # The program's entry layout of the pool parameter, minor-to-major.
            entry = compiled.as_text().split("entry_computation_layout={", 1)[1].split("\n")[0]
            pool_shape = "bf16[" + ",".join(map(str, inputs[1].shape)) + "]{"
            layouts[pin] = entry.split(pool_shape, 1)[1].split(":")[0].split("}")[0]
            costs[pin] = compiled.cost_analysis()["bytes accessed"]
    assert layouts[True] == "3,2,1,0"  # row-major
    assert costs[True] < costs[False], (costs, layouts)  # XLA chose 1,3,2,0: pages minor-most
