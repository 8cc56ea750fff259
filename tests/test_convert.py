"""The converter: round trip against the HF loader, interrupt and resume, bad inputs, safety."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import reference
from safetensors.torch import load_file, save_file

import k2jax
from convert import checkpoint_format as fmt
from convert.converter import KILL_ENV, ConvertError, convert
from convert.hf_reader import CheckpointError
from sharding.mesh import make_mesh
from sharding.rules import param_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTINEL = "EXECUTED_SENTINEL"
TOKENIZER_FILES = {
    "tiktoken.model": "IQ== 0\n",
    "tokenizer_config.json": (
        '{"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", null]}}'
    ),
    "chat_template.jinja": "{{ messages }}",
    "generation_config.json": '{"eos_token_id": 251}',
}
TOKENS = np.array([[1, 5, 9, 200, 3, 7, 250, 12], [4, 4, 100, 31, 0, 255, 17, 2]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny K2-format HF checkpoint, 4 layers (1 dense + 3 MoE), with tokenizer files and
    code that must never run: importing it would create SENTINEL beside it."""
    ref = reference.build(seed=3, num_hidden_layers=4)
    path = reference.write_checkpoint(ref, tmp_path_factory.mktemp("hf") / "hf")
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    code = f"open(__file__.replace('.py', '') + '_{SENTINEL}', 'w').close()\n"
    for name in ("modeling_deepseek.py", "tokenization_kimi.py", "configuration_deepseek.py"):
        with open(os.path.join(path, name), "w") as f:
            f.write(code)
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "k2"
    summary = convert(hf_dir, out, verify=True, quiet=True)
    return str(out), summary


