"""Experiment: QAT as a final phase. A copy of a finished ``no_qat`` run continues for
``--steps`` more steps with the routed experts fake-quantized (the ``default`` recipe's
knobs, its cosine schedule stretched to the new end), then is exported as packed INT4.

Usage::

    python benchmarks/qat_final_phase.py --float-run runs/no_qat --out runs/qat_phase --steps 300
    python benchmarks/default_model_eval.py --run runs/qat_phase --baseline runs/no_qat

Measured (docs/training.md, "QAT as a final phase"): 3,500 float steps then 300 QAT steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--float-run", required=True, help="a finished --recipe no_qat run directory")
    p.add_argument("--out", required=True, help="the new run directory (must not exist)")
    p.add_argument("--steps", type=int, default=300, help="QAT steps after the float run's end")
    args = p.parse_args()

    from k2jax.train import loop, run
    from k2jax.train.recipe import RECIPES

    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists: give a new directory")
    shutil.copytree(args.float_run, args.out, ignore=shutil.ignore_patterns("export", "*.png"))
    done = loop.read_metrics(args.out)[-1]["step"]
    default = RECIPES["default"]  # QAT on, the default knobs; the copied data and tokenizer
    recipe = dataclasses.replace(
        default, train=dataclasses.replace(default.train, steps=done + args.steps)
    )
    print(run.run(args.out, recipe))  # resumes at the float run's last checkpoint, exports


if __name__ == "__main__":
    main()
