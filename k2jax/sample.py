"""``python -m k2jax.sample``: generate from a checkpoint, or from the built-in default model.

    python -m k2jax.sample                                  # default model (random, untrained)
    python -m k2jax.sample --checkpoint DIR --prompt "Hello" --max-new-tokens 64
    python -m k2jax.sample --checkpoint DIR --prompt-ids 1,2,3 --temperature 0 --json
    python -m k2jax.sample --checkpoint DIR --chat "What is 2+3?"

Tokens stream to stdout as they are produced; what model runs (and, for the default model, that
it is random) goes to stderr. ``--json`` prints one JSON object instead: prompt ids, new ids,
and text where a tokenizer exists.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys

from k2jax.kernels.platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()  # before JAX starts: see k2jax/kernels/platform.py

import jax  # noqa: E402

from k2jax import default_model  # noqa: E402
from k2jax.kernels import cpu_library  # noqa: E402
from k2jax.serving.options import GenerateOptions  # noqa: E402
from sharding import distributed  # noqa: E402

DEFAULT_PROMPT = "The capital of France is"
BYTE_LABEL = "utf-8 bytes (the default model has no tokenizer)"

try:  # the chat mode is its own module; the CLI works without it
    from k2jax.chat import cli as chat_cli
except ImportError:  # pragma: no cover
    chat_cli = None


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m k2jax.sample",
        description="Generate text with k2jax (Kimi K2 Thinking in JAX).",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint directory (anything k2jax.load accepts); default: the built-in random "
        "toy model",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype; auto = float32 on CPU (bf16 matmuls are slow there), else bfloat16",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", type=_ids, metavar="1,2,3", help="prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-ids",
        type=_ids,
        default=None,
        metavar="1,2",
        help="stop token ids (default: the config's eos, <|im_end|> for K2)",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--logprobs", action="store_true", help="report the chosen tokens' logprobs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if chat_cli is not None:
        chat_cli.add_chat_arguments(p)
    p.add_argument(
        "--mesh",
        default=None,
        metavar="data=1,expert=8,tensor=1",
        help="run sharded over a device mesh (sizes must multiply to the device count)",
    )
    distributed.add_arguments(p)
    return p


def _on_mesh(model, mesh_text: str | None):
    """``model`` placed by the decode rules on the ``--mesh`` (unchanged without one)."""
    if mesh_text is None:
        return model
    from k2jax.serving.loaded_model import Model
    from sharding import rules
    from sharding.mesh import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(mesh_text))
    params = rules.shard_params(model.params, model.config, mesh)
    return Model(model.config, params, model.dtype, mesh, rules=rules.flax_rules("decode"))


def _cpu_kernels_note() -> str:
    """Which path the CPU runs: k2jax's kernels (and their instruction set) or the slow jnp one."""
    if jax.default_backend() != "cpu":
        return ""
    if not cpu_library.available():
        return " CPU kernels NOT built: the slower jnp path runs (reinstall with g++ present)."
    return f" CPU kernels: {cpu_library.best_isa()}."


def _load(args):
    """(model, tokenizer or None, description, byte-level fallback?)."""
    if args.checkpoint is None:
        dtype = "float32" if args.dtype == "auto" else args.dtype
        model = default_model.default_model(dtype=dtype)
        return model, None, default_model.DESCRIPTION.format(seed=default_model.DEFAULT_SEED), True
    import k2jax
    from k2jax.chat import tokenizer as k2tok

    dtype = args.dtype
    try:
        tok = k2tok.load_tokenizer(args.checkpoint)
    except FileNotFoundError:
        tok = None
    if tok is None and (args.prompt_ids is None or getattr(args, "chat", None) is not None):
        # Refused before loading the weights, which can take long.
        raise SystemExit(
            f"error: {args.checkpoint} has no tokenizer (tiktoken.model or tokenizer.model), so "
            "text (--prompt, --chat, the default prompt) cannot be encoded: pass "
            "--prompt-ids 1,2,3 instead"
        )
    model = k2jax.load(args.checkpoint, dtype=dtype)
    c = model.config
    desc = (
        f"checkpoint {os.path.abspath(args.checkpoint)}: {c.num_layers} layers, hidden "
        f"{c.hidden_size}, {c.n_routed_experts} experts (top-{c.num_experts_per_tok}), "
        f"vocab {c.vocab_size}, {model.dtype}; "
        + ("tokenizer found" if tok else "no tokenizer (token ids only)")
    )
    return model, tok, desc, False