def _run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _stored_files(out):
    """Every array byte and the manifest, by relative path (orbax's own timestamped metadata
    files excepted)."""
    files = {}
    params = os.path.join(out, fmt.PARAMS_DIR)
    for leaf in sorted(os.listdir(params)):
        leaf_dir = os.path.join(params, leaf)
        if not os.path.isdir(leaf_dir):
            continue
        for root, _, names in os.walk(leaf_dir):
            for name in names:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    files[os.path.relpath(p, out)] = f.read()
    with open(os.path.join(out, fmt.MANIFEST), "rb") as f:
        files[fmt.MANIFEST] = f.read()
    return files


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_logits_bit_exact_float32(hf_dir, converted):
    out, _ = converted
    from_hf = k2jax.load(hf_dir, dtype="float32")
    from_out = k2jax.load(out, dtype="float32")
    assert jax.tree.structure(from_hf.params) == jax.tree.structure(from_out.params)
    a, b = from_hf.logits(TOKENS), from_out.logits(TOKENS)
    assert np.isfinite(a).all() and a.std() > 0.1
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("conv_dtype", ["bfloat16", "float32"])
def test_converted_params_equal_hf_params(hf_dir, tmp_path, conv_dtype, converted):
    out = converted[0] if conv_dtype == "bfloat16" else tmp_path / "k2f32"
    if conv_dtype == "float32":
        convert(hf_dir, out, dtype="float32", quiet=True)
    with open(os.path.join(out, fmt.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["arrays"]["moe_layers.attn.w_o"]["dtype"] == conv_dtype
    assert manifest["arrays"]["moe_layers.moe.experts.gate_packed"]["dtype"] == "int32"
    assert manifest["arrays"]["moe_layers.moe.experts.gate_scale"]["dtype"] == "bfloat16"
    for load_dtype in ("bfloat16", "float32"):
        a = k2jax.load(hf_dir, dtype=load_dtype).params
        b = k2jax.load(out, dtype=load_dtype).params
        for (path, x), y in zip(
            jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
        ):
            assert x.dtype == y.dtype and x.shape == y.shape, path
            np.testing.assert_array_equal(
                np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(path)
            )


def test_output_files_and_no_code_copied_or_run(hf_dir, converted):
    out, summary = converted
    names = set(os.listdir(out))
    assert names == {"config.json", fmt.MANIFEST, fmt.PARAMS_DIR, *TOKENIZER_FILES}
    for name in ("config.json", *TOKENIZER_FILES):
        with (
            open(os.path.join(hf_dir, name), "rb") as f1,
            open(os.path.join(out, name), "rb") as f2,
        ):
            assert f1.read() == f2.read(), name
    for root, _, files in os.walk(out):
        assert not [f for f in files if f.endswith(".py")], root
    assert not [f for f in os.listdir(hf_dir) if SENTINEL in f]
    assert not os.path.exists(out + ".partial")
    assert summary.units_done == 5 and summary.units_skipped == 0
    assert summary.bytes_read > 0 and summary.bytes_written > 0 and summary.peak_rss_bytes > 0


def test_mesh_load_places_by_rules(hf_dir, converted):
    """Converted and HF checkpoints land in the decode rules' shardings with equal values."""
    out, _ = converted
    mesh = make_mesh(data=1, expert=4, tensor=2)
    want = param_shardings(k2jax.Config.from_hf(hf_dir), mesh, dtype=np.float32)
    single = k2jax.load(out, dtype="float32").params
    for path in (out, hf_dir):
        model = k2jax.load(path, dtype="float32", mesh=mesh)
        flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
        for (p, x), w, ref in zip(
            flat, jax.tree.leaves(want), jax.tree.leaves(single), strict=True
        ):
            assert x.sharding.is_equivalent_to(w, x.ndim), (path, p, x.sharding, w)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=str(p))
    experts = model.params["moe_layers"]["moe"]["experts"]["gate_packed"]
    assert experts.sharding.shard_shape(experts.shape)[1] < 16  # really split across devices


# --- interrupt and resume -------------------------------------------------------------------


def test_kill_then_resume_gives_identical_result(hf_dir, converted, tmp_path):
    out = tmp_path / "k2"
    killed = _run_cli(hf_dir, out, "--quiet", env={KILL_ENV: "2"})
    assert killed.returncode == -9, killed.stderr
    partial = str(out) + ".partial"
    assert not os.path.exists(out) and os.path.isdir(partial)
    assert not os.path.exists(os.path.join(partial, fmt.MANIFEST))
    with open(os.path.join(partial, "progress.jsonl")) as f:
        assert [json.loads(line)["unit"] for line in f] == ["layer_000", "layer_001"]
    with pytest.raises(FileNotFoundError, match="--resume"):
        k2jax.load(partial)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        k2jax.load(out)

    again = _run_cli(hf_dir, out, "--quiet")
    assert again.returncode == 1 and "--resume" in again.stderr, again.stderr
    assert not os.path.exists(out)

    summary = convert(hf_dir, out, resume=True, verify=True, quiet=True)
    assert summary.units_skipped == 2 and summary.units_done == 3
    assert not os.path.exists(partial)
    assert _stored_files(str(out)) == _stored_files(converted[0])


def test_resume_refuses_a_different_source(hf_dir, tmp_path):
    out = tmp_path / "k2"
    assert _run_cli(hf_dir, out, "--quiet", env={KILL_ENV: "1"}).returncode == -9
    with pytest.raises(ConvertError, match="different source or --dtype"):
        convert(hf_dir, out, resume=True, dtype="float32", quiet=True)
    assert not os.path.exists(out)


def test_ctrl_c_leaves_only_a_partial(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "k2"
    from convert import converter

    calls = {"n": 0}
    real = converter._append_progress

    def interrupt_after_one(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(converter, "_append_progress", interrupt_after_one)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_dir, out, quiet=True)
    assert not os.path.exists(out) and os.path.isdir(str(out) + ".partial")
    monkeypatch.setattr(converter, "_append_progress", real)
    assert convert(hf_dir, out, resume=True, quiet=True).units_skipped == 1
    assert fmt.is_converted_checkpoint(out)


def test_refuses_to_overwrite_without_force(hf_dir, converted, tmp_path):
    out = tmp_path / "k2"
    shutil.copytree(converted[0], out)
    before = _stored_files(str(out))
    res = _run_cli(hf_dir, out, "--quiet")
    assert res.returncode == 1 and "already exists" in res.stderr and "--force" in res.stderr
    assert _stored_files(str(out)) == before
    other = tmp_path / "somebody_elses"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(ConvertError, match="already exists"):
        convert(hf_dir, other, quiet=True)
    assert (other / "precious.txt").read_text() == "keep"
    res = _run_cli(hf_dir, out, "--quiet", "--force")
    assert res.returncode == 0, res.stderr
    assert _stored_files(str(out)) == before


# --- bad inputs -----------------------------------------------------------------------------

NAME = "model.layers.2.mlp.experts.5.up_proj.weight_scale"


def _index(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)


def _write_index(path, index):
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def _rewrite(path, shard, edit):
    tensors = load_file(os.path.join(path, shard))
    edit(tensors)
    save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})


def _missing(path):
    shard = _index(path)["weight_map"][NAME]
    _rewrite(path, shard, lambda t: t.pop(NAME))
    index = _index(path)
    del index["weight_map"][NAME]
    _write_index(path, index)
    return rf"tensor '{NAME}' is missing: the index lists no file"


