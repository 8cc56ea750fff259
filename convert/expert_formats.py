"""FP8 block-scaled tensors on disk, and the routed experts' formats a load or conversion picks.

FP8 checkpoints (DeepSeek-V3/V3.1/R1, Kimi K2 Instruct; ``quantization_config``:
``quant_method: fp8``, ``fmt: e4m3``, ``weight_block_size: [128, 128]``) store each linear
weight ``X.weight`` as float8_e4m3fn [O, I] plus ``X.weight_scale_inv`` float32
[ceil(O/128), ceil(I/128)]; W[o, i] = weight[o, i] * scale_inv[o // 128, i // 128], the last
block of a dimension that is not a multiple of 128 being ragged. ``dequantize_fp8`` computes
that product in float32, as DeepSeek's reference ``weight_dequant`` does (which then stores
bf16: the loader's cast to the model dtype is that same rounding).

The routed experts can be kept in one of three formats (``--experts`` / ``k2jax.load(...,
experts=)``), each stored as one layout of ``k2jax.model.quant``:

- ``int4``: K2 Thinking's INT4 (symmetric, group 32, bf16 scales), packed words (``words``).
  An FP8 source is dequantized in float32 and re-quantized by ``quantize_int4`` (round to
  nearest, compressed-tensors' scale rule);
- ``fp8``: the checkpoint's FP8 values and block scales as they are (``fp8``);
- ``bf16``: widened to the model dtype (``dense``).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from k2jax.kernels.int4_format import GROUP_SIZE, pack_int4_numpy
from k2jax.model.config import Config
from k2jax.model.quant import FP8_BLOCK

FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
EXPERT_FORMATS = ("int4", "fp8", "bf16")
# The params layout (k2jax.model.quant.LAYOUTS) each format is stored and restored in.
STORAGE_LAYOUT = {"int4": "words", "fp8": "fp8", "bf16": "dense"}
INT4_MAX_ABS = 7.5  # compressed-tensors' symmetric scale: amax / ((qmax - qmin) / 2)


class Fp8Tensor(NamedTuple):
    """One FP8 weight as stored: float8_e4m3fn values [O, I] and float32 block scales."""

    values: np.ndarray
    scale_inv: np.ndarray


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The block-scale grid of an FP8 weight of ``shape`` (ragged edge blocks included)."""
    return tuple(-(-d // FP8_BLOCK) for d in shape)


def dequantize_fp8(t: Fp8Tensor) -> np.ndarray:
    """float32 [O, I]: every value times its 128x128 block's scale, the product in float32."""
    values, scale = t.values, np.asarray(t.scale_inv, np.float32)
    out = np.empty(values.shape, np.float32)
    cols = values.shape[-1]
    for r in range(scale.shape[0]):
        rows = slice(r * FP8_BLOCK, (r + 1) * FP8_BLOCK)
        row_scale = np.repeat(scale[r], FP8_BLOCK)[:cols]
        np.multiply(values[rows].astype(np.float32), row_scale, out=out[rows])
    return out


def quantize_int4(w: np.ndarray, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """K2 Thinking's INT4 of a float weight [O, I]: (int32 words [O, I/8], bf16 scales [O, G]).

    Symmetric per group of ``group_size`` inputs: scale = amax / 7.5 rounded to bf16 (the rule
    compressed-tensors uses for K2 Thinking), q = clip(round(w / scale), -8, 7), rounding half
    to even. A group of zeros gets scale 1 (its values stay 0).
    """
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(
            f"an input dimension of {inp} is not a multiple of the INT4 group size {group_size}"
        )
    groups = np.asarray(w, np.float32).reshape(out, inp // group_size, group_size)
    amax = np.abs(groups).max(axis=-1)
    scale = (amax / np.float32(INT4_MAX_ABS)).astype(ml_dtypes.bfloat16)
    scale = np.where(scale == 0, ml_dtypes.bfloat16(1), scale)
    q = np.clip(np.round(groups / scale.astype(np.float32)[..., None]), -8, 7)
    return pack_int4_numpy(q.reshape(out, inp).astype(np.int8)), scale


def resolve(cfg: Config, experts: str | None) -> str:
    """The expert format to keep: ``experts``, or the checkpoint's own (``None``)."""
    kind = cfg.quantization.kind
    own = {"int4": "int4", "fp8": "fp8", "none": "bf16"}[kind]
    if experts is None:
        return own
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts={experts!r} is not one of {list(EXPERT_FORMATS)}")
    if kind == "int4" and experts != "int4":
        raise ValueError(
            f"experts={experts!r}: this checkpoint's routed experts are INT4 (K2 Thinking's "
            "format); they load as int4 only"
        )
    if kind == "none" and experts == "fp8":
        raise ValueError("experts='fp8': this checkpoint's experts are not FP8")
    return experts
