"""``python -m convert HF_DIR OUT_DIR`` (installed as ``k2jax-convert``): HF K2 -> k2jax checkpoint.

Exit status: 0 done, 1 the output could not be written as asked, 2 the source checkpoint is
bad (nothing was written) or the command line is, 130 interrupted (``OUT_DIR.partial`` is left
for ``--resume``). Every error is one ``error:`` line on stderr (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from k2jax import cli_errors
from k2jax.kernels.platform import default_to_cpu_without_accelerators

# Converting needs no accelerator; see k2jax/kernels/platform.py.
default_to_cpu_without_accelerators()


def _parser() -> argparse.ArgumentParser:
    p = cli_errors.ArgumentParser(
        prog=cli_errors.prog_name("k2jax-convert", "python -m convert"),
        description="Convert a Kimi K2 Thinking (INT4), Kimi K2 Instruct or DeepSeek-V3/V3.1/R1 "
        "(FP8) HF checkpoint into a k2jax checkpoint that k2jax.load restores straight onto a "
        "mesh.",
    )
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json, index, shards)")
    p.add_argument("out_dir", help="output directory; written as OUT_DIR.partial, then renamed")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="storage dtype of the non-expert weights (INT4 experts are kept packed)",
    )
    p.add_argument(
        "--experts",
        default=None,
        choices=("int4", "fp8", "bf16"),
        help="routed experts' format: int4 (K2 Thinking's INT4: group 32, bf16 scales; an FP8 "
        "checkpoint's experts are re-quantized), fp8 (kept as stored, 1 byte per weight) or "
        "bf16 (widened to --dtype); default: the checkpoint's own",
    )
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR.partial")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR / OUT_DIR.partial")
    p.add_argument(
        "--verify", action="store_true", help="re-read the source and compare every array"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    cli_errors.add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The converter only moves bytes; it must not grab an accelerator on a TPU VM.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from convert.checkpoint_format import FormatError
    from convert.converter import ConvertError, convert
    from convert.hf_reader import CheckpointError
    from k2jax.model.config import ConfigError

    class BadSource(ValueError):
        pass

    def body() -> int:
        try:
            convert(
                args.hf_dir,
                args.out_dir,
                dtype=args.dtype,
                resume=args.resume,
                force=args.force,
                verify=args.verify,
                quiet=args.quiet,
                experts=args.experts,
            )
        except (CheckpointError, ConfigError) as e:
            raise BadSource(f"bad source checkpoint {args.hf_dir}: {e}") from e
        return 0

    partial = f"{os.path.abspath(args.out_dir)}.partial"
    return cli_errors.run(
        body,
        debug=args.debug,
        exit_codes={
            BadSource: 2,
            ConvertError: 1,
            FormatError: 1,
            OSError: 1,
        },
        interrupted=f"[k2jax-convert] interrupted; {partial} is kept: rerun with --resume to "
        "continue",
    )


if __name__ == "__main__":
    sys.exit(main())
