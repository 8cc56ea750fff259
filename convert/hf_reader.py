"""Reading an HF checkpoint directory in K2 Thinking's format, lazily and with checks first.

``HFCheckpoint`` reads ``config.json`` and the safetensors index, opens every shard's header
(memory-mapped: no tensor data is read until asked for) and ``validate()`` checks, before any
real work starts, that every tensor the model needs is present exactly once with the right
shape and dtype, that nothing unexpected is there, and that no shard is missing or truncated.
Every problem is a ``CheckpointError`` naming the tensor and the file.

Nothing shipped inside the directory is imported or executed: only JSON and safetensors files
are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from convert import hf_names
from k2jax.model.config import Config

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
                    if hf_names.is_ignored(self.config, name):
                        continue
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

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array (bf16 as ml_dtypes.bfloat16)."""
        file = self.weight_map[name]
        try:
            return self._open(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {file} could not be read ({e})") from None

    def nbytes(self, name: str) -> int:
        dtype, shape = self._header(self.weight_map[name])[name]
        return int(np.prod(shape)) * _itemsize(dtype)


def _itemsize(safetensors_dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}.get(
        safetensors_dtype, 4
    )


def cast_for_model(array: np.ndarray, path: hf_names.Path, dtype) -> np.ndarray:
    """The dtype a parameter is held in: INT4 payload and scales and the router bias as stored
    (int32 / bf16 / float32); every other float weight in the model's ``dtype``."""
    leaf = path[-1]
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
        array = ckpt.read(spec.hf_name)
        try:
            placements = spec.place(array)
        except ValueError as e:
            raise CheckpointError(
                f"{spec.hf_name} in {ckpt.weight_map[spec.hf_name]}: {e}"
            ) from None
        for path, value in placements:
            out.append((spec, path, cast_for_model(value, path, dtype)))
    return out
