"""Every ordinary mistake gets one clear line, in every CLI, before the weights load.

Each case runs the real command in a subprocess and asserts: a non-zero exit code, stderr holding
exactly one line, starting ``error:`` and naming the culprit, and no traceback. Mistakes that can
be found before loading run against a *weightless* checkpoint (config, index and tokenizer, but
no weight files): had the command tried to load, it would have failed on the missing shards
instead, so the expected message proves the check came first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reference
from k2_tokenizer_fixture import write_k2_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = reference.TINY["max_position_embeddings"]


def _env(devices: int = 1, **extra) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop("K2JAX_DEBUG", None)
    env.update(extra)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(module: str, args, *, devices: int = 1, cwd=ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=_env(devices, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *culprits: str, code=None):
    assert result.returncode != 0, result.stdout[-2000:]
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    ref = reference.build(seed=2, num_hidden_layers=2)
    full = Path(reference.write_checkpoint(ref, root / "full"))
    weightless = root / "weightless"
    weightless.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(full / name, weightless)
    big_tokenizer = root / "big_tokenizer"
    shutil.copytree(weightless, big_tokenizer)
    write_k2_tokenizer_dir(big_tokenizer)  # K2's 163,842 ids against the tiny vocabulary
    truncated = root / "truncated"
    shutil.copytree(full, truncated)
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{\n  "vocab_size": 256,\n  "hidden_size": ,\n}\n')
    not_ckpt = root / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    a_file = root / "a_file.bin"
    a_file.write_bytes(b"\0" * 64)
    bad_tools = root / "bad_tools.json"
    bad_tools.write_text('[{"type": "function", "function": {"name": "x"}')
    return {
        "full": full,
        "weightless": weightless,
        "big_tokenizer": big_tokenizer,
        "truncated": truncated,
        "bad_json": bad_json,
        "not_ckpt": not_ckpt,
        "a_file": a_file,
        "bad_tools": bad_tools,
        "missing": root / "does_not_exist",
    }


def _long_ids(n: int) -> str:
    return ",".join(["5"] * n)


# (case id, args built from the fixture's paths, substrings the one error line must hold)
SAMPLE_CASES = [
    (
        "missing checkpoint, ids",
        lambda p: ["--checkpoint", p["missing"], "--prompt-ids", "1,2"],
        ["does_not_exist", "no such directory"],
    ),
    (
        "missing checkpoint, text",
        lambda p: ["--checkpoint", p["missing"], "--prompt", "hi"],
        ["does_not_exist", "no such directory"],
    ),
    (
        "directory that is no checkpoint",
        lambda p: ["--checkpoint", p["not_ckpt"]],
        ["not_a_checkpoint", "no config.json"],
    ),
    (
        "a file as checkpoint",
        lambda p: ["--checkpoint", p["a_file"], "--prompt-ids", "1"],
        ["a_file.bin", "is a file"],
    ),
    (
        "invalid config JSON",
        lambda p: ["--checkpoint", p["bad_json"], "--prompt-ids", "1"],
        ["config.json", "not valid JSON at line 3"],
    ),
    (
        "ids outside the vocabulary",
        lambda p: ["--checkpoint", p["weightless"], "--prompt-ids", "1,99999"],
        ["99999", "outside the model's vocabulary"],
    ),
    (
        "prompt longer than the context",
        lambda p: ["--checkpoint", p["weightless"], "--prompt-ids", _long_ids(CONTEXT + 1)],
        [f"{CONTEXT + 1} tokens", "longer than the model's context"],
    ),
    (
        "max-new-tokens past the context",
        lambda p: [
            "--checkpoint",
            p["weightless"],
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            str(CONTEXT),
        ],
        ["--max-new-tokens", f"at most {CONTEXT - 2}"],
    ),
    (
        "mesh larger than the host",
        lambda p: ["--checkpoint", p["weightless"], "--prompt-ids", "1", "--mesh", "expert=4"],
        ["--mesh expert=4", "4 devices but 1"],
    ),
    (
        "mesh with an unknown axis",
        lambda p: ["--checkpoint", p["weightless"], "--prompt-ids", "1", "--mesh", "experts=2"],
        ["--mesh", "experts=2"],
    ),
    (
        "missing tools file",
        lambda p: ["--chat", "hi", "--tools", p["missing"]],
        ["--tools", "does_not_exist"],
    ),
    (
        "malformed tools file",
        lambda p: ["--chat", "hi", "--tools", p["bad_tools"]],
        ["--tools", "bad_tools.json", "not valid JSON"],
    ),
    ("prompt with chat", lambda p: ["--chat", "hi", "--prompt", "hello"], ["--chat", "--prompt"]),
    (
        "chat without a tokenizer",
        lambda p: ["--random-model", "--chat", "hi"],
        ["--chat needs a tokenizer"],
    ),
    (
        "tokenizer larger than the vocabulary",
        lambda p: ["--checkpoint", p["big_tokenizer"], "--prompt", "hi"],
        ["produces ids up to 1638", "vocabulary has 256"],
    ),
    ("bad sampling value", lambda p: ["--top-p", "2"], ["top_p", "(0, 1]"]),
    ("bad seed", lambda p: ["--seed", str(2**32)], ["seed", "4294967296", "[0, 2**32)"]),
    ("negative max-new-tokens", lambda p: ["--max-new-tokens", "-1"], ["--max-new-tokens"]),
    ("unparsable ids", lambda p: ["--prompt-ids", "1,x"], ["--prompt-ids", "1,x"]),
]


@pytest.mark.parametrize("case,args,culprits", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_cli_mistakes(paths, case, args, culprits):
    assert_one_error_line(_run("k2jax.sample", args(paths)), *culprits)


def test_sample_cli_mesh_that_does_not_divide_the_model(paths):
    """3 fake devices: the mesh fits the host but 16 experts do not split 3 ways."""
    args = ["--checkpoint", paths["weightless"], "--prompt-ids", "1", "--mesh", "expert=3"]
    result = _run("k2jax.sample", args, devices=3)
    assert_one_error_line(result, "--mesh expert=3 does not divide the model", "16")


def test_sample_cli_truncated_shard_is_one_line(paths):
    result = _run("k2jax.sample", ["--checkpoint", paths["truncated"], "--prompt-ids", "1,2"])
    assert_one_error_line(result, ".safetensors")


def test_debug_shows_the_traceback(paths):
    args = ["--checkpoint", paths["missing"], "--prompt-ids", "1", "--debug"]
    result = _run("k2jax.sample", args)
    assert result.returncode != 0 and "Traceback" in result.stderr
    result = _run("k2jax.sample", args[:-1], K2JAX_DEBUG="1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_ctrl_c_during_generation_stops_cleanly(tmp_path):
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "k2jax.sample", "--random-model"),  # never stops early
            *("--max-new-tokens", "10000", "--no-compile-cache"),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.read(1)  # generation has started
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    notice = [line for line in err.splitlines() if "interrupted" in line]
    assert notice == ["[k2jax] interrupted: generation stopped"], err


def test_console_script_names_itself_in_help():
    script = Path(sys.executable).with_name("k2jax-sample")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: k2jax-sample"), result.stdout[:200]
    assert "--no-compile-cache" in result.stdout and "k2jax/jax" in result.stdout


# --- the converter ----------------------------------------------------------------------------

CONVERT_CASES = [
    ("missing source", lambda p, out: [p["missing"], out], 2, ["does_not_exist"]),
    ("source that is no checkpoint", lambda p, out: [p["not_ckpt"], out], 2, ["not_a_checkpoint"]),
    (
        "invalid config JSON",
        lambda p, out: [p["bad_json"], out],
        2,
        ["config.json", "not valid JSON at line 3"],
    ),
    ("truncated shard", lambda p, out: [p["truncated"], out], 2, [".safetensors"]),
    ("unwritable output", lambda p, out: [p["full"], p["a_file"] / "out"], 1, ["a_file.bin"]),
    ("bad dtype flag", lambda p, out: [p["full"], out, "--dtype", "int8"], 2, ["--dtype"]),
]


@pytest.mark.parametrize(
    "case,args,code,culprits", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES]
)
def test_convert_cli_mistakes(paths, tmp_path, case, args, code, culprits):
    out = tmp_path / "out"
    result = _run("convert", [*args(paths, out), "--quiet"])
    assert_one_error_line(result, *culprits, code=code)
    assert not out.exists() and not Path(f"{out}.partial").exists()


# --- the plan ---------------------------------------------------------------------------------

PLAN_CASES = [
    (
        "missing config",
        lambda p: ["--config", p["missing"], "--mesh", "expert=1"],
        ["--config", "does_not_exist"],
    ),
    (
        "invalid config JSON",
        lambda p: ["--config", p["bad_json"], "--mesh", "expert=1"],
        ["config.json", "not valid JSON at line 3"],
    ),
    ("bad mesh", lambda p: ["--config", p["full"], "--mesh", "expert=two"], ["--mesh", "two"]),
    ("no mesh nor topology", lambda p: ["--config", p["full"]], ["--mesh", "--topology"]),
    ("unknown topology", lambda p: ["--config", p["full"], "--topology", "v9x-7"], ["v9x-7"]),
]


@pytest.mark.parametrize("case,args,culprits", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_cli_mistakes(paths, case, args, culprits):
    assert_one_error_line(_run("sharding.plan", args(paths)), *culprits)


# --- quiet on a host without a TPU --------------------------------------------------------------


def _no_platform_env() -> dict[str, str]:
    env = _env()
    env.pop("JAX_PLATFORMS")  # the user chose nothing: k2jax must pick the CPU itself, quietly
    # Nor has the user's shell any TPU settings (libtpu, loaded by other tests in this process,
    # writes placeholders into them).
    return {k: v for k, v in env.items() if not k.startswith("TPU_")}


def test_import_k2jax_prints_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import k2jax, jax; print(jax.default_backend())"],
        capture_output=True,
        text=True,
        env=_no_platform_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu"
    assert result.stderr == "", result.stderr


def test_clis_print_no_probe_or_absl_noise(paths, tmp_path):
    env = _no_platform_env()
    runs = {
        "sample": ["k2jax.sample", "--max-new-tokens", "2", "--no-compile-cache"],
        "convert": ["convert", paths["full"], tmp_path / "k2", "--quiet"],
        "plan": [
            "sharding.plan",
            "--config",
            paths["full"] / "config.json",
            "--topology",
            "v5p-8",
            "--mesh",
            "expert=4",
        ],
    }
    for name, (module, *args) in runs.items():
        result = subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, (name, result.stderr[-2000:])
        noise = [
            line
            for line in result.stderr.splitlines()
            if any(w in line for w in ("libtpu", "INVALID_ARGUMENT", "E0000", "W0000", "OCDBT"))
        ]
        assert noise == [], (name, noise)


def test_config_json_errors_name_file_and_line(tmp_path):
    from k2jax.model.config import Config, ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 8})[:-1])
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON at line 1"):
        Config.from_hf(path)


def test_the_real_k2_tokenizer_fits_the_real_k2_vocabulary():
    """The vocabulary check must not refuse K2 itself: its reserved ids past the embedding are
    never produced."""
    shared = ROOT.parent / "shared" / "k2"
    if not shared.is_dir():
        pytest.skip("../shared/k2 (Moonshot's real tokenizer files) is not beside this checkout")
    from k2jax.chat.tokenizer import load_tokenizer
    from k2jax.model.config import Config

    tok = load_tokenizer(shared)
    cfg = Config.from_hf(shared / "kimi-k2-thinking.config.json")
    assert tok.used_ids_end <= cfg.vocab_size == 163840
    assert tok.encode_special("<|im_end|>") < cfg.vocab_size
