"""One training step of the k2jax model: loss, gradients, AdamW, and the router's bias update.

The forward is the model's own modules (``k2jax.model.transformer.Block`` and ``Head``) scanned
over each layer stack with ``jax.checkpoint`` (activations rematerialized in the backward
pass), on float32 master weights whose routed experts are in the ``"float"`` layout
(``k2jax.model.quant.FloatWeight``). When the config's experts are INT4, those weights are
fake-quantized in the forward (QAT, straight-through gradient); otherwise they run as floats.
Dense weights are cast to the compute dtype (bf16 on accelerators, float32 on the CPU, whose
bf16 dots are ~20x slower); the expert weights are quantized from float32 first, so the export
rounds exactly what the forward saw.

Routing is K2's (sigmoid scores, group limit, selection-only correction bias). The MoE blocks
sow their router input; from it the step recomputes each layer's choices (``moe.route``, the
same function on the same values) for:

- the expert load, which moves ``e_score_correction_bias`` by ``bias_update_rate`` toward
  balance after every step (DeepSeek-V3's auxiliary-loss-free balancing; the optimizer never
  touches the bias, which has no gradient);
- the sequence-wise balance loss ``aux_loss_alpha * sum_i f_i P_i`` per sequence and layer when
  ``seq_aux`` (f_i: the share of the sequence's tokens choosing expert i, times E / K; P_i: the
  mean normalized score of expert i).

The loss is next-token cross entropy averaged over tokens whose mask is 1 (assistant turns).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from k2jax import model as k2model
from k2jax.model.config import Config
from k2jax.model.moe import route
from k2jax.model.rope import rope_tables
from k2jax.model.transformer import STACKS, Block, Head, hint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization knobs (the model's shape is its ``Config``)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 512
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    bias_update_rate: float = 1e-3
    seq_aux: bool = True
    aux_loss_alpha: float = 1e-3
    remat: bool = True
    compute_dtype: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100


def compute_dtype(name: str) -> jnp.dtype:
    """``"auto"``: bfloat16 where the backend computes it fast, float32 on the CPU."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def _is_experts(path) -> bool:
    return any(getattr(k, "key", None) == "experts" for k in path)


def _is_bias(path) -> bool:
    return any(getattr(k, "key", None) == "e_score_correction_bias" for k in path)


