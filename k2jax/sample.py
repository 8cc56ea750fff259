"""``python -m k2jax.sample``: generate from a checkpoint, or from the built-in default model.

    python -m k2jax.sample                                  # the trained default model
    python -m k2jax.sample --chat "What is 347 * 29?"       # ... thinking and calling tools
    python -m k2jax.sample --random-model                   # the random, untrained toy model
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
import dataclasses
import json
import os
import sys

from k2jax.kernels.platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()  # before JAX starts: see k2jax/kernels/platform.py

import jax  # noqa: E402

from k2jax import cli_errors, default_model  # noqa: E402
from k2jax.chat.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from k2jax.cli_errors import UsageError, prog_name  # noqa: E402
from k2jax.kernels import cpu_library  # noqa: E402
from k2jax.model.config import Config  # noqa: E402
from k2jax.serving.options import GenerateOptions  # noqa: E402
from sharding import distributed  # noqa: E402

DEFAULT_PROMPT = "The capital of France is"
AGENT_TURN_TOKENS = 128  # one reasoning + tool-call turn of the trained default model fits
BYTE_LABEL = "utf-8 bytes (the default model has no tokenizer)"

from k2jax.chat import cli as chat_cli  # noqa: E402


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = cli_errors.ArgumentParser(
        prog=prog_name("k2jax-sample", "python -m k2jax.sample"),
        description="Generate text with k2jax (Kimi K2 Thinking in JAX).",
        epilog=f"Compiled programs are cached in {compile_cache_dir()} "
        "($JAX_COMPILATION_CACHE_DIR moves it; --no-compile-cache turns it off).",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint directory (anything k2jax.load accepts); default: the built-in "
        "trained toy model (k2jax.load_default)",
    )
    p.add_argument(
        "--random-model",
        action="store_true",
        help="run the built-in RANDOM, untrained toy model (byte-level) instead",
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
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens (per model turn with --chat); default 32, or 128 per turn for the "
        "trained default model's agent loop",
    )
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
    chat_cli.add_chat_arguments(p)
    distributed.add_mesh_arguments(p)
    distributed.add_arguments(p)
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs on disk (see below for where they go)",
    )
    cli_errors.add_debug_argument(p)
    return p


@dataclasses.dataclass
class _Checked:
    """Everything settled before the weights load: a mistake found here costs no load time."""

    config: Config
    tokenizer: Tokenizer | None
    byte_level: bool  # the default model: text is UTF-8 bytes
    prompt_ids: list[int]  # --chat: the rendered user turn, ready for the reply
    mesh_sizes: dict[str, int] | None


def _check_checkpoint_dir(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"--checkpoint {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(
            f"--checkpoint {path} is a file; pass the checkpoint's directory (the one holding "
            "config.json and the weights)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(
            f"--checkpoint {path} is not a checkpoint directory (no config.json); pass an HF K2 "
            "checkpoint or the output of python -m convert"
        )


def check_model_args(args) -> _Checked:
    """--checkpoint (config and tokenizer) and --mesh, checked without touching the weights;
    `prompt_ids` is left empty. Shared with ``python -m k2jax.serve``."""
    if args.checkpoint is None:
        config, tok, byte_level = default_model.default_config(), None, True
    else:
        _check_checkpoint_dir(args.checkpoint)
        config = Config.from_hf(os.path.join(args.checkpoint, "config.json"))
        try:
            tok = load_tokenizer(args.checkpoint)
        except FileNotFoundError:
            tok = None
        byte_level = False
        if tok is not None and tok.used_ids_end > config.vocab_size:
            raise UsageError(
                f"--checkpoint {args.checkpoint}: its tokenizer produces ids up to "
                f"{tok.used_ids_end - 1} but the model's vocabulary has {config.vocab_size} "
                "(vocab_size in config.json); the tokenizer does not belong to this model"
            )
    sizes = None
    if args.mesh is not None:
        from sharding.rules import check_mesh

        sizes = check_mesh(config, args.mesh, jax.device_count())
    return _Checked(config, tok, byte_level, [], sizes)


def _use_trained_default(args) -> None:
    """No --checkpoint: the trained default model, unless --random-model asks for the random
    one (or the trained weights are not installed)."""
    args.trained_default = False
    if args.checkpoint is None and not args.random_model and default_model.trained_available():
        args.checkpoint = default_model.TRAINED_DIR
        args.trained_default = True


def _check_before_loading(args) -> _Checked:
    """Paths, config, tokenizer, tools, prompt and mesh, checked without touching the weights."""
    checked = check_model_args(args)
    config, tok, byte_level = checked.config, checked.tokenizer, checked.byte_level
    chat = args.chat
    tools = chat_cli.load_tool_declarations(args.tools) if args.tools else None
    if tools is None and getattr(args, "trained_default", False):
        from k2jax.chat.tools import DECLARATIONS

        tools = list(DECLARATIONS)
    if chat is not None:
        if tok is None:
            where = "the default model" if args.checkpoint is None else args.checkpoint
            raise UsageError(
                f"--chat needs a tokenizer (tiktoken.model or tokenizer.model) and {where} has none"
            )
        ids = chat_cli.chat_prompt_ids(tok, chat, args.system, tools)
    elif args.prompt_ids is not None:
        ids = args.prompt_ids
    else:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if tok is not None:
            ids = tok.encode(text)
        elif byte_level:
            ids = default_model.encode_bytes(text)
        else:
            raise UsageError(
                f"{args.checkpoint} has no tokenizer (tiktoken.model or tokenizer.model), so "
                "text (--prompt, or the default prompt) cannot be encoded: pass "
                "--prompt-ids 1,2,3 instead"
            )
    if not ids:
        raise UsageError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise UsageError(
            f"--prompt-ids: token id {bad[0]} is outside the model's vocabulary "
            f"[0, {config.vocab_size})"
        )
    context = config.max_position_embeddings
    if len(ids) > context:
        raise UsageError(
            f"the prompt is {len(ids)} tokens, longer than the model's context ({context} "
            "positions, max_position_embeddings)"
        )
    if len(ids) + args.max_new_tokens > context:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens}: the prompt ({len(ids)} tokens) plus "
            f"{args.max_new_tokens} new tokens exceeds the model's context ({context}); lower "
            f"--max-new-tokens to at most {context - len(ids)}"
        )
    return dataclasses.replace(checked, prompt_ids=ids)


def _load_model(args, checked: _Checked):
    """(model, description) with the weights loaded, straight onto the --mesh if one is given
    (each array restored or placed into its own sharding; no whole copy on one device)."""
    mesh = None
    if checked.mesh_sizes is not None:
        from sharding.mesh import make_mesh

        mesh = make_mesh(**checked.mesh_sizes)
    if args.checkpoint is None:
        dtype = "float32" if args.dtype == "auto" else args.dtype
        model = default_model.default_model(dtype=dtype)
        desc = default_model.DESCRIPTION.format(seed=default_model.DEFAULT_SEED)
        if mesh is not None:
            from k2jax.serving.loaded_model import Model
            from sharding import rules

            strategy = args.strategy
            params = rules.shard_params(model.params, model.config, mesh, strategy)
            model = Model(model.config, params, model.dtype, mesh, rules.flax_rules(strategy))
    else:
        import k2jax

        model = k2jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh, strategy=args.strategy)
        c = model.config
        trained = getattr(args, "trained_default", False)
        desc = (default_model.TRAINED_DESCRIPTION + " " if trained else "") + (
            f"checkpoint {os.path.abspath(args.checkpoint)}: {c.num_layers} layers, hidden "
            f"{c.hidden_size}, {c.n_routed_experts} experts (top-{c.num_experts_per_tok}), "
            f"vocab {c.vocab_size}, {model.dtype}; "
            + ("tokenizer found" if checked.tokenizer else "no tokenizer (token ids only)")
        )
    if mesh is not None:
        desc += f"; sharded over mesh {args.mesh} ({args.strategy} rules)"
    return model, desc + _cpu_kernels_note()


def _cpu_kernels_note() -> str:
    """Which path the CPU runs: k2jax's kernels (and their instruction set) or the slow jnp one."""
    if jax.default_backend() != "cpu":
        return ""
    if not cpu_library.available():
        return " CPU kernels NOT built: the slower jnp path runs (reinstall with g++ present)."
    return f" CPU kernels: {cpu_library.best_isa()}."


