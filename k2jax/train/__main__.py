"""``python -m k2jax.train --recipe default``: train a recipe (resumable) and export it.

    python -m k2jax.train --recipe default                 # run dir: runs/default
    python -m k2jax.train --recipe smoke --out /tmp/smoke  # seconds: the pipeline end to end
    python -m k2jax.train --recipe default --stop-at 100   # stop early; rerun to resume
    python -m k2jax.train --recipe no_qat --branch-from runs/default  # its float-only twin

Progress (loss, tokens/s) goes to stderr; the export directory is printed at the end.
``--ship`` copies the export into the package (``k2jax/default_weights``), what
``k2jax.load_default`` reads.
"""

from __future__ import annotations

import argparse
import os
import sys

from k2jax.kernels.platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()


def main(argv: list[str] | None = None) -> int:
    from k2jax.train.recipe import RECIPES

    p = argparse.ArgumentParser(prog="python -m k2jax.train", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--out", default=None, help="run directory (default: runs/RECIPE)")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step")
    p.add_argument(
        "--mesh", default=None, metavar="data=2,expert=4", help="train over a device mesh"
    )
    p.add_argument(
        "--branch-from",
        default=None,
        metavar="RUN",
        help="start from RUN's first-phase checkpoint (e.g. no_qat from a default run)",
    )
    p.add_argument("--ship", action="store_true", help="copy the export into k2jax/default_weights")
    args = p.parse_args(argv)
    from k2jax.train.run import branch, run

    recipe = RECIPES[args.recipe]
    out = args.out or os.path.join("runs", recipe.name)
    if args.branch_from:
        branch(args.branch_from, out, recipe)
    mesh = None
    if args.mesh:
        import jax

        from sharding.mesh import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
        del jax
    export = run(out, recipe, stop_at=args.stop_at, mesh=mesh)
    print(export)
    if args.ship:
        from k2jax.train.ship import ship

        print(ship(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
