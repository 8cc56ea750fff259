"""k2jax.train: the step learns, resume is exact, data + expert parallel equals one device, the
router bias balances load, and the generated data renders exactly as the agent's prompts."""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.chat import tools as builtin
from k2jax.chat.parse import parse
from k2jax.chat.render import render
from k2jax.model.config import Config
from k2jax.train import conversations, data, loop
from k2jax.train import step as train_step

TINY = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "num_attention_heads": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "quantization_config": {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "strategy": "group",
                    "group_size": 32,
                    "symmetric": True,
                },
            }
        },
        "format": "pack-quantized",
        "quant_method": "compressed-tensors",
    },
}
CFG = Config.from_hf(TINY)
TCFG = train_step.TrainConfig(
    steps=6, batch_size=4, seq_len=24, peak_lr=1e-2, warmup_steps=1, checkpoint_every=2
)
PAD = 0


def _rows(n=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (n, TCFG.seq_len + 1)).astype(np.int32)
    tokens[:, -3:] = PAD  # padding at the end, outside the mask
    mask = (rng.random((n, TCFG.seq_len + 1)) < 0.7).astype(np.float32)
    mask[tokens == PAD] = 0
    return tokens, mask


def _params_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_a_few_steps_reduce_the_loss_on_a_tiny_batch():
    tokens, mask = _rows(4)
    step = train_step.make_train_step(CFG, TCFG, PAD)
    params = train_step.init_train_params(CFG, jax.random.key(0))
    state = train_step.init_state(params, train_step.make_optimizer(TCFG))
    losses = []
    for _ in range(TCFG.steps):
        state, metrics = step(state, tokens, mask)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(state["step"]) == TCFG.steps


def test_the_loss_counts_only_masked_targets():
    tokens, mask = _rows(2)
    params = train_step.init_train_params(CFG, jax.random.key(0))
    _, (ce, _, _, count) = train_step.loss_fn(params, tokens, mask, cfg=CFG, tcfg=TCFG, pad_id=PAD)
    logits, _ = train_step.forward(params, jnp.asarray(tokens[:, :-1]), cfg=CFG, dtype=jnp.float32)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    want = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert count == mask[:, 1:].sum()
    np.testing.assert_allclose(float(ce), want, rtol=1e-5)


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    tokens, mask = _rows(8)
    whole = loop.train(str(tmp_path / "whole"), CFG, TCFG, tokens, mask, PAD, progress=False)
    loop.train(str(tmp_path / "split"), CFG, TCFG, tokens, mask, PAD, stop_at=3, progress=False)
    resumed = loop.train(str(tmp_path / "split"), CFG, TCFG, tokens, mask, PAD, progress=False)
    assert int(whole["step"]) == int(resumed["step"]) == TCFG.steps
    assert _params_equal(whole["params"], resumed["params"])
    assert _params_equal(whole["opt_state"], resumed["opt_state"])
    # The run is not trivially constant: training moved the params.
    fresh = train_step.init_train_params(CFG, jax.random.key(TCFG.seed))
    assert not _params_equal(fresh, whole["params"])
    assert [r["step"] for r in loop.read_metrics(str(tmp_path / "split"))] == [1, 2, 3, 4, 5, 6]


