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
from k2jax.serving import layerwise, placement
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


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _is_expert(path: tuple[str, ...]) -> bool:
    return len(path) > 2 and path[-2] == "experts"


class _LayerByLayer:
    """The layer stacks of a model, written one layer at a time into their final shardings.

    Each stack is created on first write, already sharded (``serving.layerwise``); with the int4
    layout a layer's experts arrive in the checkpoint's words and are repacked there, so a load
    holds one layer beyond the finished params, never a second copy of a stack.
    """

    def __init__(self, cfg: Config, dtype, mesh, layout: str, strategy: str = "decode"):
        self.layout = layout
        self.abstract = k2model.abstract_params(cfg, dtype, layout)
        self.shardings = _shardings(cfg, mesh, dtype, layout, strategy)
        self.words_shardings = _shardings(cfg, mesh, dtype, "words", strategy)
        self.params: dict = {}

    def write(self, path: tuple[str, ...], index: int, layer) -> None:
        """Layer ``index`` of the stacked leaf ``path`` (host array or device array)."""
        try:
            stack = _get(self.params, path)
        except KeyError:
            s = _get(self.abstract, path)
            stack = layerwise.zeros(s.shape, s.dtype, _get(self.shardings, path))
        _put(self.params, path, layerwise.write_layer(stack, index, layer))

    def write_layer(self, stack: str, index: int, host: dict[tuple[str, ...], np.ndarray]):
        """Every leaf of one layer, ``{path within the stack: host array}``."""
        words = {}
        for where, value in host.items():
            path = (stack, *where)
            if self.layout == "int4" and _is_expert(path):
                words[path] = value
            else:
                self.write(path, index, value)
        for proj in ("gate", "up", "down") if words else ():
            names = QuantizedWeight.param_names(proj)
            stack_paths = [(*path_prefix(words), name) for name in names]
            placed = [
                placement.place(
                    words.pop(p), layerwise.layer_sharding(_get(self.words_shardings, p))
                )
                for p in stack_paths
            ]
            int4_paths = [(*path_prefix(stack_paths), n) for n in Int4Weight.param_names(proj)]
            out = tuple(layerwise.layer_sharding(_get(self.shardings, p)) for p in int4_paths)
            int4 = jax.jit(k2model.int4_projection, out_shardings=out)(*placed)
            del placed
            for p, value in zip(int4_paths, int4, strict=True):
                self.write(p, index, value)
        if words:
            raise ValueError(f"unexpected expert arrays {sorted(words)}")
        # Dispatch is asynchronous: without this wait the host would read and place the next
        # layers while this one is still being written, holding several layers at once.
        jax.block_until_ready(self.params)


def path_prefix(paths) -> tuple[str, ...]:
    """The parent path shared by ``paths`` (the experts' subtree)."""
    (parent,) = {p[:-1] for p in paths}
    return parent


def read_hf_params(
    path: str | os.PathLike,
    dtype,
    mesh=None,
    layout: str = "words",
    experts: str | None = None,
    strategy: str = "decode",
):
    """Validate an HF K2-format checkpoint and place its params layer by layer.

    ``experts``: the routed experts' format (``convert.expert_formats``; None keeps the
    checkpoint's own); INT4 words then run in ``layout``, FP8 and bf16 experts as they are.

    Each layer's tensors are read, transformed and placed (each device receives only its shard)
    before the next layer is read, so the host holds one layer at a time, never the model.
    """
    from convert import expert_formats
    from convert.hf_names import all_specs, head_specs, layer_specs, stack_position
    from convert.hf_reader import HFCheckpoint, place_all

    ckpt = HFCheckpoint(path)
    cfg = ckpt.config
    experts = expert_formats.resolve(cfg, experts)
    stored = expert_formats.STORAGE_LAYOUT[experts]
    layout = layout if stored == "words" else stored  # FP8 and bf16 experts run as stored
    ckpt.validate(all_specs(cfg, experts))
    built = _LayerByLayer(cfg, dtype, mesh, layout, strategy)
    params = built.params
    for _, where, value in place_all(ckpt, head_specs(cfg), dtype):
        _put(params, where, placement.place(value, _get(built.shardings, where)))
    words = k2model.abstract_params(cfg, dtype, stored)
    for layer in range(cfg.num_layers):
        stack, index = stack_position(cfg, layer)
        host: dict[tuple[str, ...], np.ndarray] = {}
        for spec, where, value in place_all(ckpt, layer_specs(cfg, layer, experts), dtype):
            if spec.expert is None:
                host[where] = value
                continue
            if where not in host:
                per_layer = _get(words, (stack, *where)).shape[1:]
                host[where] = np.empty(per_layer, value.dtype)
            host[where][spec.expert] = value
        built.write_layer(stack, index, host)
        del host
    return cfg, params


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "model.safetensors.index.json")) or os.path.isfile(
        os.path.join(path, "model.safetensors")
    )


