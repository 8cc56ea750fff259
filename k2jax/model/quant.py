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

Both are registered pytrees, so stacks slice, scan, shard and checkpoint like plain arrays. The
expert matmuls that consume them live in ``k2jax.model.expert_matmul``; code asks a weight what
it is through this interface (``layout``, ``num_experts``, ``expert``, ...), never by probing
param names or by ``isinstance`` chains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k2jax.kernels.int4_format import NIBBLES_PER_WORD, unpack_int4, words_to_int4
from k2jax.kernels.platform import target_platform


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

    def shard_spec(self, expert_axes: tuple[str, ...]) -> ExpertWeight:
        """PartitionSpecs (same pytree) splitting the expert axis over ``expert_axes``; the
        layer axis of a stack is never split and the layer index is replicated."""

    @classmethod
    def param_names(cls, proj: str) -> tuple[str, str]:
        """The params (payload, scales) that hold projection ``proj`` in this layout."""

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None): ...


def _device_bytes(*arrays) -> int:
    return sum(a.on_device_size_in_bytes() for a in arrays)


def _stack_spec(w, expert_axes: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(expert_axes) if w.layer is None else PartitionSpec(None, expert_axes)


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

    def shard_spec(self, expert_axes: tuple[str, ...]) -> QuantizedWeight:
        spec = _stack_spec(self, expert_axes)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """An INT4 weight [..., O, I] in TPU runtime layout: int4 [..., G, S, O] + bf16 [..., G, O]."""

    layout: ClassVar[str] = "int4"

    values: jax.Array
    scale: jax.Array
    layer: jax.Array | None = None

    def unstacked(self) -> Int4Weight:
        if self.layer is None:
            return self
        return Int4Weight(
            jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.scale, self.layer, keepdims=False),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, groups, size, out = self.values.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, out, groups * size)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def group_size(self) -> int:
        return self.values.shape[-2]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        if self.layer is not None:
            return self.unstacked().dequantize(dtype)
        w = self.values.astype(dtype) * self.scale.astype(dtype)[..., None, :]
        *lead, groups, size, out = w.shape
        return jnp.swapaxes(w.reshape(*lead, groups * size, out), -1, -2)

    def take(self, ids: jax.Array) -> Int4Weight:
        w = self.unstacked()
        return Int4Weight(w.values[ids], w.scale[ids])

    def expert(self, e: jax.Array) -> jax.Array:
        at = (e,) if self.layer is None else (self.layer, e)
        return Int4Weight(self.values[at], self.scale[at]).dequantize()

    def device_bytes(self) -> int:
        return _device_bytes(self.values, self.scale)

    def shard_spec(self, expert_axes: tuple[str, ...]) -> Int4Weight:
        spec = _stack_spec(self, expert_axes)
        return Int4Weight(spec, spec, None if self.layer is None else PartitionSpec())

    @classmethod
    def param_names(cls, proj: str) -> tuple[str, str]:
        return f"{proj}_values", f"{proj}_group_scale"

    @classmethod
    def from_params(cls, params: Mapping, proj: str, group_size: int, layer=None):
        del group_size  # the layout carries it (values' S axis)
        values_name, scale_name = cls.param_names(proj)
        values = params[values_name]
        return cls(values, params[scale_name], _layer(values, 5, layer, proj))


def _layer(payload: jax.Array, stacked_ndim: int, layer, proj: str):
    """``layer`` for a whole-stack payload [L, ...], None for one layer's."""
    if payload.ndim != stacked_ndim:
        return None
    if layer is None:
        raise ValueError(f"{proj}: a stacked [L, ...] expert weight needs its layer index")
    return layer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseWeight:
    """Routed experts [E, O, I] as a plain float array: the widened baseline the INT4 layouts
    are measured against (benchmarks, tests). No checkpoint stores it."""

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

    def shard_spec(self, expert_axes: tuple[str, ...]) -> DenseWeight:
        return DenseWeight(
            _stack_spec(self, expert_axes), None if self.layer is None else PartitionSpec()
        )


PROJECTIONS = ("gate", "up", "down")  # each expert's three weights

# The layouts a checkpoint's params can hold (DenseWeight has no param form).
LAYOUTS: dict[str, type[QuantizedWeight] | type[Int4Weight]] = {
    cls.layout: cls for cls in (QuantizedWeight, Int4Weight)
}


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
