"""``k2jax.load``: an HF checkpoint directory (K2 format) or a converted one, as a ``Model``.

This is the top of the import graph: it composes the model, the HF reader from ``convert``
and, given a mesh, the placement rules from ``sharding``. Both are imported when a load needs
them, so ``import k2jax`` stays light (no converter, no torch, no transformers).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import model as k2model
from k2jax.kernels.platform import target_override
from k2jax.model.config import Config
from k2jax.model.quant import Int4Weight, QuantizedWeight, expert_layout_for
from k2jax.serving import placement
from k2jax.serving.loaded_model import Model

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def resolve_dtype(dtype, platform: str | None = None) -> jnp.dtype:
    """``dtype`` as a jnp dtype; ``"auto"`` is float32 on the CPU (XLA:CPU's bf16 dots are about
    20x slower than its float32 ones) and bfloat16 on accelerators, for ``platform`` (default:
    JAX's backend)."""
    if isinstance(dtype, str) and dtype == "auto":
        return jnp.dtype(
            jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (use one of {['auto', *DTYPES]})")
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
    from convert.hf_names import all_specs
    from convert.hf_reader import HFCheckpoint, place_all

    ckpt = HFCheckpoint(path)
    ckpt.validate()
    cfg = ckpt.config
    shapes = k2model.abstract_params(cfg, dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
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


def _shardings(cfg: Config, mesh, dtype, expert_layout: str = "words") -> dict:
    """Where each parameter lives: the decode rules table given a mesh, else one device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, k2model.abstract_params(cfg, dtype, expert_layout))
    from sharding.rules import param_shardings

    return param_shardings(cfg, mesh, dtype=dtype, strategy="decode", expert_layout=expert_layout)


def _platform(mesh) -> str:
    """What the model will run as: the chosen target (``K2JAX_TARGET``) if any, else the
    mesh's devices, else JAX's backend."""
    override = target_override()
    if override is not None:
        return override
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _to_runtime_layout(cfg: Config, params: dict, mesh, dtype, layout: str) -> dict:
    """The routed experts repacked once into ``layout`` (int4 on TPU), landing sharded.

    One projection at a time, each checkpoint-layout array dropped as soon as it is repacked
    (``params`` is consumed), so the transient extra memory is one projection's stack rather
    than all experts twice.
    """
    if layout == "words":
        return params
    target = _shardings(cfg, mesh, dtype, layout)["moe_layers"]["moe"]["experts"]
    experts = params["moe_layers"]["moe"].pop("experts")
    for proj in ("gate", "up", "down"):
        int4_names = Int4Weight.param_names(proj)
        out = tuple(target[name] for name in int4_names)
        packed, scale = (experts.pop(name) for name in QuantizedWeight.param_names(proj))
        int4 = jax.jit(k2model.int4_projection, out_shardings=out)(packed, scale)
        del packed, scale  # the last references: their device buffers go now
        experts.update(zip(int4_names, int4, strict=True))
    params["moe_layers"]["moe"]["experts"] = experts
    return params


def load_converted(path: str | os.PathLike, dtype, mesh=None) -> tuple[Config, dict]:
    """Restore a converted k2jax checkpoint, every array straight into its sharding.

    Arrays are stored in the converter's dtype; loading at a wider ``dtype`` (bfloat16 stored,
    float32 asked) widens exactly, a narrower one rounds.
    """
    from convert import checkpoint_format

    path = os.fspath(path)
    checkpoint_format.read_manifest(path)  # refuses unfinished or foreign directories first
    cfg = Config.from_hf(os.path.join(path, "config.json"))
    abstract = k2model.abstract_params(cfg, dtype)
    params = checkpoint_format.restore_params(path, abstract, _shardings(cfg, mesh, dtype))
    return cfg, params


def load(
    path: str | os.PathLike, *, dtype="auto", mesh=None, expert_layout: str | None = None
) -> Model:
    """Load a model from a converted k2jax checkpoint or an HF K2-format checkpoint directory.

    ``dtype`` is the activation and dense-weight dtype: "auto" (float32 on the CPU, where
    XLA's bf16 dots are ~20x slower; bfloat16 on accelerators), "bfloat16", or "float32" (parity
    work); routed experts stay INT4 (packed int32 words + bf16 group scales) either way. With a
    ``mesh``, every param is placed by the decode rules table (``sharding.rules``); a converted
    checkpoint is restored shard by shard without a host copy of the model, an HF directory is
    assembled on the host first (fine for small models; convert the real one).

    ``expert_layout`` is the routed experts' resident layout; by default the one the platform
    runs best (``k2jax.model.quant.expert_layout_for``: ``"int4"`` on TPU, ``"words"``, the
    checkpoint's packing, elsewhere). Both hold 4.5 bits per weight.
    """
    from convert import checkpoint_format

    platform = _platform(mesh)
    dtype = resolve_dtype(dtype, platform)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    layout = expert_layout or expert_layout_for(platform)
    if checkpoint_format.is_converted_checkpoint(path):
        cfg, params = load_converted(path, dtype, mesh)
        return _model(cfg, _to_runtime_layout(cfg, params, mesh, dtype, layout), dtype, mesh)
    if not is_hf_checkpoint(path):
        if os.path.isfile(os.path.join(path, "state.json")) or path.endswith(".partial"):
            raise FileNotFoundError(
                f"{path}: an unfinished conversion (no manifest); rerun the converter with --resume"
            )
        raise FileNotFoundError(
            f"{path}: not a checkpoint directory (no model.safetensors.index.json, "
            "model.safetensors or converted k2jax checkpoint)"
        )
    cfg, host_params = read_hf_params(path, dtype)
    # Each device gets its own shard of every host array (every process holds the same host
    # copy, so this works across processes too).
    params = jax.tree.map(placement.place, host_params, _shardings(cfg, mesh, dtype))
    return _model(cfg, _to_runtime_layout(cfg, params, mesh, dtype, layout), dtype, mesh)


def _model(cfg: Config, params: dict, dtype, mesh) -> Model:
    """A Model whose activations follow the decode rules on ``mesh`` (none without one)."""
    if mesh is None:
        return Model(cfg, params, dtype)
    from sharding.rules import flax_rules

    return Model(cfg, params, dtype, mesh, rules=flax_rules("decode"))
