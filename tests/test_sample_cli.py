"""``python -m k2jax.sample`` end to end, in subprocesses: the default model and a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import reference

from k2jax import default_model, sample
from k2jax.kernels import cpu_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, tmp_path, check=True, devices=1):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # Keep the persistent compilation cache out of the user's home during tests.
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    }
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user gets ...
    if devices > 1:  # ... unless the test asks for a fake multi-device host
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, "-m", "k2jax.sample", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_default_model_runs_and_says_what_it_is(tmp_path):
    proc = run_cli(
        ["--random-model", "--max-new-tokens", "6", "--temperature", "0", "--json", "--logprobs"],
        tmp_path,
    )
    out = json.loads(proc.stdout)
    assert "RANDOM, UNTRAINED" in proc.stderr and "RANDOM, UNTRAINED" in out["model"]
    assert f"CPU kernels: {cpu_library.best_isa()}" in out["model"]  # the fast path, named
    assert out["prompt_ids"] == default_model.encode_bytes(sample.DEFAULT_PROMPT)
    assert 1 <= len(out["new_ids"]) <= 6 and len(out["logprobs"]) == len(out["new_ids"])
    assert out["text_encoding"].startswith("utf-8 bytes")
    assert out["finish_reason"] in ("stop", "length")


def test_checkpoint_greedy_matches_reference(tmp_path):
    ref = reference.build(seed=5)
    ckpt = reference.write_checkpoint(ref, tmp_path / "ckpt")
    prompt = [4, 8, 15, 16, 23, 42, 108]
    proc = run_cli(
        [
            "--checkpoint",
            ckpt,
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--stop-ids",
            "",
            "--json",
        ],
        tmp_path,
    )
    out = json.loads(proc.stdout)
    want = ref.greedy(prompt, 12)
    assert out["prompt_ids"] == prompt
    assert out["new_ids"] == want
    assert out["text"] is None  # no tokenizer in this checkpoint
    # Streaming mode prints the ids as they come (no tokenizer to turn them into text).
    proc = run_cli(
        [
            "--checkpoint",
            ckpt,
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--stop-ids",
            "",
        ],
        tmp_path,
    )
    assert proc.stdout.split() == [str(t) for t in want]
    # Text needs a tokenizer: refused with a clear message, before the weights load.
    proc = run_cli(["--checkpoint", ckpt, "--prompt", "hello"], tmp_path, check=False)
    assert proc.returncode != 0 and "no tokenizer" in proc.stderr and "--prompt-ids" in proc.stderr


@pytest.mark.parametrize(
    "args, message", [(["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature")]
)
def test_invalid_sampling_flags_are_refused(args, message, capsys):
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "mesh, strategy",
    [
        ("data=1,expert=4,tensor=2", "decode"),
        ("data=2,expert=4,tensor=1", "decode"),
        ("data=2,expert=2,tensor=2", "context_parallel"),
    ],
)
def test_mesh_flag_runs_sharded_with_the_same_tokens(tmp_path, mesh, strategy):
    """``--mesh`` places the model by the decode rules over 8 fake devices, data-parallel too:
    the engine's inputs and sampled tokens are replicated on the mesh; same greedy ids. With
    ``--strategy context_parallel`` the page pool is striped over all 8 devices as well (the
    same flag gives ``dp_attention``, tested in test_roofline_layout.py)."""
    args = ["--max-new-tokens", "6", "--temperature", "0", "--json", "--stop-ids", ""]
    plain = json.loads(run_cli(args, tmp_path).stdout)
    sharded_proc = run_cli([*args, "--mesh", mesh, "--strategy", strategy], tmp_path, devices=8)
    sharded = json.loads(sharded_proc.stdout)
    assert f"sharded over mesh {mesh} ({strategy} rules)" in sharded["model"]
    assert sharded["new_ids"] == plain["new_ids"] and len(plain["new_ids"]) == 6


def test_chat_mode_streams_the_reference_greedy_reply_as_parsed_text(tmp_path):
    """``--chat`` end to end on a checkpoint with K2's tokenizer format (163,840 ids, specials
    at K2's ids): the prompt is K2's chat rendering, the reply is transformers' greedy tokens
    for it, streamed as text behind its label."""
    import base64
    import shutil

    from k2_tokenizer_fixture import k2_test_tokenizer, k2_tokenizer_dir

    from k2jax.chat.parse import StreamParser
    from k2jax.chat.render import render

    ref = reference.build(seed=3, vocab_size=163_840)
    # The fixture pads its vocabulary with unreachable filler tokens; zero their rows of the
    # head so greedy picks tokens that decode to text (the rest of the head stays random).
    lines = (k2_tokenizer_dir() / "tiktoken.model").read_text().split("\n")
    filler = [
        i
        for i, line in enumerate(lines)
        if line and base64.b64decode(line.split()[0])[:1] == b"\xff"
    ]
    head = ref.torch_model.lm_head.weight
    with reference.torch.no_grad():
        head[filler] = 0.0
    ref.tensors["lm_head.weight"] = head.detach().to(reference.torch.bfloat16).clone()
    ckpt = reference.write_checkpoint(ref, tmp_path / "ckpt")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(k2_tokenizer_dir() / name, os.path.join(ckpt, name))

    question = "What is the weather in Paris today?"
    proc = run_cli(
        ["--checkpoint", ckpt, "--chat", question, "--max-new-tokens", "10", "--temperature", "0"],
        tmp_path,
    )
    tok = k2_test_tokenizer()
    prompt = render([{"role": "user", "content": question}], tokenizer=tok)
    stop = [tok.encode_special("<|im_end|>"), tok.eos_id]
    want_ids = ref.greedy(prompt, 10, stop_ids=stop)
    parser = StreamParser(tok)
    parser.feed(want_ids)
    parser.finish()
    want = parser.result()
    text = want["reasoning_content"] or want["content"]
    assert text.strip(), want  # the reply is readable text, not an empty or filler stream
    label = "[thinking] " if want["reasoning_content"] else "[answer] "
    assert proc.stdout.startswith(label), proc.stdout
    assert text in proc.stdout
