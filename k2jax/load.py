"""``k2jax.load``: an HF checkpoint directory (K2 format) or a converted one, as a ``Model``.

This is the top of the import graph: it composes the model, the HF reader from ``convert``
and, given a mesh, the placement rules from ``sharding``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from convert.hf_reader import HFCheckpoint, place_all
from k2jax import model as k2model
from k2jax.config import Config
from k2jax.loaded_model import Model

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (use one of {list(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype {dtype} is not supported (use bfloat16 or float32)")
    return dtype


def _set(tree: dict, path: tuple[str, ...], index: tuple[int, ...], value: np.ndarray) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    target = node[path[-1]]
    if target[index].shape != value.shape:
        raise ValueError(f"{path}: placing {value.shape} into {target[index].shape}")
    target[index] = value


def read_hf_params(path: str | os.PathLike, dtype) -> tuple[Config, dict]:
    """Validate an HF K2-format checkpoint and assemble its params on the host (numpy)."""
    ckpt = HFCheckpoint(path)
    ckpt.validate()
    cfg = ckpt.config
    shapes = k2model.abstract_params(cfg, dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
    from convert.hf_names import all_specs

    for spec, where, value in place_all(ckpt, all_specs(cfg).values(), dtype):
        if spec.stack is None:
            _set(params, where, (), value)
        else:
            index = (spec.layer,) if spec.expert is None else (spec.layer, spec.expert)
            _set(params, (spec.stack, *where), index, value)
    return cfg, params


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "model.safetensors.index.json")) or os.path.isfile(
        os.path.join(path, "model.safetensors")
    )


def load(path: str | os.PathLike, *, dtype="bfloat16", mesh=None) -> Model:
    """Load a model from an HF K2-format checkpoint directory.

    ``dtype`` is the activation and dense-weight dtype ("bfloat16", or "float32" for parity
    work); routed experts stay INT4 (packed int32 words + bf16 group scales) either way.
    """
    dtype = _resolve_dtype(dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not is_hf_checkpoint(path):
        raise FileNotFoundError(
            f"{path}: not a checkpoint directory (no model.safetensors.index.json, "
            "model.safetensors or converted k2jax checkpoint)"
        )
    cfg, host_params = read_hf_params(path, dtype)
    params = jax.device_put(host_params)
    return Model(cfg, params, dtype, mesh)
