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
    """Trains ``recipe`` in ``run_dir`` and exports it; returns the export directory."""
    cfg, tokens, mask, pad_id = prepare(run_dir, recipe)
    state = loop.train(
        run_dir,
        training_config(cfg, recipe.qat),
        recipe.train,
        tokens,
        mask,
        pad_id,
        stop_at=stop_at,
        mesh=mesh,
    )
    records = loop.read_metrics(run_dir)
    if records:
        try:
            loop.plot_loss(records, os.path.join(run_dir, "loss.png"), f"k2jax {recipe.name}")
        except ImportError:
            print("[k2jax.train] matplotlib is not installed (the bench extra): no loss.png")
    from k2jax.train.export import export_hf

    out = os.path.join(run_dir, "export")
    extra = {
        "k2jax_training": {"recipe": recipe.name, "steps": int(state["step"]), "qat": recipe.qat}
    }
    return export_hf(
        state["params"],
        cfg,
        out,
        tokenizer_file=os.path.join(run_dir, "tokenizer.model"),
        extra_config=extra,
    )
