"""INT4 routed-expert weights, kept packed in device memory: one interface, two resident layouts.

Both layouts hold K2 Thinking's format (``k2jax.kernels.int4_format``: symmetric INT4, one bf16
scale per 32 inputs, 4.5 bits per weight) and implement ``ExpertWeight``:

- ``QuantizedWeight`` (layout ``"words"``): int32 words [E, O, I/8] + bf16 scales [E, O, G], the
  checkpoint's own packing. Used on the CPU, where ``jnp.int4`` takes a byte per element.
- ``Int4Weight`` (layout ``"int4"``): native ``int4`` [E, G, S, O] (input-major, S = group size)
  + bf16 scales [E, G, O]. Used on TPU, which stores int4 packed; XLA fuses its widening
  convert and group-scale multiply into the dot, and the Pallas kernel reads its tiles directly.
  Built once at load time by ``to_int4_layout``.

Either may be a whole layer stack [L, ...] with ``layer`` set (an int32 scalar): the weight is
then layer ``layer`` of it. The model passes its routed experts this way so the kernels (and the
CPU's tile loop) index the chosen experts in place; a scan's per-layer slice feeding a custom
call or an inner loop would be materialized, copying every expert of the layer each step.

Two more layouts come from FP8 checkpoints (DeepSeek-V3/R1, Kimi K2 Instruct): ``Fp8Weight``
(layout ``"fp8"``: the checkpoint's float8_e4m3fn values + float32 128x128 block scales, 1 byte
per weight) and ``DenseWeight`` (layout ``"dense"``: widened). See docs/fp8.md.

All are registered pytrees, so stacks slice, scan, shard and checkpoint like plain arrays. The
expert matmuls that consume them live in ``k2jax.model.expert_matmul``; code asks a weight what
it is through this interface (``layout``, ``num_experts``, ``expert``, ...), never by probing
param names or by ``isinstance`` chains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k2jax.kernels.int4_format import NIBBLES_PER_WORD, unpack_int4, words_to_int4
from k2jax.kernels.platform import target_platform

FP8_BLOCK = 128  # DeepSeek's and Kimi K2 Instruct's 128x128 scale blocks


def fp8_scale_grid(out: int, inp: int) -> tuple[int, int]:
    """The block-scale grid of an FP8 weight [out, inp] (ragged edge blocks included)."""
    return -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)


class ExpertWeight(Protocol):
    """What every resident layout of a routed-expert weight [E, O, I] offers."""

    layout: ClassVar[str]
    layer: jax.Array | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [E, O, I] (of one layer when ``layer`` is set)."""

    @property
    def num_experts(self) -> int: ...

    def unstacked(self) -> ExpertWeight:
        """This layer's weight without the stack (a dynamic slice; itself when not stacked)."""

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dense weight [E, O, I] in ``dtype`` (of layer ``layer`` when stacked)."""

    def take(self, ids: jax.Array) -> ExpertWeight:
        """The experts ``ids`` (any shape) of this layer, unstacked: [*ids.shape, O, I]."""

    def expert(self, e: jax.Array) -> jax.Array:
        """Expert ``e`` of this layer as float32 [O, I], read in place from a stack."""

    def device_bytes(self) -> int:
        """Bytes the payload and the scales occupy on their devices."""

    def shard_spec(
        self, expert_axes: tuple[str, ...], out_axes: tuple[str, ...] = (), in_axes=()
    ) -> ExpertWeight:
        """PartitionSpecs (same pytree) splitting the expert axis over ``expert_axes`` and the
        output / input axis of each expert over ``out_axes`` / ``in_axes`` (the intermediate
        axis of gate and up / of down, ``k2jax.model.moe.expert_split``); the layer axis of a
        stack is never split and the layer index is replicated."""

    @classmethod
    def param_names(cls, proj: str) -> tuple[str, str]:
        """The params (payload, scales) that hold projection ``proj`` in this layout."""

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None): ...


def _device_bytes(*arrays) -> int:
    return sum(a.on_device_size_in_bytes() for a in arrays)


def _stack_spec(w, expert_axes: tuple[str, ...], *rest: tuple[str, ...]) -> PartitionSpec:
    """[(L,) E, *rest]: the experts over ``expert_axes``, each later axis over its entry."""
    lead = (expert_axes or None,) if w.layer is None else (None, expert_axes or None)
    return PartitionSpec(*lead, *(axes or None for axes in rest))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An INT4 weight [..., O, I]: packed int32 words [..., O, I/8] + scales [..., O, I/G]."""

    layout: ClassVar[str] = "words"

    packed: jax.Array
    scale: jax.Array
    group_size: int = dataclasses.field(default=32, metadata={"static": True})
    layer: jax.Array | None = None

    def unstacked(self) -> QuantizedWeight:
        if self.layer is None:
            return self
        return QuantizedWeight(
            jax.lax.dynamic_index_in_dim(self.packed, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.scale, self.layer, keepdims=False),
            self.group_size,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, out, words = self.packed.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, out, words * NIBBLES_PER_WORD)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Products are exact in float32."""
        if self.layer is not None:
            return self.unstacked().dequantize(dtype)
        q = unpack_int4(self.packed)
        *lead, out, inp = q.shape
        groups = q.reshape(*lead, out, inp // self.group_size, self.group_size)
        w = groups.astype(dtype) * self.scale.astype(dtype)[..., None]
        return w.reshape(*lead, out, inp)

    def take(self, ids: jax.Array) -> QuantizedWeight:
        w = self.unstacked()
        return QuantizedWeight(w.packed[ids], w.scale[ids], self.group_size)

    def expert(self, e: jax.Array) -> jax.Array:
        # Indexing the whole stack (layer, expert) reads just this expert.
        at = (e,) if self.layer is None else (self.layer, e)
        return QuantizedWeight(self.packed[at], self.scale[at], self.group_size).dequantize()

    def device_bytes(self) -> int:
        return _device_bytes(self.packed, self.scale)

    def shard_spec(self, expert_axes, out_axes=(), in_axes=()) -> QuantizedWeight:
        # packed [E, O, I/8] and scale [E, O, I/G] split alike: whole groups per shard.
        spec = _stack_spec(self, expert_axes, out_axes, in_axes)
        return QuantizedWeight(
            spec, spec, self.group_size, None if self.layer is None else PartitionSpec()
        )

    @classmethod
    def param_names(cls, proj: str) -> tuple[str, str]:
        return f"{proj}_packed", f"{proj}_scale"

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None):
        packed_name, scale_name = cls.param_names(proj)
        packed = params[packed_name]
        return cls(packed, params[scale_name], group_size, _layer(packed, 4, layer, proj))


class _ValuesAndScale:
    """What ``Int4Weight`` and ``Fp8Weight`` share: a stack of ``values`` with its ``scale`` (and
    an optional ``layer`` index into both), taken, sliced, sized and sharded alike. Subclasses
    name their two params (``SUFFIXES``) and the rank of a stacked values array
    (``STACKED_NDIM``: [L, E, ...])."""

    SUFFIXES: ClassVar[tuple[str, str]]
    STACKED_NDIM: ClassVar[int]

    def unstacked(self):
        if self.layer is None:
            return self
        return type(self)(
            jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.scale, self.layer, keepdims=False),
        )

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def take(self, ids: jax.Array):
        w = self.unstacked()
        return type(self)(w.values[ids], w.scale[ids])

    def expert(self, e: jax.Array) -> jax.Array:
        at = (e,) if self.layer is None else (self.layer, e)
        return type(self)(self.values[at], self.scale[at]).dequantize()

    def device_bytes(self) -> int:
        return _device_bytes(self.values, self.scale)

    def shard_spec(self, expert_axes, out_axes=(), in_axes=()):
        values, scale = self._split_specs(expert_axes, out_axes, in_axes)
        return type(self)(values, scale, None if self.layer is None else PartitionSpec())

    @classmethod
    def param_names(cls, proj: str) -> tuple[str, str]:
        return tuple(f"{proj}_{suffix}" for suffix in cls.SUFFIXES)

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None):
        del group_size  # the layout carries it (int4: the values' S axis; fp8: 128x128 blocks)
        values_name, scale_name = cls.param_names(proj)
        values = params[values_name]
        return cls(values, params[scale_name], _layer(values, cls.STACKED_NDIM, layer, proj))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight(_ValuesAndScale):
    """An INT4 weight [..., O, I] in TPU runtime layout: int4 [..., G, S, O] + bf16 [..., G, O]."""

    layout: ClassVar[str] = "int4"
    SUFFIXES: ClassVar[tuple[str, str]] = ("values", "group_scale")
    STACKED_NDIM: ClassVar[int] = 5  # [L, E, G, S, O]

    values: jax.Array
    scale: jax.Array
    layer: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, groups, size, out = self.values.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, out, groups * size)

    @property
    def group_size(self) -> int:
        return self.values.shape[-2]

    def _split_specs(self, expert_axes, out_axes, in_axes):
        # values [E, G, S, O] (G over the inputs) and scale [E, G, O].
        return (
            _stack_spec(self, expert_axes, in_axes, (), out_axes),
            _stack_spec(self, expert_axes, in_axes, out_axes),
        )

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        if self.layer is not None:
            return self.unstacked().dequantize(dtype)
        w = self.values.astype(dtype) * self.scale.astype(dtype)[..., None, :]
        *lead, groups, size, out = w.shape
        return jnp.swapaxes(w.reshape(*lead, groups * size, out), -1, -2)


def _layer(payload: jax.Array, stacked_ndim: int, layer, proj: str):
    """``layer`` for a whole-stack payload [L, ...], None for one layer's."""
    if payload.ndim != stacked_ndim:
        return None
    if layer is None:
        raise ValueError(f"{proj}: a stacked [L, ...] expert weight needs its layer index")
    return layer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight(_ValuesAndScale):
    """An FP8 weight [..., O, I] in DeepSeek's block format, as the checkpoint stores it:
    ``values`` float8_e4m3fn [..., O, I] and ``scale`` float32 [..., 1, ceil(O/128) *
    ceil(I/128)], the checkpoint's ``weight_scale_inv`` grid flattened row-major, so that W[o, i] =
    values[o, i] * grid[o // 128, i // 128] (edge blocks of a dimension that is not a multiple
    of 128 are ragged). 1 byte per weight plus 4 per 16384. Widened next to the matmul: the TPU
    kernel ``k2jax.kernels.fp8_pallas`` reads the FP8 tiles and scales; the CPU widens one
    chosen expert at a time.

    Why this shape: TPUs lay out a small-minor array like [L, E, 16, 56] with another axis
    minor, so a kernel operand of that shape was copied into row-major order before every call
    (seen in the compiled HLO: ~0.1 GB per MoE layer per device for K2), and a kernel block's
    last two dims must be the array's (or multiples of (8, 128)): [L, E, 1, 896] is stored
    row-major and one expert's grid is one block."""

    layout: ClassVar[str] = "fp8"
    SUFFIXES: ClassVar[tuple[str, str]] = ("fp8", "block_scale")
    STACKED_NDIM: ClassVar[int] = 4  # [L, E, O, I]

    values: jax.Array
    scale: jax.Array
    layer: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape if self.layer is None else self.values.shape[1:]

    def _split_specs(self, expert_axes, out_axes, in_axes):
        if out_axes or in_axes:
            # The scale grid is flattened per expert ([E, 1, rows * cols]): a slice of the
            # values has no matching slice of it.
            raise ValueError(
                "FP8 experts cannot be split inside an expert (the scale grid is "
                "flattened); split them over the expert axis only"
            )
        spec = _stack_spec(self, expert_axes)
        return spec, spec

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Each value times its block's scale in float32 (DeepSeek's ``weight_dequant``), then
        cast to ``dtype``."""
        w = self.unstacked()
        *lead, out, inp = w.values.shape
        grid = w.scale.reshape(*lead, *fp8_scale_grid(out, inp))
        s = jnp.repeat(jnp.repeat(grid, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
        return (w.values.astype(jnp.float32) * s[..., :out, :inp]).astype(dtype)

    @classmethod
    def param_shapes(cls, proj: str, experts: int, out: int, inp: int, dtype) -> dict:
        del dtype  # stored as on disk
        values_name, scale_name = cls.param_names(proj)
        return {
            values_name: jax.ShapeDtypeStruct((experts, out, inp), jnp.float8_e4m3fn),
            scale_name: jax.ShapeDtypeStruct(
                (experts, 1, math.prod(fp8_scale_grid(out, inp))), jnp.float32
            ),
        }

    @classmethod
    def param_axes(cls, proj: str, out: str, inp: str) -> dict:
        """Logical axes per param (the leading layer axis of a stack excluded)."""
        values_name, scale_name = cls.param_names(proj)
        return {values_name: ("experts", out, inp), scale_name: ("experts", None, None)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseWeight:
    """Routed experts [E, O, I] as a plain float array (``{proj}_dense``): FP8 checkpoints
    loaded with ``experts="bf16"``, and the widened baseline the quantized layouts are
    measured against (benchmarks, tests)."""

    layout: ClassVar[str] = "dense"

    values: jax.Array
    layer: jax.Array | None = None

    def unstacked(self) -> DenseWeight:
        if self.layer is None:
            return self
        return DenseWeight(jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape if self.layer is None else self.values.shape[1:]

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.unstacked().values.astype(dtype)

    def take(self, ids: jax.Array) -> DenseWeight:
        return DenseWeight(self.unstacked().values[ids])

    def expert(self, e: jax.Array) -> jax.Array:
        at = (e,) if self.layer is None else (self.layer, e)
        return self.values[at].astype(jnp.float32)

    def device_bytes(self) -> int:
        return _device_bytes(self.values)

    def shard_spec(self, expert_axes, out_axes=(), in_axes=()) -> DenseWeight:
        return DenseWeight(
            _stack_spec(self, expert_axes, out_axes, in_axes),
            None if self.layer is None else PartitionSpec(),
        )

    @classmethod
    def param_names(cls, proj: str) -> tuple[str]:
        return (f"{proj}_dense",)

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None):
        del group_size
        (name,) = cls.param_names(proj)
        values = params[name]
        return cls(values, _layer(values, 4, layer, proj))

    @classmethod
    def param_shapes(cls, proj: str, experts: int, out: int, inp: int, dtype) -> dict:
        (name,) = cls.param_names(proj)
        return {name: jax.ShapeDtypeStruct((experts, out, inp), dtype)}

    @classmethod
    def param_axes(cls, proj: str, out: str, inp: str) -> dict:
        (name,) = cls.param_names(proj)
        return {name: ("experts", out, inp)}


def quantize_int4(w_OI: jax.Array, group_size: int = 32) -> tuple[jax.Array, jax.Array]:
    """Round-to-nearest symmetric INT4 of a float weight [..., O, I], as compressed-tensors does
    it: (q int8 [..., O, I] in [-8, 7], scale bf16 [..., O, I/G]).

    The scale is the group's amax / 7.5 rounded to bf16; q = clip(round(w / scale), -8, 7)
    with the bf16 scale, so q * scale (exact in float32) is what a checkpoint of these values
    dequantizes to. An all-zero group gets compressed-tensors' scale, float32 eps (its
    values are 0 either way).
    """
    *lead, out, inp = w_OI.shape
    groups = w_OI.astype(jnp.float32).reshape(*lead, out, inp // group_size, group_size)
    amax = jnp.max(jnp.abs(groups), axis=-1)
    scale = jnp.where(amax > 0, amax / 7.5, jnp.finfo(jnp.float32).eps).astype(jnp.bfloat16)
    q = jnp.clip(jnp.round(groups / scale.astype(jnp.float32)[..., None]), -8, 7)
    return q.astype(jnp.int8).reshape(*lead, out, inp), scale


def fake_quantize_int4(w_OI: jax.Array, group_size: int = 32, scale=None) -> jax.Array:
    """``w`` rounded to K2's INT4 grid (float32), with a straight-through gradient.

    Forward: q * scale, exactly what the packed export dequantizes to. Backward: the identity
    for weights inside the clipping range (-8.5 * scale <= w <= 7.5 * scale: within half a
    step of the grid's ends), zero outside; the scale is treated as a constant. ``scale``
    (bf16 [..., O, I/G]) defaults to the round-to-nearest one of ``quantize_int4``.
    """
    w32 = w_OI.astype(jnp.float32)
    if scale is None:
        _, scale = quantize_int4(jax.lax.stop_gradient(w32), group_size)
    *lead, out, inp = w32.shape
    s = jax.lax.stop_gradient(scale.astype(jnp.float32))[..., None]
    groups = w32.reshape(*lead, out, inp // group_size, group_size)
    ratio = groups / s
    rounded = jnp.clip(jnp.round(ratio), -8, 7) * s
    inside = (ratio >= -8.5) & (ratio <= 7.5)
    straight = groups + jax.lax.stop_gradient(rounded - groups)
    out_w = jnp.where(inside, straight, jax.lax.stop_gradient(rounded))
    return out_w.reshape(w32.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatWeight:
    """Routed experts [E, O, I] as float master weights (``{proj}_weight``): what
    ``k2jax.train`` trains; never a checkpoint's layout.

    With ``fake_quant_group`` set (the config's INT4 experts), ``dequantize`` rounds them to
    K2's INT4 grid with a straight-through gradient (``fake_quantize_int4``): quantization-aware
    training, whose forward equals the packed export's. 0 leaves them as they are (a model
    trained without quantization).
    """

    layout: ClassVar[str] = "float"

    values: jax.Array
    fake_quant_group: int = dataclasses.field(default=0, metadata={"static": True})
    layer: jax.Array | None = None

    def unstacked(self) -> FloatWeight:
        if self.layer is None:
            return self
        values = jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False)
        return FloatWeight(values, self.fake_quant_group)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape if self.layer is None else self.values.shape[1:]

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        values = self.unstacked().values
        if self.fake_quant_group:
            values = fake_quantize_int4(values, self.fake_quant_group)
        return values.astype(dtype)

    def take(self, ids: jax.Array) -> FloatWeight:
        return FloatWeight(self.unstacked().values[ids], self.fake_quant_group)

    def expert(self, e: jax.Array) -> jax.Array:
        at = (e,) if self.layer is None else (self.layer, e)
        return FloatWeight(self.values[at][None], self.fake_quant_group).dequantize()[0]

    def device_bytes(self) -> int:
        return _device_bytes(self.values)

    def shard_spec(self, expert_axes, out_axes=(), in_axes=()) -> FloatWeight:
        return FloatWeight(
            _stack_spec(self, expert_axes, out_axes, in_axes),
            self.fake_quant_group,
            None if self.layer is None else PartitionSpec(),
        )

    @classmethod
    def param_names(cls, proj: str) -> tuple[str]:
        return (f"{proj}_weight",)

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None):
        """``group_size``: the fake-quantization group, 0 for none (see ``moe.Experts``)."""
        (name,) = cls.param_names(proj)
        values = params[name]
        return cls(values, group_size, _layer(values, 4, layer, proj))

    @classmethod
    def param_shapes(cls, proj: str, experts: int, out: int, inp: int, dtype) -> dict:
        del dtype  # master weights are float32
        (name,) = cls.param_names(proj)
        return {name: jax.ShapeDtypeStruct((experts, out, inp), jnp.float32)}


PROJECTIONS = ("gate", "up", "down")  # each expert's three weights

# The layouts params can hold ("float" holds training's master weights, never a checkpoint's).
LAYOUTS: dict[str, type] = {
    cls.layout: cls for cls in (QuantizedWeight, Int4Weight, FloatWeight, Fp8Weight, DenseWeight)
}
# "fp8" and "dense" come only from an FP8 checkpoint's experts (k2jax.load(..., experts=), the
# converter's --experts); the model's own init makes words, so k2jax.model.abstract_params
# gives these their shapes through ``param_shapes``.
CHECKPOINT_ONLY_LAYOUTS = ("fp8", "dense")


def layout_of(expert_params: Mapping) -> str:
    """The layout whose params ``expert_params`` (an Experts module's param dict) holds."""
    for name, cls in LAYOUTS.items():
        if all(n in expert_params for n in cls.param_names("gate")):
            return name
    raise ValueError(
        f"routed-expert params {sorted(expert_params)} match no layout {list(LAYOUTS)}"
    )


def to_int4_layout(w: QuantizedWeight) -> Int4Weight:
    """Convert checkpoint-packed words [..., O, I/8] + scales [..., O, G] to ``Int4Weight``.

    Run once per weight at load time (jit it with the target sharding so the result lands
    sharded; the expert axis stays leading).
    """
    *lead, out, words = w.packed.shape
    q = words_to_int4(w.packed)  # [..., O, I/8, 8]
    groups = words * NIBBLES_PER_WORD // w.group_size
    q = q.reshape(*lead, out, groups, w.group_size)
    return Int4Weight(
        values=jnp.moveaxis(q, -3, -1),  # [..., G, S, O]
        scale=jnp.swapaxes(w.scale, -1, -2).astype(jnp.bfloat16),  # [..., G, O]
    )


def expert_layout_for(platform: str | None = None) -> str:
    """The resident expert layout for ``platform``: ``"int4"`` on TPU, which stores int4 packed;
    ``"words"`` elsewhere, where ``jnp.int4`` takes a byte per element and packed words are what
    keep 4.5 bits per weight."""
    return "int4" if (platform or target_platform()) == "tpu" else "words"