def cast_for_compute(params: dict, dtype) -> dict:
    """Dense weights in ``dtype``; the float32 experts (quantized from float32) and the router
    bias (float32 by K2's definition) as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if _is_experts(path) or _is_bias(path) else p.astype(dtype), params
    )


@functools.partial(jax.jit, static_argnums=0)
def init_train_params(cfg: Config, key: jax.Array) -> dict:
    """float32 master weights: ``init_params`` with the experts widened to the float layout."""
    return k2model.to_expert_layout(k2model.init_params(cfg, key, jnp.float32), "float")


def forward(params: dict, tokens_BT: jax.Array, *, cfg: Config, dtype, remat: bool = True):
    """(logits float32 [B, T, V], router inputs [L_moe, B*T, D] or None)."""
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    head_params = {k: params[k] for k in ("embed", "final_norm", "lm_head")}
    x_BTD = Head(cfg, dtype).apply({"params": head_params}, tokens_BT, method=Head.embed_tokens)
    x_BTD = hint(x_BTD, ("act_batch", None, None))
    cos, sin = rope_tables(cfg, positions_BT)
    router_inputs = None
    for stack in STACKS:
        if stack not in params:
            continue
        block = Block(cfg, stack == "moe_layers", dtype)

        def layer(x, layer_params, block=block):
            (y, _), state = block.apply(
                {"params": layer_params}, x, cos, sin, positions_BT, mutable=["intermediates"]
            )
            sown = state.get("intermediates", {}).get("moe", {}).get("router_input")
            return hint(y, ("act_batch", None, None)), (None if sown is None else sown[0])

        if remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        x_BTD, sown = jax.lax.scan(layer, x_BTD, params[stack])
        if stack == "moe_layers":
            router_inputs = sown
    logits_BTV = k2model.lm_logits(params, x_BTD, cfg=cfg, dtype=dtype)
    return logits_BTV, router_inputs


def routing_stats(cfg: Config, moe_params: dict, router_inputs, valid_BT):
    """(expert load [L, E]: share of valid tokens choosing each expert, seq-aux loss [L])."""
    b, t = valid_BT.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    valid_T = valid_BT.reshape(-1).astype(jnp.float32)

    def one_layer(x_TD, w_router, bias):
        ids_TK, _ = route(cfg, x_TD, w_router, bias)
        chosen_TE = jax.nn.one_hot(ids_TK, e, dtype=jnp.float32).sum(axis=1) * valid_T[:, None]
        load_E = chosen_TE.sum(axis=0) / (jnp.maximum(valid_T.sum(), 1.0) * k)
        logits_TE = jnp.einsum(
            "TD,DE->TE",
            x_TD.astype(jnp.float32),
            w_router.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        scores_TE = jax.nn.sigmoid(logits_TE)
        normed_TE = scores_TE / (scores_TE.sum(axis=-1, keepdims=True) + 1e-20)
        count_B = jnp.maximum(valid_T.reshape(b, t).sum(axis=1), 1.0)
        f_BE = chosen_TE.reshape(b, t, e).sum(axis=1) * e / (k * count_B[:, None])
        p_BE = (normed_TE * valid_T[:, None]).reshape(b, t, e).sum(axis=1) / count_B[:, None]
        return jax.lax.stop_gradient(load_E), jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))

    return jax.vmap(one_layer)(
        router_inputs, moe_params["w_router"], moe_params["e_score_correction_bias"]
    )


def loss_fn(params, tokens_BT1, mask_BT1, *, cfg: Config, tcfg: TrainConfig, pad_id: int):
    """(total loss, (next-token loss, aux loss, expert load [L, E] or None, masked tokens))."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    mask_BT = mask_BT1[:, 1:]
    dtype = compute_dtype(tcfg.compute_dtype)
    logits_BTV, router_inputs = forward(
        cast_for_compute(params, dtype), inputs_BT, cfg=cfg, dtype=dtype, remat=tcfg.remat
    )
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    tokens = jnp.maximum(mask_BT.sum(), 1.0)
    ce = jnp.sum(ce_BT * mask_BT) / tokens
    aux, load = jnp.float32(0.0), None
    if router_inputs is not None:
        valid_BT = inputs_BT != pad_id
        load, aux_per_layer = routing_stats(
            cfg, params["moe_layers"]["moe"], router_inputs, valid_BT
        )
        if tcfg.seq_aux:
            aux = tcfg.aux_loss_alpha * aux_per_layer.sum()
    return ce + aux, (ce, aux, load, mask_BT.sum())


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (warm-up then cosine decay, global-norm clipping; no decay on vectors), with the
    router's correction bias left to ``update_bias``."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        tcfg.peak_lr,
        tcfg.warmup_steps,
        max(tcfg.steps, tcfg.warmup_steps + 1),
        tcfg.peak_lr * tcfg.end_lr_ratio,
    )
    adamw = optax.chain(
        optax.clip_by_global_norm(tcfg.clip_norm),
        optax.adamw(
            schedule,
            b1=tcfg.b1,
            b2=tcfg.b2,
            weight_decay=tcfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "bias" if _is_bias(path) else "adamw", params
        )

    return optax.multi_transform({"adamw": adamw, "bias": optax.set_to_zero()}, labels)


def update_bias(params: dict, load_LE, rate: float) -> dict:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded."""
    moe = params["moe_layers"]["moe"]
    bias = moe["e_score_correction_bias"]
    mean = jnp.mean(load_LE, axis=-1, keepdims=True)
    new_bias = bias + rate * jnp.sign(mean - load_LE).astype(bias.dtype)
    moe = {**moe, "e_score_correction_bias": new_bias}
    return {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}


def init_state(params: dict, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


@functools.lru_cache(maxsize=8)
def make_train_step(cfg: Config, tcfg: TrainConfig, pad_id: int, mesh=None, rules=()):
    """A jitted ``step(state, tokens [B, T+1], mask [B, T+1]) -> (state, metrics)``; the same
    arguments give the same function (compiled once per process).

    With a ``mesh`` and logical ``rules`` (``sharding.rules.flax_rules``), activations and
    routed experts follow the rules table (data + expert parallel); the state keeps whatever
    sharding it was placed with.
    """
    optimizer = make_optimizer(tcfg)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, cfg=cfg, tcfg=tcfg, pad_id=pad_id), has_aux=True
    )

    def step(state, tokens, mask):
        (loss, (ce, aux, load, tokens_trained)), grads = grad_fn(state["params"], tokens, mask)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if load is not None:
            params = update_bias(params, load, tcfg.bias_update_rate)
        metrics = {
            "loss": ce,
            "aux_loss": aux,
            "grad_norm": optax.tree.norm(grads),
            "tokens": tokens_trained,
        }
        if load is not None:
            metrics["max_load"] = jnp.max(load) * cfg.n_routed_experts  # 1.0 = balanced
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    jitted = jax.jit(step, donate_argnums=0)
    if mesh is None:
        return jitted

    def on_mesh(state, tokens, mask):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, tokens, mask)

    return on_mesh
