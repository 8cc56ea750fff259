"""The one map between HF checkpoint tensor names and the k2jax params tree.

Every HF tensor the model uses has a ``TensorSpec``: the shape and dtypes expected on disk and
how it lands in our tree (which stack, layer, expert and parameter, and the transform: transpose
to our [in, out] layout, split heads, and the rope permutation). The rope layout of the
checkpoint is handled here and only here: the rope rows of ``q_b_proj`` (per head) and of
``kv_a_proj_with_mqa`` are stored as interleaved pairs (2j, 2j+1); we permute them once into
halves (evens then odds), which is what ``k2jax.model.rope.apply_rope`` rotates.

FP8 checkpoints store their linear weights as float8_e4m3fn with block scales: for them every
linear weight may also be ``F8_E4M3`` on disk (``HFCheckpoint`` checks its
``weight_scale_inv`` and hands the placement functions the dequantized float32 array), and
the routed experts are placed in the format asked for (``expert_formats``): FP8 as stored,
re-quantized INT4 words, or widened.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from convert import expert_formats
from k2jax.model.config import Config
from k2jax.model.quant import LAYOUTS

Path = tuple[str, ...]
Placement = list[tuple[Path, np.ndarray]]

FLOAT_DTYPES = ("BF16", "F16", "F32")
# Tensors the checkpoint may hold that the model recomputes or does not use.
IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: expected shape and dtypes on disk, and where it goes in our params."""

    hf_name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    stack: str | None  # "dense_layers" / "moe_layers", or None for top-level params
    layer: int | None  # index within the stack
    expert: int | None
    place: Callable[[np.ndarray], Placement]
    # The placement takes the FP8 values and block scales as stored (an
    # ``expert_formats.Fp8Tensor``) instead of the dequantized float32 array.
    fp8_raw: bool = False


def _halves_permutation(width: int) -> np.ndarray:
    return np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)])


def _t(path: Path) -> Callable[[np.ndarray], Placement]:
    return lambda a: [(path, np.ascontiguousarray(a.T))]


def _same(path: Path) -> Callable[[np.ndarray], Placement]:
    return lambda a: [(path, a)]


def _q_up(cfg: Config, path: Path) -> Callable[[np.ndarray], Placement]:
    n, h, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    order = np.concatenate([np.arange(h), h + _halves_permutation(r)])

    def place(a: np.ndarray) -> Placement:
        per_head = a.reshape(n, h + r, -1)[:, order, :]
        return [(path, np.ascontiguousarray(per_head.transpose(2, 0, 1)))]

    return place


def _kv_down(cfg: Config, path: Path) -> Callable[[np.ndarray], Placement]:
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    order = np.concatenate([np.arange(c), c + _halves_permutation(r)])
    return lambda a: [(path, np.ascontiguousarray(a[order].T))]


def _kv_up(cfg: Config, k_path: Path, v_path: Path) -> Callable[[np.ndarray], Placement]:
    n, h, u = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim

    def place(a: np.ndarray) -> Placement:
        per_head = a.reshape(n, h + u, -1)  # [N, H + U, C]: already head-major, latent last
        k = np.ascontiguousarray(per_head[:, :h])
        v = np.ascontiguousarray(per_head[:, h:])
        return [(k_path, k), (v_path, v)]

    return place


def _o_proj(cfg: Config, path: Path) -> Callable[[np.ndarray], Placement]:
    n, u = cfg.num_heads, cfg.v_head_dim
    return lambda a: [(path, np.ascontiguousarray(a.reshape(-1, n, u).transpose(1, 2, 0)))]


def stack_position(cfg: Config, layer: int) -> tuple[str, int]:
    """Which stack a global layer index belongs to, and its index there."""
    if layer < cfg.num_dense_layers:
        return "dense_layers", layer
    return "moe_layers", layer - cfg.num_dense_layers


