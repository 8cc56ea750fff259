"""``python -m k2jax.sample`` end to end, in subprocesses: the default model and a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import reference

from k2jax import default_model, sample

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
        ["--max-new-tokens", "6", "--temperature", "0", "--json", "--logprobs"], tmp_path
    )
    out = json.loads(proc.stdout)
    assert "RANDOM, UNTRAINED" in proc.stderr and "RANDOM, UNTRAINED" in out["model"]
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
    want = ref.torch_model.generate(
        input_ids=reference.torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=ref.raw["pad_token_id"],
    )[0, len(prompt) :].tolist()
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
    with pytest.raises(SystemExit):
        sample.main(args)
    assert message in capsys.readouterr().err


def test_mesh_flag_runs_sharded_with_the_same_tokens(tmp_path):
    """``--mesh`` places the model by the decode rules over 8 fake devices: same greedy ids."""
    args = ["--max-new-tokens", "6", "--temperature", "0", "--json", "--stop-ids", ""]
    plain = json.loads(run_cli(args, tmp_path).stdout)
    sharded_proc = run_cli([*args, "--mesh", "data=1,expert=4,tensor=2"], tmp_path, devices=8)
    sharded = json.loads(sharded_proc.stdout)
    assert "sharded over mesh data=1,expert=4,tensor=2" in sharded["model"]
    assert sharded["new_ids"] == plain["new_ids"] and len(plain["new_ids"]) == 6
