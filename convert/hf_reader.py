"""Reading an HF checkpoint directory in K2 Thinking's format, lazily and with checks first.

``HFCheckpoint`` reads ``config.json`` and the safetensors index, opens every shard's header
(memory-mapped: no tensor data is read until asked for) and ``validate()`` checks, before any
real work starts, that every tensor the model needs is present exactly once with the right
shape and dtype, that nothing unexpected is there, and that no shard is missing or truncated.
Every problem is a ``CheckpointError`` naming the tensor and the file.

FP8 checkpoints (DeepSeek-V3/R1, Kimi K2 Instruct) are read at the tensor level: ``read``
returns an FP8 weight dequantized in float32 with its ``weight_scale_inv`` (every path, the
loader's and the converter's, goes through ``load_tensor``), ``read_fp8`` the stored values and
scales for experts kept in FP8. ``validate`` checks each FP8 weight's scale (present, float32,
one per 128x128 block) and the config's FP8 fields; a multi-token-prediction layer
(``num_nextn_predict_layers``) is skipped with a one-line notice.

Nothing shipped inside the directory is imported or executed: only JSON and safetensors files
are read.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from convert import hf_names
from convert.expert_formats import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    Fp8Tensor,
    dequantize_fp8,
    scale_name,
    scale_shape,
)
from k2jax.model.config import Config, ConfigError
from k2jax.model.quant import FP8_BLOCK

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint on disk is not what the config says it should be."""


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"{INDEX_FILE}: tensor {key!r} is listed twice")
        seen[key] = value
    return seen