def _linear_dtypes(cfg: Config) -> tuple[str, ...]:
    """What a linear weight may be stored as: FP8 too in an FP8 checkpoint."""
    if cfg.quantization.kind == "fp8":
        return (*FLOAT_DTYPES, expert_formats.FP8_DTYPE)
    return FLOAT_DTYPES


def layer_specs(cfg: Config, layer: int, experts: str | None = None) -> list[TensorSpec]:
    """Every tensor of HF layer ``layer``; routed experts placed in format ``experts``
    (``expert_formats``; None: the checkpoint's own)."""
    stack, index = stack_position(cfg, layer)
    lin = _linear_dtypes(cfg)
    p = f"model.layers.{layer}"
    d, q, c, r = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n, h, u = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    specs: list[tuple[str, tuple[int, ...], tuple[str, ...], int | None, Callable]] = [
        ("input_layernorm.weight", (d,), FLOAT_DTYPES, None, _same(("attn_norm", "scale"))),
        ("post_attention_layernorm.weight", (d,), FLOAT_DTYPES, None, _same(("mlp_norm", "scale"))),
        ("self_attn.q_a_proj.weight", (q, d), lin, None, _t(("attn", "w_q_down"))),
        (
            "self_attn.q_a_layernorm.weight",
            (q,),
            FLOAT_DTYPES,
            None,
            _same(("attn", "q_norm", "scale")),
        ),
        (
            "self_attn.q_b_proj.weight",
            (n * (h + r), q),
            lin,
            None,
            _q_up(cfg, ("attn", "w_q_up")),
        ),
        (
            "self_attn.kv_a_proj_with_mqa.weight",
            (c + r, d),
            lin,
            None,
            _kv_down(cfg, ("attn", "w_kv_down")),
        ),
        (
            "self_attn.kv_a_layernorm.weight",
            (c,),
            FLOAT_DTYPES,
            None,
            _same(("attn", "kv_norm", "scale")),
        ),
        (
            "self_attn.kv_b_proj.weight",
            (n * (h + u), c),
            lin,
            None,
            _kv_up(cfg, ("attn", "w_k_up"), ("attn", "w_v_up")),
        ),
        ("self_attn.o_proj.weight", (d, n * u), lin, None, _o_proj(cfg, ("attn", "w_o"))),
    ]
    if stack == "dense_layers":
        f = cfg.intermediate_size
        for proj, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            specs.append((f"mlp.{proj}_proj.weight", shape, lin, None, _t(("mlp", f"w_{proj}"))))
    else:
        e, m = cfg.n_routed_experts, cfg.moe_intermediate_size
        ms = m * cfg.n_shared_experts
        specs.append(("mlp.gate.weight", (e, d), FLOAT_DTYPES, None, _t(("moe", "w_router"))))
        specs.append(
            (
                "mlp.gate.e_score_correction_bias",
                (e,),
                FLOAT_DTYPES,
                None,
                _same(("moe", "e_score_correction_bias")),
            )
        )
        if cfg.n_shared_experts:
            for proj, shape in (("gate", (ms, d)), ("up", (ms, d)), ("down", (d, ms))):
                specs.append(
                    (
                        f"mlp.shared_experts.{proj}_proj.weight",
                        shape,
                        lin,
                        None,
                        _t(("moe", "shared", f"w_{proj}")),
                    )
                )
        specs.extend(_expert_specs(cfg, experts))
    return [
        TensorSpec(f"{p}.{name}", shape, dtypes, stack, index, expert, place, *raw)
        for name, shape, dtypes, expert, place, *raw in specs
    ]


