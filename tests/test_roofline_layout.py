"""Dense weights over every chip (``sharding.rules``' decode table), executed on the TPU target.

The decode rules split MLA's per-head projections (q_b, kv_b, o), the dense MLP, the shared
expert and embed/lm_head over expert x tensor, like the routed experts. Loaded onto 8 fake
devices under ``target("tpu")`` (int4 experts, the Pallas kernels in interpret mode, stacked
layers), each chip holds an eighth of each of them, and greedy generation through the engine
(``Engine.run``, the batch form: paged cache, chunked prefill, decode steps) gives
transformers' greedy tokens, which one device gives too (tests/test_tpu_target.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import reference

import k2jax
from k2jax.kernels.platform import target
from k2jax.serving import engine
from k2jax.serving.options import EngineConfig
from k2jax.serving.sampling import SamplingParams
from sharding import rules
from sharding.mesh import make_mesh

NEW = 12
# 8 heads, so that 8 devices split them; the other tiny sizes (96, 64, 256) divide by 8 too.
# A 512-wide expert intermediate axis, so that the decode table's ``expert_mlp`` split over
# tensor=2 leaves each chip 256 of it (the TPU kernel's smallest slice, k2jax.model.moe).
HEADS8 = {"num_attention_heads": 8, "num_key_value_heads": 8, "moe_intermediate_size": 512}
PROMPTS = reference.MIXED_PROMPTS
# Every weight the decode table splits over (expert, tensor), by params path.
SPLIT = [
    ("embed",),
    ("lm_head",),
    *[(stack, "attn", w) for stack in ("dense_layers", "moe_layers") for w in ("w_q_up", "w_k_up")],
    *[(stack, "attn", w) for stack in ("dense_layers", "moe_layers") for w in ("w_v_up", "w_o")],
    *[("dense_layers", "mlp", w) for w in ("w_gate", "w_up", "w_down")],
    *[("moe_layers", "moe", "shared", w) for w in ("w_gate", "w_up", "w_down")],
]


@pytest.fixture(autouse=True)
def tpu_target():
    with target("tpu"):
        yield


@pytest.fixture(scope="module")
def ref():
    return reference.build(seed=11, **HEADS8)


@pytest.fixture(scope="module")
def checkpoint(ref, tmp_path_factory):
    return reference.write_checkpoint(ref, tmp_path_factory.mktemp("heads8"))


def _engine(model, page_size=16):
    return engine.Engine(
        model.config,
        model.params,
        model.dtype,
        EngineConfig(max_batch=8, prefill_chunk=8, page_size=page_size),
        mesh=model.mesh,
        rules=model.rules,
    )


def _greedy(model, prompts, page_size=16):
    runner = _engine(model, page_size)
    greedy = SamplingParams(temperature=0.0)
    requests = [engine.Request(tuple(p), NEW, greedy, stop_token_ids=()) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for events in runner.run(requests):
        for event in events:
            out[event.index].append(event.token)
    return out


@pytest.fixture(scope="module")
def one_device(ref):
    """transformers' greedy tokens for the 8 prompts and for prompt 2 alone: what one device
    gives on the TPU target too (tests/test_tpu_target.py's one-device engine tests), so a
    layout that gives them gives the one-device tokens."""
    return (
        reference.greedy_batch(ref, PROMPTS, NEW)[0],
        reference.greedy_batch(ref, [PROMPTS[2]], NEW)[0],
    )


def _leaf(params, path):
    for key in path:
        params = params[key]
    return params


def test_dense_weights_over_all_chips_give_the_one_device_tokens(checkpoint, one_device):
    model = k2jax.load(checkpoint, dtype="float32", mesh=make_mesh(expert=4, tensor=2))
    for path in SPLIT:
        leaf = _leaf(model.params, path)
        assert {s.data.nbytes for s in leaf.addressable_shards} == {leaf.nbytes // 8}, path
    # The routed experts: 4 of the 16 a chip (expert=4), and of each the chip's half of the
    # intermediate axis (tensor=2): gate/up's output columns, down's input groups.
    experts = model.params["moe_layers"]["moe"]["experts"]
    for name, axis in (("gate_values", -1), ("up_values", -1), ("down_values", 2)):
        shapes = {s.data.shape for s in experts[name].addressable_shards}
        assert {(shape[1], shape[axis]) for shape in shapes} == {
            (4, experts[name].shape[axis] // 2)
        }, name
    # q_a and kv_a split over their inputs (decode's ``down_in``: one psum a layer joins
    # them); the router stays replicated (see sharding.rules for why).
    for stack in ("dense_layers", "moe_layers"):
        for name in ("w_q_down", "w_kv_down"):
            w = model.params[stack]["attn"][name]
            assert {s.data.shape for s in w.addressable_shards} == {
                (w.shape[0], w.shape[1] // 8, w.shape[2])
            }, (stack, name)
    w_router = model.params["moe_layers"]["moe"]["w_router"]
    assert {s.data.nbytes for s in w_router.addressable_shards} == {w_router.nbytes}
    batch8, batch1 = one_device
    assert _greedy(model, PROMPTS) == batch8
    assert _greedy(model, [PROMPTS[2]]) == batch1


def test_k2_dense_weights_per_chip_on_32_chips():
    """The arithmetic on K2 Thinking's real config, v5p-64's 32 chips as expert=32: every
    head-, MLP- and vocab-split weight is 1/32 per chip, and so are q_a and kv_a (over their
    inputs, under ``decode``); what stays whole is the routers and the norms."""
    from k2jax.model.config import Config

    cfg = Config.from_hf(reference.K2_CONFIG_PATH)
    mesh = jax.sharding.AbstractMesh((1, 32, 1), ("data", "expert", "tensor"))
    split = rules.param_bytes_per_device(cfg, mesh, jnp.bfloat16)
    whole = ("w_router", "e_score", "norm")
    for path, (total, per_chip) in split.items():
        assert per_chip == (total if any(w in path for w in whole) else total // 32), path
    dense = {p: v for p, v in split.items() if "/experts/" not in p}
    replicated = sum(tot for p, (tot, _) in dense.items() if any(w in p for w in whole))
    # 23.4 GB of bf16 weights in all; 0.33 GB of them (the routers) stay whole on every chip,
    # the rest / 32.
    assert round(sum(tot for tot, _ in dense.values()) / 1e9, 1) == 23.4
    assert round(replicated / 1e9, 2) == 0.33
    assert sum(per for _, per in dense.values()) < 2.9e9


@pytest.mark.parametrize(
    "axes", [{"expert": 8}, {"data": 2, "expert": 2, "tensor": 2}], ids=["expert8", "d2e2t2"]
)
def test_data_parallel_attention_splits_the_pool_and_gives_the_one_device_tokens(
    checkpoint, one_device, axes
):
    """``dp_attention``: the batch and its page pool over (data, expert), each row's pages in
    its own shard (the engine's ``PartitionedAllocator``), read there by the Pallas kernel
    through local page ids; heads over tensor. Same greedy tokens as one device."""
    mesh = make_mesh(**axes)
    model = k2jax.load(checkpoint, dtype="float32", mesh=mesh, strategy="dp_attention")
    shards = axes.get("data", 1) * axes["expert"]
    runner = _engine(model)
    assert runner.pool_shards == shards
    pages, _ = runner.new_state(num_pages=32, slots=8)
    assert {s.data.shape[1] for s in pages.addressable_shards} == {32 // shards}
    batch8, batch1 = one_device
    assert _greedy(model, PROMPTS) == batch8
    assert _greedy(model, [PROMPTS[2]]) == batch1


def test_context_parallel_decode_stripes_every_sequence_and_gives_the_one_device_tokens(
    checkpoint, one_device
):
    """``context_parallel``: every sequence's pages striped over all 8 devices (data=2,
    expert=2, tensor=2; the engine's ``StripedAllocator``), each device writing and attending
    over its own pages through the Pallas kernel's log-sum-exp form, the partials merged
    across devices. Pages of 4 tokens, so the longest sequence (18 + 12 tokens, 8 pages)
    spans every device and each holds 1 of its pages. Same greedy tokens as one device."""
    mesh = make_mesh(data=2, expert=2, tensor=2)
    model = k2jax.load(checkpoint, dtype="float32", mesh=mesh, strategy="context_parallel")
    runner = _engine(model, page_size=4)
    assert runner.striped and runner.pool_shards == 8 and runner.slots_for(1) == 1
    pages, _ = runner.new_state(num_pages=64, slots=8)
    assert {s.data.shape[1] for s in pages.addressable_shards} == {8}
    batch8, batch1 = one_device
    assert _greedy(model, PROMPTS, page_size=4) == batch8
    assert _greedy(model, [PROMPTS[2]], page_size=4) == batch1