def _shardings(
    cfg: Config, mesh, dtype, expert_layout: str = "words", strategy: str = "decode"
) -> dict:
    """Where each parameter lives: ``strategy``'s rules table given a mesh, else one device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, k2model.abstract_params(cfg, dtype, expert_layout))
    from sharding.rules import param_shardings

    return param_shardings(cfg, mesh, dtype=dtype, strategy=strategy, expert_layout=expert_layout)


def _platform(mesh) -> str:
    """What the model will run as: the chosen target (``K2JAX_TARGET``) if any, else the
    mesh's devices, else JAX's backend."""
    override = target_override()
    if override is not None:
        return override
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _converted_expert_layout(manifest: dict, experts: str | None) -> str:
    """The params layout a converted checkpoint stores its experts in (``--experts``)."""
    from convert.expert_formats import STORAGE_LAYOUT

    stored = manifest.get("experts", "int4")
    if experts is not None and experts != stored:
        raise ValueError(
            f"experts={experts!r}: this converted checkpoint holds {stored} experts; convert "
            f"the HF checkpoint again with --experts {experts}"
        )
    return STORAGE_LAYOUT[stored]


def load_converted(
    path: str | os.PathLike,
    dtype,
    mesh=None,
    layout: str = "words",
    experts: str | None = None,
    strategy: str = "decode",
) -> tuple[Config, dict]:
    """Restore a converted k2jax checkpoint, every array straight into its sharding.

    Arrays are stored in the converter's dtype; loading at a wider ``dtype`` (bfloat16 stored,
    float32 asked) widens exactly, a narrower one rounds. The checkpoint stores experts in the
    words layout: for the int4 layout they are read one layer at a time and repacked on the
    devices (``_LayerByLayer``), everything else is restored by orbax shard by shard.
    """
    from convert import checkpoint_format

    path = os.fspath(path)
    manifest = checkpoint_format.read_manifest(path)  # refuses unfinished or foreign ones first
    cfg = Config.from_hf(os.path.join(path, "config.json"))
    stored = _converted_expert_layout(manifest, experts)
    abstract = k2model.abstract_params(cfg, dtype, stored)
    shardings = _shardings(cfg, mesh, dtype, stored, strategy)
    if layout == "words" or stored != "words":
        return cfg, checkpoint_format.restore_params(path, abstract, shardings)
    params = checkpoint_format.restore_params(path, abstract, shardings, leave_out=_is_expert)
    built = _LayerByLayer(cfg, dtype, mesh, layout, strategy)
    experts = abstract["moe_layers"]["moe"]["experts"]
    for index in range(cfg.num_moe_layers):
        host = {
            ("moe", "experts", name): checkpoint_format.read_layer(
                path, ("moe_layers", "moe", "experts", name), index, s.dtype
            )
            for name, s in experts.items()
        }
        built.write_layer("moe_layers", index, host)
        del host
    params["moe_layers"]["moe"]["experts"] = built.params["moe_layers"]["moe"]["experts"]
    return cfg, params


def load(
    path: str | os.PathLike,
    *,
    dtype="auto",
    mesh=None,
    expert_layout: str | None = None,
    experts: str | None = None,
    strategy: str = "decode",
) -> Model:
    """Load a model from a converted k2jax checkpoint or an HF K2-format checkpoint directory.

    ``dtype`` is the activation and dense-weight dtype: "auto" (float32 on the CPU, where
    XLA's bf16 dots are ~20x slower; bfloat16 on accelerators), "bfloat16", or "float32" (parity
    work); routed experts stay INT4 (packed int32 words + bf16 group scales) either way. With a
    ``mesh``, every param is placed by ``strategy``'s rules table (``sharding.rules``: "decode",
    or "dp_attention" for data-parallel attention with the page pool split over the batch's
    axes), which the model's activations then follow; a converted
    checkpoint is restored shard by shard without a host copy of the model, an HF directory is
    read and placed one layer at a time (each device receives only its shards).

    ``expert_layout`` is the routed experts' resident layout; by default the one the platform
    runs best (``k2jax.model.quant.expert_layout_for``: ``"int4"`` on TPU, ``"words"``, the
    checkpoint's packing, elsewhere). Both hold 4.5 bits per weight.

    ``experts`` picks the routed experts' format for an FP8 checkpoint (K2 Instruct,
    DeepSeek-V3/V3.1/R1; see docs/fp8.md): ``"fp8"`` (kept as stored, 1 byte per weight),
    ``"int4"`` (re-quantized to K2 Thinking's INT4, then laid out as ``expert_layout``) or
    ``"bf16"`` (widened to ``dtype``); None keeps the checkpoint's own format. A converted
    checkpoint holds the format it was converted with.
    """
    from convert import checkpoint_format

    platform = _platform(mesh)
    dtype = resolve_dtype(dtype, platform)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    layout = expert_layout or expert_layout_for(platform)
    if checkpoint_format.is_converted_checkpoint(path):
        cfg, params = load_converted(path, dtype, mesh, layout, experts, strategy)
        return _model(cfg, params, dtype, mesh, strategy)
    if not is_hf_checkpoint(path):
        if os.path.isfile(os.path.join(path, "state.json")) or path.endswith(".partial"):
            raise FileNotFoundError(
                f"{path}: an unfinished conversion (no manifest); rerun the converter with --resume"
            )
        raise FileNotFoundError(
            f"{path}: not a checkpoint directory (no model.safetensors.index.json, "
            "model.safetensors or converted k2jax checkpoint)"
        )
    cfg, params = read_hf_params(path, dtype, mesh, layout, experts, strategy)
    return _model(cfg, params, dtype, mesh, strategy)


def _model(cfg: Config, params: dict, dtype, mesh, strategy: str = "decode") -> Model:
    """A Model whose activations follow ``strategy``'s rules on ``mesh`` (none without one)."""
    if mesh is None:
        return Model(cfg, params, dtype)
    from sharding.rules import flax_rules

    return Model(cfg, params, dtype, mesh, rules=flax_rules(strategy))