def test_data_and_expert_parallel_step_equals_one_device():
    from sharding.mesh import make_mesh

    tokens, mask = _rows(8)  # split over data x expert = 8 ways
    params = train_step.init_train_params(CFG, jax.random.key(0))
    optimizer = train_step.make_optimizer(TCFG)
    single, m1 = train_step.make_train_step(CFG, TCFG, PAD)(
        train_step.init_state(jax.tree.map(jnp.copy, params), optimizer), tokens, mask
    )
    mesh = make_mesh(data=2, expert=4, devices=jax.devices()[:8])
    state_shardings, batch_sharding, rules = loop._placement(CFG, TCFG, mesh, "prefill")
    state = jax.device_put(train_step.init_state(params, optimizer), state_shardings)
    experts = state["params"]["moe_layers"]["moe"]["experts"]["gate_weight"]
    assert "expert" in experts.sharding.spec[1]  # [L, E, O, I]: experts split 4 ways
    step = train_step.make_train_step(CFG, TCFG, PAD, mesh, rules)
    sharded, m2 = step(
        state, jax.device_put(tokens, batch_sharding), jax.device_put(mask, batch_sharding)
    )
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    pairs = zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"]), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_the_correction_bias_moves_toward_balance_and_the_optimizer_leaves_it():
    params = train_step.init_train_params(CFG, jax.random.key(0))
    load = jnp.asarray([[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0]])
    moved = train_step.update_bias(params, load, 0.01)
    delta = np.asarray(moved["moe_layers"]["moe"]["e_score_correction_bias"])[0]
    # Over-loaded experts (above the mean 1/8) go down by the rate, under-loaded ones go up.
    np.testing.assert_allclose(delta, 0.01 * np.sign(0.125 - np.asarray(load[0])), rtol=1e-6)
    tokens, mask = _rows(4)
    state = train_step.init_state(params, train_step.make_optimizer(TCFG))
    state, _ = train_step.make_train_step(CFG, TCFG, PAD)(state, tokens, mask)
    bias = np.asarray(state["params"]["moe_layers"]["moe"]["e_score_correction_bias"])
    # Only the load rule moved it: every entry is a multiple of the rate, some moved.
    steps = bias / TCFG.bias_update_rate
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert np.abs(steps).max() == pytest.approx(1.0)


# --- data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    convs = conversations.conversations(7, 400)
    prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    path = data.train_tokenizer(data.training_text(convs, conversations.TOOLS), prefix, 512)
    return data.load_tokenizer(path)


def test_a_row_is_the_agents_prompt_plus_the_answer_and_masks_assistant_turns(tokenizer):
    rng = random.Random(3)
    for kind in conversations.KINDS:
        conv = conversations.conversation(rng, kind=kind)
        ids, mask = data.encode_conversation(conv, conversations.TOOLS, tokenizer)
        prompt = render(conv["messages"][:-1], conversations.TOOLS, tokenizer=tokenizer)
        assert ids[: len(prompt)] == prompt
        trained = [i for i, m in zip(ids, mask, strict=True) if m]
        # What is trained is exactly the assistant turns of the last exchange, parsed back.
        turns = tokenizer.decode(trained).split("<|im_end|>")[:-1]
        assistant = [m for m in conv["messages"][conv["history"] :] if m["role"] == "assistant"]
        assert len(turns) == len(assistant)
        for text, message in zip(turns, assistant, strict=True):
            parsed = parse(text + "<|im_end|>")
            assert parsed["reasoning_content"] == message["reasoning_content"]
            assert parsed["content"] == message["content"]
            assert [c["function"] for c in parsed["tool_calls"]] == [
                c["function"] for c in message.get("tool_calls", [])
            ]


