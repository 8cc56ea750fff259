"""The K2 transformer: embedding, scanned dense and MoE layer stacks, final norm, lm_head.

Pure functions over an explicit params pytree::

    {"embed": [V, D], "dense_layers": Block params stacked [L_dense, ...],
     "moe_layers": Block params stacked [L_moe, ...], "final_norm": {"scale": [D]},
     "lm_head": [D, V]}

Each stack runs as one ``jax.lax.scan`` over ``Block.apply`` (compiled once whatever the
layer count); ``scan_layers=False`` unrolls the same params layer by layer (for tests and
debugging). A stack given as a tuple of per-layer dicts (``unstack_layers``, what the engine
uses on one CPU device) runs unrolled over those arrays without slicing anything. The paged KV
cache, when given, is carried through the layers and updated in place.

Logical axis names of every parameter come from ``param_axes``; ``sharding`` maps them to mesh
axes. Activations carry logical hints (``act_batch``, ``vocab``) that take effect only under
``flax.linen.logical_axis_rules`` and a mesh (``jax.set_mesh``); without them they are no-ops.
This module never imports ``sharding`` or ``convert``.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax.kernels.int4_format import GROUP_SIZE, NIBBLES_PER_WORD, OFFSET
from k2jax.model import kv_cache
from k2jax.model.attention import MLAttention
from k2jax.model.config import Config
from k2jax.model.layers import MLP, RMSNorm, fan_in_init, param
from k2jax.model.moe import MoE, mesh_axes
from k2jax.model.quant import (
    CHECKPOINT_ONLY_LAYOUTS,
    LAYOUTS,
    FloatWeight,
    Int4Weight,
    QuantizedWeight,
    layout_of,
    quantize_int4,
    to_int4_layout,
)
from k2jax.model.rope import rope_tables

STACKS = ("dense_layers", "moe_layers")


def hint(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained to the mesh axes the context's logical rules give ``names``.

    A dimension its mesh axes do not divide (batch 1 over data=2) is left to the partitioner:
    an uneven split would pad every replica's activations. No-op without a mesh or rules.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return x
    names = tuple(
        n if n is None or size % math.prod(mesh.shape[a] for a in mesh_axes(n)) == 0 else None
        for n, size in zip(names, x.shape, strict=True)
    )
    return nn.with_logical_constraint(x, names)


class Block(nn.Module):
    """One decoder layer: x + MLA(norm(x)), then + MLP-or-MoE(norm(x))."""

    cfg: Config
    is_moe: bool
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD, cos, sin, positions_BT, cache=None, layer=0, stack_index=None):
        """``layer``: the absolute layer (the cache's); ``stack_index``: the index in this
        block's stack, needed when the int4 expert params are passed as the whole stack."""
        c = self.cfg
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", self.dtype, name="attn_norm")(x_BTD)
        with jax.named_scope("attention"):
            attn_BTD, pages = MLAttention(c, self.dtype, name="attn")(
                h, cos, sin, positions_BT, cache, layer
            )
        x_BTD = x_BTD + attn_BTD
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", self.dtype, name="mlp_norm")(x_BTD)
        if self.is_moe:
            with jax.named_scope("moe"):
                mlp_BTD = MoE(c, self.dtype, name="moe")(h, stack_index)
        else:
            with jax.named_scope("dense_mlp"):
                mlp_BTD = MLP(c.hidden_size, c.intermediate_size, "mlp", self.dtype, name="mlp")(h)
        return x_BTD + mlp_BTD, pages


class Head(nn.Module):
    """Token embedding in, final norm and untied lm_head out."""

    cfg: Config
    dtype: jnp.dtype = jnp.bfloat16

    def setup(self) -> None:
        c = self.cfg
        self.embed = param(
            self,
            "embed",
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            self.dtype,
            nn.initializers.normal(1.0),
        )
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", self.dtype)
        self.lm_head = param(
            self,
            "lm_head",
            (c.hidden_size, c.vocab_size),
            ("embed", "vocab"),
            self.dtype,
            fan_in_init(0),
        )

    def __call__(self, tokens_BT):
        """Embed then un-embed: touches every parameter, which is what ``init`` needs."""
        return self.logits(self.embed_tokens(tokens_BT))

    def embed_tokens(self, tokens_BT):
        return jnp.take(self.embed, tokens_BT, axis=0)

    def logits(self, x_BTD):
        h = self.final_norm(x_BTD)
        return jnp.einsum("BTD,DV->BTV", h, self.lm_head, preferred_element_type=jnp.float32)


def _stack_sizes(cfg: Config) -> dict[str, int]:
    return {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}


def _block(cfg: Config, stack: str, dtype) -> Block:
    return Block(cfg, stack == "moe_layers", dtype)


def _init_boxed(cfg: Config, key: jax.Array, dtype) -> dict:
    """Boxed (logically partitioned) params; stacks get a leading 'layers' axis."""
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    cos, sin = rope_tables(cfg, pos)
    keys = jax.random.split(key, 3)
    head = Head(cfg, dtype).init(keys[0], pos)["params"]
    params = {"embed": head["embed"], "final_norm": head["final_norm"], "lm_head": head["lm_head"]}
    for stack, k in zip(STACKS, keys[1:], strict=True):
        n = _stack_sizes(cfg)[stack]
        if n == 0:
            continue
        block = _block(cfg, stack, dtype)
        init_one = functools.partial(block.init, x_BTD=x, cos=cos, sin=sin, positions_BT=pos)
        stacked = jax.vmap(lambda k1, f=init_one: f(k1)["params"])(jax.random.split(k, n))
        params[stack] = jax.tree.map(
            lambda b: b.replace(names=("layers", *b.names)),
            stacked,
            is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned),
        )
    return params


