"""How k2jax's command-line tools report ordinary mistakes: one ``error:`` line, no traceback.

Every CLI (``python -m k2jax.sample``, ``python -m convert``, ``python -m sharding.plan``) runs
its body through ``run``: a mistake in what the user asked for (a missing file, a bad value, a
config that does not parse, a mesh that does not fit) is printed as

    error: <what is wrong, naming the file, flag or value> (<what to do>)

on stderr with a non-zero exit code, and Ctrl-C as a one-line notice with exit code 130.
``--debug`` (or ``K2JAX_DEBUG=1`` in the environment) shows the traceback instead. Library code
raises specific exception types carrying the same messages; it never prints and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping

DEBUG_ENV = "K2JAX_DEBUG"
USAGE_EXIT = 2
INTERRUPTED_EXIT = 130


class UsageError(ValueError):
    """A mistake in what the user asked for; the message names it and says what to do."""


# Mistakes, not bugs: a wrong value, or a file that is missing or cannot be written.
ORDINARY: tuple[type[BaseException], ...] = (ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <message> (see --help)``, exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


def prog_name(console_script: str, module_form: str) -> str:
    """The name a CLI was started by: its console script (``k2jax-sample``) or the module form
    (``python -m k2jax.sample``), for usage lines and messages."""
    started = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return console_script if started == console_script else module_form


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)",
    )


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def run(
    body: Callable[[], int],
    *,
    debug: bool = False,
    exit_codes: Mapping[type[BaseException], int] | None = None,
    interrupted: str = "interrupted",
) -> int:
    """``body()``'s exit code; ordinary mistakes (``ORDINARY`` and the types in ``exit_codes``,
    which also give their exit codes, else 2) become one ``error:`` line, Ctrl-C a one-line
    notice (``interrupted``) and exit code 130."""
    codes = dict(exit_codes or {})
    caught = (*codes, *ORDINARY)
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{interrupted}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Straight out: the interrupt can land while XLA still runs a step on its own threads,
        # and tearing the interpreter down under them crashes (seen: SIGSEGV at exit). What
        # must survive (the converter's partial output) is already on disk.
        os._exit(INTERRUPTED_EXIT)
    except caught as error:
        if debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return next((c for t, c in codes.items() if isinstance(error, t)), USAGE_EXIT)