def _expert_specs(cfg: Config, experts: str | None):
    q = cfg.quantization
    fmt = expert_formats.resolve(cfg, experts)
    if q.kind != "int4":
        return _float_expert_specs(cfg, fmt)
    d, m, g = cfg.hidden_size, cfg.moe_intermediate_size, q.group_size
    out = []
    for e in range(cfg.n_routed_experts):
        for proj, (o, i) in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
            base = f"mlp.experts.{e}.{proj}_proj"
            where = ("moe", "experts")
            out.append(
                (
                    f"{base}.weight_packed",
                    (o, i // 8),
                    ("I32",),
                    e,
                    _same((*where, f"{proj}_packed")),
                )
            )
            out.append(
                (
                    f"{base}.weight_scale",
                    (o, i // g),
                    ("BF16",),
                    e,
                    _same((*where, f"{proj}_scale")),
                )
            )
            out.append(
                (
                    f"{base}.weight_shape",
                    (2,),
                    ("I32", "I64"),
                    e,
                    _check_shape(f"{base}.weight_shape", (o, i)),
                )
            )
    return out


def _float_expert_specs(cfg: Config, fmt: str):
    """An FP8 (or plain float) checkpoint's experts: one ``weight`` per projection, placed as
    format ``fmt`` (``expert_formats``)."""
    d, m = cfg.hidden_size, cfg.moe_intermediate_size
    dtypes = (expert_formats.FP8_DTYPE,) if cfg.quantization.kind == "fp8" else FLOAT_DTYPES
    out = []
    for e in range(cfg.n_routed_experts):
        for proj, shape in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
            names = LAYOUTS[expert_formats.STORAGE_LAYOUT[fmt]].param_names(proj)
            paths = [("moe", "experts", name) for name in names]
            place, raw = _expert_placement(fmt, paths)
            out.append((f"mlp.experts.{e}.{proj}_proj.weight", shape, dtypes, e, place, raw))
    return out


def _expert_placement(fmt: str, paths: list[Path]) -> tuple[Callable, bool]:
    """(placement, whether it takes the raw FP8 tensor) of one expert projection."""
    if fmt == "fp8":
        values_path, scale_path = paths
        # The block-scale grid flattened, as ``Fp8Weight`` holds it.
        return lambda t: [(values_path, t.values), (scale_path, t.scale_inv.reshape(1, -1))], True
    if fmt == "int4":
        packed_path, scale_path = paths

        def requantize(a: np.ndarray) -> Placement:
            words, scale = expert_formats.quantize_int4(a)
            return [(packed_path, words), (scale_path, scale)]

        return requantize, False
    (dense_path,) = paths
    return lambda a: [(dense_path, a)], False


def _check_shape(name: str, want: tuple[int, int]) -> Callable[[np.ndarray], Placement]:
    def place(a: np.ndarray) -> Placement:
        if tuple(int(x) for x in a.reshape(-1)) != want:
            raise ValueError(f"{name} holds {a.tolist()}, expected {list(want)}")
        return []

    return place


def head_specs(cfg: Config) -> list[TensorSpec]:
    """The embeddings, final norm and lm_head."""
    v, d = cfg.vocab_size, cfg.hidden_size
    return [
        TensorSpec(
            "model.embed_tokens.weight", (v, d), FLOAT_DTYPES, None, None, None, _same(("embed",))
        ),
        TensorSpec(
            "model.norm.weight",
            (d,),
            FLOAT_DTYPES,
            None,
            None,
            None,
            _same(("final_norm", "scale")),
        ),
        TensorSpec("lm_head.weight", (v, d), FLOAT_DTYPES, None, None, None, _t(("lm_head",))),
    ]


def all_specs(cfg: Config, experts: str | None = None) -> dict[str, TensorSpec]:
    """Every HF tensor the model needs, by name (routed experts in format ``experts``)."""
    specs = head_specs(cfg)
    for layer in range(cfg.num_layers):
        specs.extend(layer_specs(cfg, layer, experts))
    return {s.hf_name: s for s in specs}


def is_ignored(cfg: Config, hf_name: str) -> bool:
    """Tensors the checkpoint may carry that we do not load (rope buffers, MTP layers)."""
    if any(p.match(hf_name) for p in IGNORED):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    mtp_layers = range(cfg.num_layers, cfg.num_layers + cfg.num_nextn_predict_layers)
    return bool(m) and int(m.group(1)) in mtp_layers