def _printable(text: str) -> str:
    """Escapes control characters: a random model's bytes must not drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _enable_compilation_cache() -> None:
    """Keeps compiled programs on disk, so a second run skips most of its start-up."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    cache = os.path.join(os.path.expanduser("~"), ".cache", "k2jax", "jax")
    jax.config.update("jax_compilation_cache_dir", cache)


class _TextStream:
    """Token ids to printable text, incrementally (a tokenizer, UTF-8 bytes, or raw ids)."""

    def __init__(self, tok, byte_level: bool):
        self.decoder = tok.stream_decoder() if tok is not None else None
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace") if byte_level else None

    def push(self, token: int) -> str:
        if self.decoder is not None:
            return self.decoder.push(token)
        if self.bytes is not None:
            return self.bytes.decode(bytes([token])) if token < default_model.BYTE_VOCAB else ""
        return f"{token} "

    def flush(self) -> str:
        if self.decoder is not None:
            return self.decoder.flush()
        if self.bytes is not None:
            return self.bytes.decode(b"", final=True)
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # refused here, before any model is built
        options = GenerateOptions.of(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            seed=args.seed,
            stop_token_ids=args.stop_ids,
            page_size=args.page_size,
            num_pages=args.num_pages,
            prefill_chunk=args.prefill_chunk,
        )
    except ValueError as e:
        parser.error(str(e))
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")

    distributed.initialize_from_args(args)  # a no-op for a single-process run
    if not distributed.is_main_process():  # every host runs the same program; one prints
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    _enable_compilation_cache()
    model, tok, desc, byte_level = _load(args)
    model = _on_mesh(model, args.mesh)
    if args.mesh:
        desc += f"; sharded over mesh {args.mesh}"
    desc += _cpu_kernels_note()
    print(f"[k2jax] {desc}", file=sys.stderr, flush=True)

    chat_prompt = getattr(args, "chat", None)
    if chat_prompt is not None:
        if tok is None:
            parser.error(
                "--chat needs a checkpoint with a tokenizer (tiktoken.model or tokenizer.model); "
                "the default model and this checkpoint have none"
            )
        chat_cli.run_chat(
            model,
            tok,
            prompt=chat_prompt,
            system=args.system,
            tools_json_path=args.tools,
            max_new_tokens=args.max_new_tokens,
            options=options,
        )
        return 0

    if args.prompt_ids is not None:
        prompt_ids = args.prompt_ids
    else:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if tok is not None:
            prompt_ids = tok.encode(text)
        elif byte_level:
            prompt_ids = default_model.encode_bytes(text)
            print(f"[k2jax] prompt {text!r} encoded as UTF-8 bytes", file=sys.stderr)
        else:
            parser.error(
                f"{args.checkpoint} has no tokenizer (tiktoken.model or tokenizer.model), so "
                "--prompt cannot be encoded: pass --prompt-ids 1,2,3 instead"
            )
    if not prompt_ids:
        parser.error("the prompt is empty")

    stream = model.generate_stream(
        [prompt_ids],
        args.max_new_tokens,
        options,
        logprobs=True,
        compiler_options=default_model.FAST_COMPILE if byte_level else None,
    )
    text_out = _TextStream(tok, byte_level)
    new_ids: list[int] = []
    logprobs: list[float] = []
    pieces: list[str] = []
    for step in stream:
        for _, token, logprob in step:
            new_ids.append(token)
            logprobs.append(logprob)
            piece = text_out.push(token)
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(_printable(piece) if byte_level else piece)
                sys.stdout.flush()
    pieces.append(text_out.flush())
    stops = set(args.stop_ids if args.stop_ids is not None else [model.config.eos_token_id])
    finish = "stop" if new_ids and new_ids[-1] in stops else "length"
    if args.json:
        out = {
            "model": desc,
            "prompt_ids": prompt_ids,
            "new_ids": new_ids,
            "text": "".join(pieces) if (tok is not None or byte_level) else None,
            "text_encoding": "tokenizer"
            if tok is not None
            else (BYTE_LABEL if byte_level else None),
            "finish_reason": finish,
        }
        if args.logprobs:
            out["logprobs"] = logprobs
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write((_printable(pieces[-1]) if byte_level else pieces[-1]) + "\n")
        if args.logprobs:
            print(json.dumps({"new_ids": new_ids, "logprobs": logprobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
