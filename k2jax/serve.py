"""``python -m k2jax.serve``: an OpenAI-compatible HTTP server (see docs/serving.md).

    python -m k2jax.serve                                # the trained default model
    python -m k2jax.serve --random-model                 # the random toy model (byte tokens)
    python -m k2jax.serve --checkpoint DIR --port 8000 --max-batch 32 --num-pages 4096
    python -m k2jax.serve --checkpoint DIR --mesh data=1,expert=8,tensor=1

One persistent engine holds the model, its page pool and compiled step programs; uvicorn serves
the FastAPI app of ``k2jax.server.app`` over it. The multi-host flags are the sample CLI's: in a
multi-process job (the same command on every host) process 0 serves HTTP and drives the engine,
and every other process replays its steps in lockstep (``k2jax.serving.lockstep``).
"""

from __future__ import annotations

import argparse
import os
import sys

from k2jax.kernels.platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()  # before JAX starts: see k2jax/kernels/platform.py

import jax  # noqa: E402
import uvicorn  # noqa: E402

from k2jax import cli_errors, default_model, sample  # noqa: E402
from k2jax.cli_errors import prog_name  # noqa: E402
from k2jax.server.app import DEFAULT_MAX_BODY_BYTES, create_app  # noqa: E402
from k2jax.server.byte_tokenizer import ByteChatTokenizer  # noqa: E402
from k2jax.serving import lockstep  # noqa: E402
from k2jax.serving.options import EngineConfig  # noqa: E402
from k2jax.serving.persistent_engine import PersistentEngine  # noqa: E402
from sharding import distributed  # noqa: E402

DEFAULT_MODEL_NAME = "k2jax-default"


def build_parser() -> argparse.ArgumentParser:
    p = cli_errors.ArgumentParser(
        prog=prog_name("k2jax-serve", "python -m k2jax.serve"),
        description="Serve k2jax (Kimi K2 Thinking in JAX) over an OpenAI-compatible HTTP API.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint directory (anything k2jax.load accepts); default: the built-in trained "
        "toy model (k2jax.load_default) with its tokenizer",
    )
    p.add_argument(
        "--random-model",
        action="store_true",
        help="serve the built-in RANDOM, untrained toy model instead, with a byte-level chat "
        "tokenizer",
    )
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    distributed.add_mesh_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages in the pool (default: sized by the engine)",
    )
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting for a batch slot before new ones get HTTP 429",
    )
    p.add_argument("--no-prefix-cache", action="store_true", help="turn off prefix caching")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the checkpoint directory's name, or "
        f"{DEFAULT_MODEL_NAME})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get HTTP 413",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    distributed.add_arguments(p)
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help=f"do not keep compiled programs on disk (default: {sample.compile_cache_dir()})",
    )
    cli_errors.add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli_errors.run(
        lambda: _serve(parser, args), debug=args.debug, interrupted="[k2jax] server stopped"
    )


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port} is not a port number (0..65535)")
    for flag, value, least in (
        ("--max-batch", args.max_batch, 1),
        ("--page-size", args.page_size, 1),
        ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    if args.num_pages is not None and args.num_pages < 2:
        parser.error(f"--num-pages must be >= 2 (page 0 is scratch), got {args.num_pages}")


def _model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.checkpoint is None or getattr(args, "trained_default", False):
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(args.checkpoint))


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_numbers(parser, args)
    distributed.initialize_from_args(args)  # a no-op for a single-process run
    sample._use_trained_default(args)  # no --checkpoint: the trained default model
    checked = sample.check_model_args(args)
    tokenizer = checked.tokenizer
    if checked.byte_level:
        tokenizer = ByteChatTokenizer()
    if not args.no_compile_cache:
        sample._enable_compilation_cache()
    model, description = sample._load_model(args, checked)
    print(f"[k2jax] {description}", file=sys.stderr, flush=True)
    config = EngineConfig(
        max_batch=args.max_batch,
        page_size=args.page_size,
        num_pages=args.num_pages,
        # The built-in toy models compile for longer than they run: XLA's fast options.
        compiler_options=default_model.FAST_COMPILE
        if checked.byte_level or getattr(args, "trained_default", False)
        else None,
    )
    # A multi-process job: process 0 serves HTTP and drives the steps, the others replay them.
    channel = lockstep.Channel() if jax.process_count() > 1 else None
    engine = PersistentEngine(
        model,
        config,
        max_queue=args.max_queue,
        prefix_cache=not args.no_prefix_cache,
        lockstep=channel,
    )
    if channel is not None and not channel.is_leader:
        print(
            f"[k2jax] process {jax.process_index()}: following process 0's steps",
            file=sys.stderr,
            flush=True,
        )
        engine.follow()  # returns when process 0 closes its engine
        engine.close()
        return 0
    with engine:  # started; closed (every request ended) when uvicorn returns
        app = create_app(
            engine, tokenizer, model_name=_model_name(args), max_body_bytes=args.max_body_bytes
        )
        print(
            f"[k2jax] serving {_model_name(args)!r} on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