def init_params(cfg: Config, key: jax.Array, dtype=jnp.bfloat16) -> dict:
    """Random params (unit fan-in scaling, INT4 experts packed): the seeded default model."""
    return nn.unbox(_init_boxed(cfg, key, dtype))


EXPERT_LAYOUTS = tuple(LAYOUTS)
_PROJECTION_AXES = {
    "gate": ("expert_mlp", "expert_embed"),
    "up": ("expert_mlp", "expert_embed"),
    "down": ("expert_embed", "expert_mlp"),
}


def to_expert_layout(params: dict, layout: str, group_size: int = GROUP_SIZE) -> dict:
    """``params`` with the routed experts in resident ``layout``.

    ``"words"`` is the checkpoint's packing (``{proj}_packed`` int32 [L, E, O, I/8] +
    ``{proj}_scale`` bf16 [L, E, O, G]), what ``init_params`` and the loaders produce.
    ``"int4"`` is the TPU layout (``{proj}_values`` int4 [L, E, G, S, O] +
    ``{proj}_group_scale`` bf16 [L, E, G, O]; see ``k2jax.model.quant.Int4Weight``). Both are
    4.5 bits per weight. ``"float"`` is training's float32 master weights (``{proj}_weight``
    [L, E, O, I], ``k2jax.train``): words widen to it exactly, and it rounds back to words
    (round to nearest, groups of ``group_size``). Works on arrays and on ShapeDtypeStructs
    (via ``jax.eval_shape``).
    """
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    experts = params.get("moe_layers", {}).get("moe", {}).get("experts")
    current = None if experts is None else layout_of(experts)
    if current in (None, layout):
        return params
    if layout in CHECKPOINT_ONLY_LAYOUTS or current in CHECKPOINT_ONLY_LAYOUTS:
        raise ValueError(
            f"experts in layout {current!r} cannot become {layout!r}: FP8 and dense experts "
            "come from an FP8 checkpoint (k2jax.load(..., experts=...))"
        )
    if current == "int4":
        raise ValueError(f"converting int4-layout experts to {layout} is not supported")
    if "float" in (current, layout):
        return _with_experts(params, _float_conversion(experts, layout, group_size))
    converted = {}
    for proj in _PROJECTION_AXES:
        words = (experts[name] for name in QuantizedWeight.param_names(proj))
        values_name, scale_name = Int4Weight.param_names(proj)
        converted[values_name], converted[scale_name] = int4_projection(*words)
    return _with_experts(params, converted)