def _printable(text: str) -> str:
    """Escapes control characters: a random model's bytes must not drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def compile_cache_dir() -> str:
    """Where the CLI keeps compiled programs: $JAX_COMPILATION_CACHE_DIR, else
    ~/.cache/k2jax/jax (XDG_CACHE_HOME respected)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "k2jax", "jax")


def _enable_compilation_cache() -> None:
    """Keeps compiled programs on disk, so a second run skips most of its start-up."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", compile_cache_dir())


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


def _run_agent(model, tok, args, options) -> None:
    """--chat with the trained default model: the agent loop with the built-in tools, each
    step printed (reasoning apart, each tool call and its result, then the answer)."""
    from k2jax.chat.agent import Agent
    from k2jax.chat.parse import ParseEvent
    from k2jax.chat.tools import builtin_tools

    section = None

    def show(event) -> None:
        nonlocal section
        if not isinstance(event, ParseEvent):  # a tool result message
            sys.stdout.write(f"\n[tool result] {event['name']}: {event['content']}")
            section = "tool_result"
        elif event.kind == "tool_call":
            call = {k: event.tool_call[k] for k in ("id", "type", "function")}
            sys.stdout.write(f"\n[tool call] {json.dumps(call, ensure_ascii=False)}")
            section = "tool_call"
        else:
            if event.kind != section:
                label = "[thinking] " if event.kind == "reasoning" else "[answer] "
                sys.stdout.write(("\n" if section is not None else "") + label)
                section = event.kind
            sys.stdout.write(event.text)
        sys.stdout.flush()

    agent = Agent(
        model,
        builtin_tools(),
        tokenizer=tok,
        system=args.system,
        max_steps=6,
        max_new_tokens=args.max_new_tokens,
        options=options,
        on_event=show,
    )
    result = agent.run(args.chat)
    sys.stdout.write("\n")
    if result.stop_reason != "answer":
        print(f"[k2jax] the agent stopped: {result.stop_reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli_errors.run(
        lambda: _sample(parser, args),
        debug=args.debug,
        interrupted="[k2jax] interrupted: generation stopped",
    )


def _sample(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.chat is not None and (args.prompt is not None or args.prompt_ids is not None):
        parser.error("--chat takes the prompt itself; drop --prompt / --prompt-ids")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # Sampling and engine values are refused here, before any model is built.
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
    distributed.initialize_from_args(args)  # a no-op for a single-process run
    _use_trained_default(args)
    if args.max_new_tokens is None:
        agent = args.chat is not None and args.trained_default and not args.tools
        args.max_new_tokens = AGENT_TURN_TOKENS if agent else 32
    checked = _check_before_loading(args)
    if not distributed.is_main_process():  # every host runs the same program; one prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (errors still reach stderr)
    if not args.no_compile_cache:
        _enable_compilation_cache()
    model, desc = _load_model(args, checked)
    print(f"[k2jax] {desc}", file=sys.stderr, flush=True)
    tok, byte_level = checked.tokenizer, checked.byte_level

    if args.chat is not None and args.trained_default and not args.tools:
        _run_agent(model, tok, args, options)
        return 0
    if args.chat is not None:
        chat_cli.stream_reply(model, tok, checked.prompt_ids, args.max_new_tokens, options)
        return 0

    prompt_ids = checked.prompt_ids
    if byte_level and args.prompt_ids is None:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
        print(f"[k2jax] prompt {text!r} encoded as UTF-8 bytes", file=sys.stderr)
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