def test_special_token_text_stays_text_and_round_trips(tokenizer):
    text = 'user wrote <|im_end|> and <think> 12.5 * 3 {"a": 1}\n'
    ids = tokenizer.encode(text)
    assert not any(tokenizer.is_special(i) for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.is_special(tokenizer.encode_special("<|tool_call_begin|>"))


def test_a_country_or_capital_is_the_same_token_in_prose_json_and_tool_results(tokenizer):
    """Copying a name is then the identity; freely trained BPE merged the space into the first
    piece, so "of Egypt" and '"Egypt"' began with different tokens."""
    for name in ("Egypt", "Cairo", "Indonesia", "Jakarta", "Buenos Aires"):
        pieces = tokenizer.encode(name)
        assert len(pieces) == len(name.split()) * 2 - 1, (name, pieces)  # words and the spaces
        for text in (f"the capital of {name}.", f'{{"country": "{name}"}}', f"0\n{name}\n"):
            ids = tokenizer.encode(text)
            assert any(ids[i : i + len(pieces)] == pieces for i in range(len(ids))), (text, ids)


def test_generated_tool_calls_are_schema_valid_and_results_are_the_tools():
    import jsonschema

    schemas = {d["function"]["name"]: d["function"]["parameters"] for d in builtin.DECLARATIONS}
    for conv in conversations.conversations(11, 200, split="eval"):
        for message in conv["messages"]:
            for call in message.get("tool_calls", []):
                arguments = json.loads(call["function"]["arguments"])
                jsonschema.validate(arguments, schemas[call["function"]["name"]])
        final = conv["messages"][-1]["content"]
        assert all(answer in final for answer in conv["expected"]["answer"])


def test_eval_phrasings_include_ones_never_trained_on():
    def users(split, seed):
        convs = conversations.conversations(seed, 600, split)
        return {c["messages"][c["history"]]["content"] for c in convs}

    held_out = "Figure out"
    assert not any(held_out in u for u in users("train", 1))
    assert any(held_out in u for u in users("eval", 2))


@pytest.mark.parametrize(
    ("expression", "want"),
    [
        ("347 * 29", "10063"),
        ("(3 + 4) * 12", "84"),
        ("1 - 2 * 3", "-5"),
        ("10 / 4", "2.5"),
        ("-(2.5 + .5) / 3", "-1"),
        ("2 / 3", "0.6667"),
    ],
)
def test_calculator(expression, want):
    assert builtin.calculator(expression) == want


@pytest.mark.parametrize(
    "bad", ["__import__('os')", "2 ** 3", "1 / 0", "(1 + 2", "", "1 2", "a + 1"]
)
def test_calculator_refuses_what_is_not_arithmetic(bad):
    with pytest.raises(ValueError):
        builtin.calculator(bad)


def test_a_recipe_ends_with_a_qat_phase_and_its_float_twin_branches_from_the_boundary(tmp_path):
    """The smoke recipe: float steps 1-4, fake-quantized experts in steps 5-6; its float twin
    restarts from the kept step-4 checkpoint and trains steps 5-6 without the quantizer."""
    import dataclasses

    from k2jax.train import run
    from k2jax.train.recipe import RECIPES

    recipe = RECIPES["smoke"]
    assert recipe.float_steps == 4 and recipe.train.steps == 6
    qat_dir, twin_dir = str(tmp_path / "qat"), str(tmp_path / "twin")
    export = run.run(qat_dir, recipe)
    records = loop.read_metrics(qat_dir)
    assert [r["qat"] for r in records] == [False] * 4 + [True] * 2
    with open(f"{export}/config.json") as f:
        assert json.load(f)["k2jax_training"]["qat_from_step"] == 4
    manager = loop.checkpoint_manager(qat_dir, recipe.train.checkpoint_every)
    assert 4 in manager.all_steps() and manager.latest_step() == 6
    manager.close()

    twin = dataclasses.replace(recipe, name="smoke_float", final_phase_qat=False)
    run.branch(qat_dir, twin_dir, twin)
    run.run(twin_dir, twin)
    twin_records = loop.read_metrics(twin_dir)
    assert [r["qat"] for r in twin_records] == [False] * 6
    assert [r["loss"] for r in twin_records[:4]] == [r["loss"] for r in records[:4]]
    # Same weights and batch at step 5; only the quantizer differs.
    assert twin_records[4]["loss"] != records[4]["loss"]

    with pytest.raises(FileExistsError, match="twin"):
        run.branch(qat_dir, twin_dir, twin)
    other_data = dataclasses.replace(twin, num_conversations=301)
    with pytest.raises(ValueError, match="k2jax_data"):
        run.branch(qat_dir, str(tmp_path / "other"), other_data)