def _with_experts(params: dict, experts: dict) -> dict:
    moe = {**params["moe_layers"]["moe"], "experts": experts}
    return {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}


def _float_conversion(experts: dict, layout: str, group_size: int) -> dict:
    """words -> float (exact dequantization, training's master weights) or float -> words
    (round-to-nearest INT4, ``quantize_int4``: what a trained model is exported as)."""
    out = {}
    for proj in _PROJECTION_AXES:
        (float_name,) = FloatWeight.param_names(proj)
        packed_name, scale_name = QuantizedWeight.param_names(proj)
        if layout == "float":
            packed, scale = experts[packed_name], experts[scale_name]
            group = packed.shape[-1] * NIBBLES_PER_WORD // scale.shape[-1]
            w = QuantizedWeight(packed, scale, group)
            out[float_name] = w.dequantize(jnp.float32)
        elif layout == "words":
            q, scale = quantize_int4(experts[float_name], group_size)
            out[packed_name], out[scale_name] = pack_int4(q), scale
        else:
            raise ValueError(f"converting float experts to {layout!r} is not supported")
    return out


def pack_int4(q: jax.Array) -> jax.Array:
    """Signed INT4 values [..., O, I] into the checkpoint's int32 words [..., O, I/8] (jnp; the
    inverse of ``k2jax.kernels.int4_format.unpack_int4``)."""
    nibbles = (q.astype(jnp.int32) + OFFSET).astype(jnp.uint32)
    nibbles = nibbles.reshape(*q.shape[:-1], q.shape[-1] // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    shifts = 4 * jnp.arange(NIBBLES_PER_WORD, dtype=jnp.uint32).reshape((1,) * q.ndim + (-1,))
    words = jnp.sum(nibbles << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def int4_projection(packed: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One projection's stack from checkpoint words to the int4 layout: (values, group_scale)."""
    group_size = packed.shape[-1] * 8 // scale.shape[-1]
    w = to_int4_layout(QuantizedWeight(packed, scale, group_size))
    return w.values, w.scale


def param_axes(cfg: Config, dtype=jnp.bfloat16, expert_layout: str = "words") -> dict:
    """The logical axis names of every parameter, as a tree of tuples shaped like the params."""
    boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0), dtype))
    axes = jax.tree.map(
        lambda b: tuple(b.names), boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
    )
    if expert_layout == "float" and cfg.num_moe_layers:
        experts = axes["moe_layers"]["moe"]["experts"]
        axes["moe_layers"]["moe"]["experts"] = {
            FloatWeight.param_names(proj)[0]: experts[QuantizedWeight.param_names(proj)[0]]
            for proj in _PROJECTION_AXES
        }
    if expert_layout == "int4" and cfg.num_moe_layers:
        lead = ("layers", "experts")
        experts = {}
        for proj, (out, inp) in _PROJECTION_AXES.items():
            # values [L, E, G, S, O]: the group axis runs over the inputs, S within a group.
            values_name, scale_name = Int4Weight.param_names(proj)
            experts[values_name] = (*lead, inp, None, out)
            experts[scale_name] = (*lead, inp, out)
        axes["moe_layers"]["moe"]["experts"] = experts
    if expert_layout in CHECKPOINT_ONLY_LAYOUTS and cfg.num_moe_layers:
        axes["moe_layers"]["moe"]["experts"] = {
            name: ("layers", *names)
            for proj, (out, inp) in _PROJECTION_AXES.items()
            for name, names in LAYOUTS[expert_layout].param_axes(proj, out, inp).items()
        }
    return axes


