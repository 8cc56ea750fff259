"""Bad HF checkpoints give a specific error naming the tensor and file, not a deep traceback."""

import json
import os
import shutil

import pytest
import reference
from safetensors.torch import load_file, save_file

import k2jax
from convert.hf_reader import CheckpointError
from k2jax.model.config import ConfigError


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    ref = reference.build(seed=7)
    return reference.write_checkpoint(ref, tmp_path_factory.mktemp("good"))


@pytest.fixture
def ckpt(good_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good_dir, path)
    return path


def _shard_of(path, name):
    with open(path / "model.safetensors.index.json") as f:
        return json.load(f)["weight_map"][name]


def _rewrite(path, shard, edit):
    tensors = load_file(str(path / shard))
    edit(tensors)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})


NAME = "model.layers.1.self_attn.kv_b_proj.weight"


def test_good_checkpoint_loads(good_dir):
    assert k2jax.load(good_dir, dtype="float32").config.num_layers == 3


def test_missing_tensor(ckpt):
    shard = _shard_of(ckpt, NAME)
    _rewrite(ckpt, shard, lambda t: t.pop(NAME))
    with pytest.raises(CheckpointError, match=f"{NAME}.*listed in the index but not in {shard}"):
        k2jax.load(ckpt)


def test_missing_from_index(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][NAME]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{NAME}' is missing"):
        k2jax.load(ckpt)


def test_wrong_shape(ckpt):
    shard = _shard_of(ckpt, NAME)
    _rewrite(ckpt, shard, lambda t: t.update({NAME: t[NAME][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"'{NAME}' in {shard} has shape \[127, 32\]"):
        k2jax.load(ckpt)


def test_wrong_dtype(ckpt):
    name = "model.layers.1.mlp.experts.3.up_proj.weight_packed"
    shard = _shard_of(ckpt, name)
    _rewrite(ckpt, shard, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=f"'{name}' in {shard} has dtype F32"):
        k2jax.load(ckpt)


def test_unexpected_tensor(ckpt):
    shard = _shard_of(ckpt, NAME)
    extra = "model.layers.1.self_attn.surprise.weight"

    def add(t):
        t[extra] = t[NAME].clone()

    _rewrite(ckpt, shard, add)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][extra] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}' in {shard}"):
        k2jax.load(ckpt)


def test_truncated_shard(ckpt):
    shard = _shard_of(ckpt, NAME)
    full = ckpt / shard
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"{shard}: truncated or corrupt"):
        k2jax.load(ckpt)


def test_index_names_missing_file(ckpt):
    shard = _shard_of(ckpt, NAME)
    os.remove(ckpt / shard)
    with pytest.raises(CheckpointError, match=f"{shard}: shard named by the index does not exist"):
        k2jax.load(ckpt)


def test_unsupported_config_value(ckpt):
    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["scoring_func"] = "softmax"
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'scoring_func' = 'softmax' is not supported"):
        k2jax.load(ckpt)


def test_bad_weight_shape_record(ckpt):
    name = "model.layers.2.mlp.experts.0.down_proj.weight_shape"
    shard = _shard_of(ckpt, name)
    _rewrite(ckpt, shard, lambda t: t.update({name: t[name] // 2}))
    with pytest.raises(CheckpointError, match=rf"{name} in {shard}: .*expected \[64, 64\]"):
        k2jax.load(ckpt)