def _unexpected(path):
    import torch

    name = "model.layers.2.mlp.experts.5.up_proj.bias"
    shard = _index(path)["weight_map"][NAME]
    _rewrite(path, shard, lambda t: t.__setitem__(name, torch.zeros(3)))
    index = _index(path)
    index["weight_map"][name] = shard
    _write_index(path, index)
    return rf"unexpected tensor '{name}' in {shard}"


def _duplicate_in_two_shards(path):
    index = _index(path)
    shard = index["weight_map"][NAME]
    other = index["weight_map"]["lm_head.weight"]
    value = load_file(os.path.join(path, shard))[NAME]
    _rewrite(path, other, lambda t: t.__setitem__(NAME, value))
    return rf"tensor '{NAME}' is stored twice: in {shard} and {other}"


def _duplicate_in_index(path):
    text = open(os.path.join(path, "model.safetensors.index.json")).read()
    entry = f'"{NAME}": "{_index(path)["weight_map"][NAME]}"'
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write(text.replace(entry, entry + ", " + entry, 1))
    return rf"tensor '{NAME}' is listed twice"


def _wrong_shape(path):
    shard = _index(path)["weight_map"][NAME]
    _rewrite(path, shard, lambda t: t.__setitem__(NAME, t[NAME][:, :1].contiguous()))
    return rf"tensor '{NAME}' in {shard} has shape \[64, 1\], expected \[64, 2\]"


def _wrong_dtype(path):
    shard = _index(path)["weight_map"][NAME]
    _rewrite(path, shard, lambda t: t.__setitem__(NAME, t[NAME].float()))
    return rf"tensor '{NAME}' in {shard} has dtype F32, expected one of \['BF16'\]"


def _truncated(path):
    shard = _index(path)["weight_map"][NAME]
    full = os.path.join(path, shard)
    with open(full, "r+b") as f:
        f.truncate(os.path.getsize(full) - 100)
    return rf"{shard}: truncated or corrupt safetensors file"


def _missing_file(path):
    shard = _index(path)["weight_map"][NAME]
    os.remove(os.path.join(path, shard))
    return rf"{shard}: shard named by the index does not exist"


BAD_INPUTS = {
    "missing": _missing,
    "unexpected": _unexpected,
    "duplicate_in_two_shards": _duplicate_in_two_shards,
    "duplicate_in_index": _duplicate_in_index,
    "wrong_shape": _wrong_shape,
    "wrong_dtype": _wrong_dtype,
    "truncated": _truncated,
    "missing_file": _missing_file,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_writes_nothing(hf_dir, tmp_path, case):
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    message = BAD_INPUTS[case](bad)
    out = tmp_path / "k2"
    with pytest.raises(CheckpointError, match=message):
        convert(bad, out, quiet=True)
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_bad_input_through_the_cli(hf_dir, tmp_path):
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    _wrong_shape(bad)
    res = _run_cli(bad, tmp_path / "k2", "--quiet")
    assert res.returncode == 2, res.stderr
    assert "bad source checkpoint" in res.stderr and NAME in res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "k2") and not os.path.exists(tmp_path / "k2.partial")


def test_error_found_while_converting_leaves_nothing_finished(hf_dir, tmp_path):
    """A weight_shape record that disagrees is only seen when read: the run stops naming it,
    and what is left is a partial, never a finished-looking OUT_DIR."""
    import torch

    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    name = "model.layers.3.mlp.experts.1.down_proj.weight_shape"
    shard = _index(bad)["weight_map"][name]
    _rewrite(bad, shard, lambda t: t.__setitem__(name, torch.tensor([64, 32], dtype=torch.int64)))
    out = tmp_path / "k2"
    with pytest.raises(CheckpointError, match=rf"{name} in {shard}: .*expected \[64, 64\]"):
        convert(bad, out, quiet=True)
    assert not os.path.exists(out)
    with pytest.raises(FileNotFoundError):
        k2jax.load(str(out) + ".partial")


# --- loading converted checkpoints: errors --------------------------------------------------


def test_load_refuses_unfinished_or_foreign_manifest(converted, tmp_path):
    out = tmp_path / "k2"
    shutil.copytree(converted[0], out)
    manifest_path = out / fmt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(fmt.FormatError, match="format version 99"):
        k2jax.load(out)
    manifest["version"], manifest["finished"] = fmt.VERSION, False
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(fmt.FormatError, match="not a finished"):
        k2jax.load(out)


def test_load_refuses_config_that_disagrees_with_arrays(converted, tmp_path):
    out = tmp_path / "k2"
    shutil.copytree(converted[0], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["moe_intermediate_size"] = 32
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fmt.FormatError, match=r"moe_layers\.moe\.experts\.\w+ has shape"):
        k2jax.load(out)
