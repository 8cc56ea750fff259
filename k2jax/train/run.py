"""A recipe end to end: data, tokenizer, training, export, loss curve.

``prepare`` writes the run directory's data once (conversations from ``recipe.data_seed``, a
sentencepiece tokenizer trained on their text, packed rows); ``run`` then trains (resuming
from the latest checkpoint), exports the trained model as an HF K2 checkpoint under
``RUN/export`` with its tokenizer, and draws ``RUN/loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from k2jax.model.config import Config, ExpertQuantization
from k2jax.train import conversations, data, loop
from k2jax.train.recipe import Recipe, model_config


def prepare(run_dir: str, recipe: Recipe) -> tuple[Config, np.ndarray, np.ndarray, int]:
    """(config, rows, masks, pad id) of ``recipe``, generated into ``run_dir`` once."""
    os.makedirs(run_dir, exist_ok=True)
    tok_path = os.path.join(run_dir, "tokenizer.model")
    data_path = os.path.join(run_dir, "data.npz")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(data_path):
        convs = conversations.conversations(recipe.data_seed, recipe.num_conversations, "train")
        vocab = recipe.model["vocab_size"]
        if not os.path.exists(tok_path):
            prefix = os.path.join(run_dir, "tokenizer")
            data.train_tokenizer(data.training_text(convs, conversations.TOOLS), prefix, vocab)
        tok = data.load_tokenizer(tok_path)
        encoded = [data.encode_conversation(c, conversations.TOOLS, tok) for c in convs]
        pad_id = tok.encode_special(data.PAD_PIECE)
        tokens, mask = data.pack_rows(encoded, recipe.train.seq_len, pad_id)
        raw = model_config(recipe, tok.vocab_size)
        raw.update(
            bos_token_id=tok.bos_id,
            eos_token_id=tok.encode_special("<|im_end|>"),
            pad_token_id=pad_id,
            k2jax_data={"seed": recipe.data_seed, "conversations": recipe.num_conversations},
        )
        with open(config_path, "w") as f:
            json.dump(raw, f, indent=1)
        np.savez_compressed(data_path, tokens=tokens, mask=mask)
    loaded = np.load(data_path)
    cfg = Config.from_hf(config_path)
    return cfg, loaded["tokens"], loaded["mask"], cfg.pad_token_id


def training_config(cfg: Config, qat: bool) -> Config:
    """The config the trainer runs: INT4 experts fake-quantized (QAT), or plain float ones."""
    return cfg if qat else dataclasses.replace(cfg, quantization=ExpertQuantization("none"))


def run(run_dir: str, recipe: Recipe, *, stop_at: int | None = None, mesh=None) -> str:
    """Trains ``recipe``'s phases in ``run_dir`` and exports it; returns the export directory.

    Each phase resumes from the run's latest checkpoint (a phase already done is restored,
    not retrained); the first phase's last checkpoint is kept for ``branch``.
    """
    cfg, tokens, mask, pad_id = prepare(run_dir, recipe)
    for tcfg, qat in recipe.phases:
        state = loop.train(
            run_dir,
            training_config(cfg, qat),
            tcfg,
            tokens,
            mask,
            pad_id,
            stop_at=min(tcfg.steps, stop_at if stop_at is not None else tcfg.steps),
            mesh=mesh,
            keep_period=recipe.float_steps,
            record={"qat": qat},
        )
        if stop_at is not None and stop_at <= tcfg.steps:
            break
    records = loop.read_metrics(run_dir)
    if records:
        try:
            loop.plot_loss(records, os.path.join(run_dir, "loss.png"), f"k2jax {recipe.name}")
        except ImportError:
            print("[k2jax.train] matplotlib is not installed (the bench extra): no loss.png")
    from k2jax.train.export import export_hf

    out = os.path.join(run_dir, "export")
    extra = {
        "k2jax_training": {
            "recipe": recipe.name,
            "steps": int(state["step"]),
            "qat": recipe.qat,
            "qat_from_step": recipe.float_steps if recipe.qat else None,
        }
    }
    return export_hf(
        state["params"],
        cfg,
        out,
        tokenizer_file=os.path.join(run_dir, "tokenizer.model"),
        extra_config=extra,
    )


def branch(source_dir: str, run_dir: str, recipe: Recipe) -> None:
    """Starts ``run_dir`` from ``source_dir``'s first-phase checkpoint (same data and model).

    For the evaluation's baseline: ``no_qat`` shares ``default``'s first phase bit for bit, so
    it need not train it again. Refuses a source made by a different recipe's data or model.
    """
    if os.path.exists(run_dir):
        raise FileExistsError(f"{run_dir} exists: branch into a new directory")
    with open(os.path.join(source_dir, "config.json")) as f:
        source_config = json.load(f)
    want = {"seed": recipe.data_seed, "conversations": recipe.num_conversations}
    expected = {**recipe.model, "k2jax_data": want}
    for key, value in expected.items():
        if key != "vocab_size" and source_config.get(key) != value:
            raise ValueError(
                f"{source_dir} was not made by {recipe.name}'s first phase: its {key} is "
                f"{source_config.get(key)!r}, {recipe.name} has {value!r}"
            )
    step = recipe.float_steps
    checkpoint = os.path.join(source_dir, "checkpoints", str(step))
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"{source_dir} has no checkpoint at the phase boundary {step}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    for name in ("tokenizer.model", "tokenizer.vocab", "config.json", "data.npz"):
        shutil.copy2(os.path.join(source_dir, name), os.path.join(run_dir, name))
    shutil.copytree(checkpoint, os.path.join(run_dir, "checkpoints", str(step)))
    with open(os.path.join(source_dir, "metrics.jsonl"), encoding="utf-8") as src:
        kept = [line for line in src if json.loads(line)["step"] <= step]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as dst:
        dst.writelines(kept)
