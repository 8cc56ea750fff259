"""The training loop: data, step, orbax checkpoints with exact resume, progress, loss curve.

A run directory holds ``tokenizer.model``, ``config.json`` (the HF config of the model being
trained), ``data.npz`` (the packed rows), ``checkpoints/`` (orbax: step, params, optimizer
state) and ``metrics.jsonl`` (one line per step). Batches are a pure function of (seed, step),
and the state holds everything else the next step depends on, so a run resumed from a
checkpoint computes bit for bit what an uninterrupted run computes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from k2jax.model.config import Config
from k2jax.train import step as train_step
from k2jax.train.data import batch_at


def checkpoint_manager(
    run_dir: str, every: int, keep_period: int | None = None
) -> ocp.CheckpointManager:
    """The run's orbax manager: the last two checkpoints, plus every ``keep_period``-th step."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, save_interval_steps=every, keep_period=keep_period
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options
    )


def restore_or_init(manager, cfg: Config, tcfg: train_step.TrainConfig, shardings=None) -> dict:
    """The latest checkpoint's state, or a fresh one (params from ``tcfg.seed``)."""
    optimizer = train_step.make_optimizer(tcfg)

    def fresh():
        params = train_step.init_train_params(cfg, jax.random.key(tcfg.seed))
        return train_step.init_state(params, optimizer)

    init = jax.jit(fresh, out_shardings=shardings)
    latest = manager.latest_step()
    if latest is None:
        return init()
    abstract = jax.eval_shape(fresh)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def train(
    run_dir: str,
    cfg: Config,
    tcfg: train_step.TrainConfig,
    tokens: np.ndarray,
    mask: np.ndarray,
    pad_id: int,
    *,
    stop_at: int | None = None,
    mesh=None,
    strategy: str = "prefill",
    progress: bool = True,
    keep_period: int | None = None,
    record: dict | None = None,
) -> dict:
    """Trains to ``tcfg.steps`` (or ``stop_at``), resuming from the run's latest checkpoint.

    With a ``mesh`` the state is placed by ``sharding.rules`` (``strategy``'s table: batch over
    data and expert, routed experts over expert) and the batch is split over the batch axes.
    ``keep_period`` keeps every such step's checkpoint besides the last two (a phase boundary
    a later run branches from); ``record``'s items go into each step's metrics line. Returns
    the final state.
    """
    state_shardings, batch_sharding, rules = None, None, ()
    if mesh is not None:
        state_shardings, batch_sharding, rules = _placement(cfg, tcfg, mesh, strategy)
    manager = checkpoint_manager(run_dir, tcfg.checkpoint_every, keep_period)
    state = restore_or_init(manager, cfg, tcfg, state_shardings)
    step_fn = train_step.make_train_step(cfg, tcfg, pad_id, mesh, rules)
    first = int(state["step"])
    last = min(tcfg.steps, stop_at if stop_at is not None else tcfg.steps)
    log_path = os.path.join(run_dir, "metrics.jsonl")
    bar = tqdm(range(first, last), initial=first, total=tcfg.steps, disable=not progress)
    for step in bar:
        batch_tokens, batch_mask = batch_at(tokens, mask, step, tcfg.batch_size, tcfg.seed)
        if batch_sharding is not None:
            batch_tokens = jax.device_put(batch_tokens, batch_sharding)
            batch_mask = jax.device_put(batch_mask, batch_sharding)
        started = time.perf_counter()
        state, metrics = step_fn(state, batch_tokens, batch_mask)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - started
        tokens_per_s = batch_tokens.size / seconds
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                json.dumps({"step": step + 1, **metrics, "seconds": seconds, **(record or {})})
                + "\n"
            )
        manager.save(step + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    if last > first and manager.latest_step() != last:
        manager.save(last, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    manager.close()
    return state


def _placement(cfg: Config, tcfg, mesh, strategy: str):
    """(state shardings, batch sharding, flax rules) by the rules table of ``strategy``."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding import rules as sharding_rules

    params = sharding_rules.param_shardings(cfg, mesh, jnp.float32, strategy, "float")
    optimizer = train_step.make_optimizer(tcfg)
    abstract_params = jax.eval_shape(lambda: train_step.init_train_params(cfg, jax.random.key(0)))
    opt_abstract = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Optimizer moments mirror the params they belong to; counters are replicated.
    opt = _like_params(opt_abstract, abstract_params, params, replicated)
    state = {"step": replicated, "params": params, "opt_state": opt}
    batch_axes = tuple(
        a for a in sharding_rules.rules_for(strategy)["act_batch"] if mesh.shape.get(a, 1) > 1
    )
    batch = NamedSharding(mesh, PartitionSpec(batch_axes or None))
    return state, batch, sharding_rules.flax_rules(strategy)


def _like_params(tree, abstract_params, param_shardings, replicated):
    params_def = jax.tree.structure(abstract_params)

    def visit(node):
        if jax.tree.structure(node) == params_def:
            return param_shardings
        if isinstance(node, jax.ShapeDtypeStruct):
            return replicated
        return None

    return jax.tree.map(
        lambda n: visit(n),
        tree,
        is_leaf=lambda n: (
            isinstance(n, jax.ShapeDtypeStruct)
            or (not isinstance(n, list | tuple) and jax.tree.structure(n) == params_def)
        ),
    )


def read_metrics(run_dir: str) -> list[dict]:
    """The run's per-step metrics; a resumed run's repeated steps keep their last record."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(records: list[dict], out_path: str, title: str = "training loss") -> str:
    """Draws the loss curve (matplotlib, the ``bench`` extra) to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1, label="next-token loss (assistant turns)")
    qat_steps = [r["step"] for r in records if r.get("qat")]
    if qat_steps:
        ax.axvline(qat_steps[0] - 1, color="k", ls="--", lw=1, label="QAT phase starts")
    if len(losses) >= 20:
        k = 20
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2, label=f"mean of {k} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