class HFCheckpoint:
    """An HF model directory: config, index, and lazily opened shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path}: no config.json in the checkpoint directory")
        self.config = Config.from_hf(config_path)
        _check_fp8_config(config_path)
        self.weight_map = self._read_weight_map()
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                try:
                    index = json.load(f, object_pairs_hook=_no_duplicate_keys)
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
            if "weight_map" not in index:
                raise CheckpointError(f"{index_path}: no 'weight_map'")
            return dict(index["weight_map"])
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(single):
            return {name: SINGLE_FILE for name in self._header(SINGLE_FILE)}
        raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _open(self, file: str):
        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise CheckpointError(f"{full}: shard named by the index does not exist")
            try:
                self._handles[file] = safe_open(full, framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{full}: truncated or corrupt safetensors file ({e})"
                ) from None
        return self._handles[file]

    def _header(self, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        if file not in self._headers:
            handle = self._open(file)
            header = {}
            for name in handle.keys():
                sl = handle.get_slice(name)
                header[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            self._headers[file] = header
        return self._headers[file]

    def validate(self, specs: dict[str, hf_names.TensorSpec] | None = None) -> None:
        """Check names, shapes, dtypes and files against the config; raise on the first problem."""
        specs = hf_names.all_specs(self.config) if specs is None else specs
        for name, spec in specs.items():
            if name not in self.weight_map:
                raise CheckpointError(
                    f"tensor {name!r} is missing: the index lists no file for it "
                    f"(expected shape {list(spec.shape)})"
                )
        located: dict[str, str] = {}
        for file in self.files:
            for name, (dtype, shape) in self._header(file).items():
                if name in located:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice: in {located[name]} and {file}"
                    )
                located[name] = file
                if self.weight_map.get(name) != file:
                    if name in self.weight_map:
                        raise CheckpointError(
                            f"tensor {name!r} is in {file} but the index says "
                            f"{self.weight_map[name]}"
                        )
                    if not hf_names.is_ignored(self.config, name):
                        raise CheckpointError(
                            f"tensor {name!r} in {file} is not listed in the index"
                        )
                spec = specs.get(name)
                if spec is None:
                    if hf_names.is_ignored(self.config, name) or _is_fp8_scale(name, specs):
                        continue  # FP8 scales: checked with their weights below
                    raise CheckpointError(
                        f"unexpected tensor {name!r} in {file}: the config "
                        "describes no such parameter"
                    )
                if shape != spec.shape:
                    raise CheckpointError(
                        f"tensor {name!r} in {file} has shape {list(shape)}, "
                        f"expected {list(spec.shape)}"
                    )
                if dtype not in spec.dtypes:
                    raise CheckpointError(
                        f"tensor {name!r} in {file} has dtype {dtype}, expected one of "
                        f"{list(spec.dtypes)}"
                    )
        for name, file in self.weight_map.items():
            if name not in located:
                raise CheckpointError(f"tensor {name!r} is listed in the index but not in {file}")
        self._validate_fp8_scales(specs)
        self._notice_skipped_mtp()

    def _validate_fp8_scales(self, specs: dict[str, hf_names.TensorSpec]) -> None:
        """Every FP8 weight has its float32 ``weight_scale_inv`` of one value per 128x128 block;
        no scale without an FP8 weight."""
        for name in specs:
            dtype, shape = self.stored(name)
            scale = scale_name(name)
            if dtype != FP8_DTYPE:
                if scale in self.weight_map:
                    raise CheckpointError(
                        f"unexpected tensor {scale!r} in {self.weight_map[scale]}: {name!r} is "
                        f"stored as {dtype}, not FP8"
                    )
                continue
            if scale not in self.weight_map:
                raise CheckpointError(
                    f"tensor {scale!r} is missing: {name!r} in {self.weight_map[name]} is FP8 "
                    "and needs its block scales"
                )
            s_dtype, s_shape = self.stored(scale)
            want = scale_shape(shape)
            if s_shape != want:
                raise CheckpointError(
                    f"tensor {scale!r} in {self.weight_map[scale]} has shape {list(s_shape)}, "
                    f"expected {list(want)} (one scale per {FP8_BLOCK}x{FP8_BLOCK} block of "
                    f"{name!r} {list(shape)})"
                )
            if s_dtype != "F32":
                raise CheckpointError(
                    f"tensor {scale!r} in {self.weight_map[scale]} has dtype {s_dtype}, "
                    "expected F32"
                )

    def _notice_skipped_mtp(self) -> None:
        cfg = self.config
        mtp = range(cfg.num_layers, cfg.num_layers + cfg.num_nextn_predict_layers)
        skipped = [n for n in self.weight_map if _layer_index(n) in mtp]
        if skipped:
            layers = ", ".join(str(i) for i in mtp)
            print(
                f"note: skipping the multi-token-prediction layer {layers} ({len(skipped)} "
                "tensors): k2jax does not use it",
                file=sys.stderr,
            )

    def stored(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of tensor ``name`` as stored."""
        return self._header(self.weight_map[name])[name]

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array (bf16 as ml_dtypes.bfloat16; FP8 dequantized, float32)."""
        return load_tensor(self, name, self._read_stored)

    def read_fp8(self, name: str) -> Fp8Tensor:
        """An FP8 weight as stored: its float8_e4m3fn values and float32 block scales."""
        return load_tensor(self, name, self._read_stored, fp8_raw=True)

    def _read_stored(self, name: str) -> np.ndarray:
        file = self.weight_map[name]
        try:
            if self.stored(name)[0] == FP8_DTYPE:  # safetensors' numpy reader has no FP8
                return _read_fp8_bytes(os.path.join(self.path, file), name)
            return self._open(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {file} could not be read ({e})") from None

    def nbytes(self, name: str) -> int:
        """Bytes stored for ``name`` (an FP8 weight's block scales included)."""
        dtype, shape = self.stored(name)
        n = int(np.prod(shape)) * _itemsize(dtype)
        if dtype == FP8_DTYPE and scale_name(name) in self.weight_map:
            s_dtype, s_shape = self.stored(scale_name(name))
            n += int(np.prod(s_shape)) * _itemsize(s_dtype)
        return n


def _itemsize(safetensors_dtype: str) -> int:
    return {
        "BF16": 2,
        "F16": 2,
        "F32": 4,
        "I32": 4,
        "I64": 8,
        "U8": 1,
        "I8": 1,
        FP8_DTYPE: 1,
    }.get(safetensors_dtype, 4)


def _is_fp8_scale(name: str, specs: dict) -> bool:
    weight = name.removesuffix(SCALE_SUFFIX)
    return weight != name and weight in specs


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


FP8_FORMATS = ("e4m3",)


def _check_fp8_config(config_path: str) -> None:
    """An FP8 config's fields this reader implements: e4m3 values, 128x128 blocks."""
    with open(config_path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return
    fmt = qc.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise ConfigError(
            f"config field 'quantization_config.fmt' = {fmt!r} is not supported "
            f"(supported: {list(FP8_FORMATS)})"
        )
    block = qc.get("weight_block_size")
    if block != [FP8_BLOCK, FP8_BLOCK]:
        raise ConfigError(
            f"config field 'quantization_config.weight_block_size' = {block!r} is not "
            f"supported (supported: [{FP8_BLOCK}, {FP8_BLOCK}])"
        )


def _read_fp8_bytes(path: str, name: str) -> np.ndarray:
    """One F8_E4M3 tensor of a safetensors file, read from its header's offsets."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    if len(data) != end - begin:
        raise CheckpointError(f"tensor {name!r} in {path}: file ends early")
    return np.frombuffer(data, ml_dtypes.float8_e4m3fn).reshape(entry["shape"])


def load_tensor(
    ckpt: HFCheckpoint, name: str, read_stored: Callable[[str], np.ndarray], fp8_raw=False
):
    """Tensor ``name`` read through ``read_stored`` (name -> the array as stored): an FP8
    weight dequantized in float32 with its block scales, or with ``fp8_raw`` as stored
    (``Fp8Tensor``); any other tensor as stored. The one place FP8 is decoded, for the
    loader's reads and the converter's alike."""
    array = read_stored(name)
    dtype = ckpt.stored(name)[0]
    if dtype != FP8_DTYPE:
        if fp8_raw:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.weight_map[name]} is {dtype}, not FP8: FP8 experts "
                "need FP8 weights"
            )
        return array
    t = Fp8Tensor(array.view(ml_dtypes.float8_e4m3fn), read_stored(scale_name(name)))
    return t if fp8_raw else dequantize_fp8(t)


def cast_for_model(array: np.ndarray, path: hf_names.Path, dtype) -> np.ndarray:
    """The dtype a parameter is held in: INT4 payload and scales and the router bias as stored
    (int32 / bf16 / float32); every other float weight in the model's ``dtype``."""
    leaf = path[-1]
    if leaf.endswith("_fp8"):
        return array.astype(ml_dtypes.float8_e4m3fn, copy=False)
    if leaf.endswith("_block_scale"):
        return array.astype(np.float32, copy=False)
    if leaf.endswith("_packed"):
        return array.astype(np.int32, copy=False)
    if leaf.endswith("_scale") and len(path) > 2 and path[-2] == "experts":
        return array.astype(ml_dtypes.bfloat16, copy=False)
    if leaf == "e_score_correction_bias":
        return array.astype(np.float32, copy=False)
    return array.astype(np.dtype(dtype), copy=False)


def place_all(
    ckpt: HFCheckpoint, specs: Iterable[hf_names.TensorSpec], dtype
) -> list[tuple[hf_names.TensorSpec, hf_names.Path, np.ndarray]]:
    """Read and transform the given tensors: (spec, param path, array) for each placement."""
    out = []
    for spec in specs:
        array = ckpt.read_fp8(spec.hf_name) if spec.fp8_raw else ckpt.read(spec.hf_name)
        try:
            placements = spec.place(array)
        except ValueError as e:
            raise CheckpointError(
                f"{spec.hf_name} in {ckpt.weight_map[spec.hf_name]}: {e}"
            ) from None
        for path, value in placements:
            out.append((spec, path, cast_for_model(value, path, dtype)))
    return out
