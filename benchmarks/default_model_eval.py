"""Evaluation of the trained default model on held-out conversations (the model card's table).

    python benchmarks/default_model_eval.py --run runs/default --baseline runs/no_qat
    python benchmarks/default_model_eval.py --run runs/default --conversations 40   # quicker

``--run`` is a ``python -m k2jax.train --recipe default`` run directory (its export is the
shipped model); ``--baseline`` a ``--recipe no_qat`` run (same model, data, steps and
schedule, its final phase without quantization; ``--branch-from`` the default run). Rows:

- float then QAT phase, INT4 export: the shipped model, through ``k2jax.load`` (packed INT4
  experts);
- no QAT, float experts: the baseline's float master weights (held-out loss only: k2jax serves
  INT4 experts, so this row is the trainer's forward);
- no QAT, INT4 round to nearest after training: the baseline's export.

Held-out conversations come from the generator with a seed never used in training, half of
their requests in phrasings kept out of training. Tool use and answers are scored through the
real agent loop with greedy decoding (k2jax/train/evaluate.py). Also scores a fixed set of
held-out calculator questions, the set tests/test_default_model.py replays. Writes
``RUN/evaluation.json`` (read by ``python -m k2jax.train.ship``'s model card) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import k2jax  # noqa: E402
from k2jax.chat.tokenizer import load_tokenizer  # noqa: E402
from k2jax.model.config import Config  # noqa: E402
from k2jax.train import conversations, evaluate, loop, run  # noqa: E402
from k2jax.train import step as train_step  # noqa: E402
from k2jax.train.recipe import EVAL_SEED, RECIPES  # noqa: E402
from k2jax.train.ship import evaluation_table  # noqa: E402

CALCULATOR_SET = {"seed": EVAL_SEED + 1, "count": 12}


def _float_params(run_dir: str, cfg: Config, tcfg) -> dict:
    manager = loop.checkpoint_manager(run_dir, tcfg.checkpoint_every)
    state = loop.restore_or_init(manager, cfg, tcfg)
    manager.close()
    return state["params"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the default recipe's run directory")
    p.add_argument("--baseline", default=None, help="the no_qat recipe's run directory")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--loss-conversations", type=int, default=400)
    args = p.parse_args(argv)

    tok = load_tokenizer(os.path.join(args.run, "export"))
    seq_len = RECIPES["default"].train.seq_len
    cfg = Config.from_hf(os.path.join(args.run, "export", "config.json"))
    rows_tokens, rows_mask = evaluate.heldout_rows(
        tok, EVAL_SEED, args.loss_conversations, seq_len, cfg.pad_token_id
    )
    held_out = conversations.conversations(EVAL_SEED, args.conversations, split="eval")
    result = {"seed": EVAL_SEED, "conversations": args.conversations, "rows": []}

    def int4_row(name: str, export: str) -> dict:
        model = k2jax.load(export, dtype="float32")
        scores = evaluate.score(model, tok, held_out)
        loss = evaluate.masked_loss(model.logits, rows_tokens, rows_mask)
        print(f"[eval] {name}: {scores} loss {loss:.4f}", file=sys.stderr, flush=True)
        return {"model": name, **scores, "loss": loss}, model

    shipped_name = "float, then QAT phase; INT4 export (shipped)"
    row, shipped = int4_row(shipped_name, os.path.join(args.run, "export"))
    calc = evaluate.calculator_set(**CALCULATOR_SET)
    calc_scores = evaluate.score(shipped, tok, calc)
    result["calculator_set"] = {**CALCULATOR_SET, **calc_scores}
    result["rows"].append(row)
    if args.baseline:
        recipe = RECIPES["no_qat"]
        float_cfg = run.training_config(cfg, qat=False)
        params = _float_params(args.baseline, float_cfg, recipe.train)
        forward = jax.jit(
            lambda t: train_step.forward(params, t, cfg=float_cfg, dtype=jnp.float32)[0]
        )
        loss = evaluate.masked_loss(lambda t: forward(jnp.asarray(t)), rows_tokens, rows_mask)
        float_row = {"model": "no QAT (float final phase), float experts", "loss": loss}
        result["rows"].append(float_row)
        row, _ = int4_row(
            "no QAT, INT4 round-to-nearest after training", os.path.join(args.baseline, "export")
        )
        result["rows"].append(row)
        qat, flt = result["rows"][0]["loss"], result["rows"][1]["loss"]
        result["qat_loss_vs_float"] = qat / flt - 1
    with open(os.path.join(args.run, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    print("\n".join(evaluation_table(result)))
    print(f"calculator set: {calc_scores}")
    if "qat_loss_vs_float" in result:
        print(f"QAT held-out loss vs float: {result['qat_loss_vs_float']:+.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