def abstract_params(cfg: Config, dtype=jnp.bfloat16, expert_layout: str = "words") -> dict:
    """ShapeDtypeStructs of every parameter, without allocating anything."""
    if expert_layout in CHECKPOINT_ONLY_LAYOUTS:
        shapes = abstract_params(cfg, dtype)
        if cfg.num_moe_layers:
            e, d, m = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
            experts = {}
            for proj, (out, inp) in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
                per_layer = LAYOUTS[expert_layout].param_shapes(proj, e, out, inp, dtype)
                experts.update(
                    {
                        k: jax.ShapeDtypeStruct((cfg.num_moe_layers, *v.shape), v.dtype)
                        for k, v in per_layer.items()
                    }
                )
            shapes["moe_layers"]["moe"]["experts"] = experts
        return shapes
    return jax.eval_shape(
        lambda: to_expert_layout(init_params(cfg, jax.random.key(0), dtype), expert_layout)
    )


def forward(
    params: dict,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    cache: kv_cache.PagedCache | None = None,
    *,
    cfg: Config,
    dtype=jnp.bfloat16,
    scan_layers: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """Hidden states after the last layer [B, T, D] and the updated page pool (or None).

    Positions are absolute token positions; negative ones mark padding (never attended to and,
    with a cache, never written to a live page). Without a cache, attention is causal over this
    call's tokens; with one, each token attends to its sequence's cached positions <= its own.
    """
    x_BTD = embed(params, tokens_BT, cfg=cfg, dtype=dtype)
    return run_layers(
        params, x_BTD, positions_BT, cache, cfg=cfg, dtype=dtype, scan_layers=scan_layers
    )


def embed(params: dict, tokens_BT: jax.Array, *, cfg: Config, dtype=jnp.bfloat16) -> jax.Array:
    """The tokens' embeddings [B, T, D], split as the residual stream is (by batch)."""
    head = Head(cfg, dtype)
    head_params = {k: params[k] for k in ("embed", "final_norm", "lm_head")}
    x_BTD = head.apply({"params": head_params}, tokens_BT, method=Head.embed_tokens)
    # The residual stream is split by batch only; without this hint the partitioner may keep
    # the vocab-split embedding's layout and reshard inside every layer.
    return hint(x_BTD, ("act_batch", None, None))


def run_layers(
    params: dict,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    cache: kv_cache.PagedCache | None = None,
    *,
    cfg: Config,
    dtype=jnp.bfloat16,
    scan_layers: bool = True,
    stacks: tuple[str, ...] = STACKS,
) -> tuple[jax.Array, jax.Array | None]:
    """``x_BTD`` through the layer stacks named in ``stacks`` (in model order; each keeps its
    own layer indices into the cache) and the updated page pool (or None). ``forward`` runs
    them all; ``sharding.plan`` runs the MoE stack a second time to measure one MoE layer."""
    cos, sin = rope_tables(cfg, positions_BT)
    pages = None if cache is None else cache.pages
    layer = 0
    for stack in STACKS:
        n = _stack_sizes(cfg)[stack]
        first_of_stack, layer = layer, layer + n
        if n == 0 or stack not in stacks:
            continue
        block = _block(cfg, stack, dtype)
        unstacked = isinstance(params[stack], list | tuple)  # from ``unstack_layers``
        if unstacked:
            layer_params_list, whole = params[stack], None
            if len(layer_params_list) != n:
                raise ValueError(f"{stack}: {len(layer_params_list)} layers, the config has {n}")
        else:
            per_layer, whole = _split_in_place(params[stack])

        def step(carry, layer_params, block=block, first=first_of_stack, whole=whole):
            x, pages, layer = carry
            layer_cache = None if pages is None else kv_cache.PagedCache(pages, cache.block_tables)
            x, pages = block.apply(
                {"params": _merge_in_place(layer_params, whole)},
                x,
                cos,
                sin,
                positions_BT,
                layer_cache,
                layer,
                layer - first,
            )
            x = hint(x, ("act_batch", None, None))
            return (x, pages, layer + 1), None

        carry = (x_BTD, pages, jnp.asarray(first_of_stack, jnp.int32))
        if unstacked:
            for layer_params in layer_params_list:
                carry, _ = step(carry, layer_params)
        elif scan_layers:
            carry, _ = jax.lax.scan(step, carry, per_layer)
        else:
            for i in range(n):
                carry, _ = step(carry, jax.tree.map(lambda a, i=i: a[i], per_layer))
        x_BTD, pages, _ = carry
    return x_BTD, pages


def unstack_layers(params: dict) -> dict:
    """``params`` with each layer stack as a tuple of per-layer param dicts.

    ``forward`` runs such stacks unrolled, every weight its own array. That is what the CPU
    wants: XLA:CPU's dots cannot read a slice of a stacked array in place, so a scanned (or
    ``a[i]``-unrolled) stack copies every layer's weights out before its matmuls, each step
    (measured: ~30% of a decode step of the benchmark model). On one CPU device the layers are
    views of the stacked buffers (``jax.device_put`` of a numpy view aliases it), so this costs
    no memory; elsewhere each layer is a copy. The stacked form stays the canonical one
    (checkpoints, sharding rules, TPU scans).
    """
    out = dict(params)
    for stack in STACKS:
        if stack not in params or isinstance(params[stack], list | tuple):
            continue
        n = jax.tree.leaves(params[stack])[0].shape[0]
        out[stack] = tuple(
            jax.tree.map(lambda a, i=i: _layer_of(a, i), params[stack]) for i in range(n)
        )
    return out


def _layer_of(a: jax.Array, i: int) -> jax.Array:
    """Layer ``i`` of stacked array ``a``: an aliasing view on one CPU device, else a copy."""
    if isinstance(a, jax.Array) and a.is_fully_addressable and len(a.devices()) == 1:
        (device,) = a.devices()
        if device.platform == "cpu":
            return jax.device_put(np.asarray(a)[i], device)
    return a[i]


def _split_in_place(stack_params: dict) -> tuple[dict, dict | None]:
    """(params sliced per layer by the scan, int4 experts passed whole or None).

    The int4 routed experts feed a Pallas custom call, whose operands XLA cannot fuse: a scan's
    per-layer slice of them (or an unrolled ``a[i]``) is materialized, i.e. every MoE layer
    copied its local experts (K2, v5p-64: ~0.6 GB read + written per layer per device) before the
    kernel read a few tiles of them. Passed whole, with the layer index, the kernel reads the
    chosen tiles in place (``Int4Weight.layer``). Every other weight feeds XLA ops, which fuse
    the slice into their consumer, and stays scanned. The CPU's packed words go the same way:
    its tile loop (``words_tiled``) is an inner while loop, whose operands are materialized too.
    """
    experts = stack_params.get("moe", {}).get("experts")
    if experts is None:
        return stack_params, None
    moe = {k: v for k, v in stack_params["moe"].items() if k != "experts"}
    return {**stack_params, "moe": moe}, experts


def _merge_in_place(layer_params: dict, whole: dict | None) -> dict:
    if whole is None:
        return layer_params
    return {**layer_params, "moe": {**layer_params["moe"], "experts": whole}}


def lm_logits(params: dict, x_BTD: jax.Array, *, cfg: Config, dtype=jnp.bfloat16) -> jax.Array:
    """float32 logits [B, T, V] from final hidden states."""
    head_params = {k: params[k] for k in ("embed", "final_norm", "lm_head")}
    logits_BTV = Head(cfg, dtype).apply({"params": head_params}, x_BTD, method=Head.logits)
    return hint(logits_BTV, ("act_batch", None, "vocab"))
