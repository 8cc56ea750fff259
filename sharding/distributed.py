"""Multi-host start-up: every host runs the same program; ``initialize`` joins them into one.

On a Cloud TPU VM slice ``jax.distributed.initialize()`` with no arguments discovers the
coordinator, the process count and this host's id from the TPU metadata, so ``initialize()``
with nothing set does exactly that. Elsewhere (GPU or CPU clusters, the localhost tests) the
three values come from the command line or from the environment variables
``K2JAX_COORDINATOR`` (host:port of process 0), ``K2JAX_NUM_PROCESSES`` and
``K2JAX_PROCESS_ID``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

ENV_COORDINATOR = "K2JAX_COORDINATOR"
ENV_NUM_PROCESSES = "K2JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "K2JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join this process to the others; returns whether a multi-process run was started.

    Arguments left as None are read from the environment (see the module docstring); if all
    three are still unset and this is not a TPU VM, nothing happens (a single-process run).
    On the CPU the cross-process collectives use gloo. Call before anything touches devices.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = (coordinator, num_processes, process_id)
    # libtpu writes "WARNING: could not determine ..." into TPU_WORKER_HOSTNAMES on a host it
    # finds no TPU on, and child processes inherit it: that is no TPU VM.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    on_tpu_vm = bool((hosts and not hosts.startswith("WARNING")) or os.environ.get("TPU_NAME"))
    if all(v is None for v in explicit):
        if not on_tpu_vm:
            return False
        jax.distributed.initialize()  # the TPU metadata server knows all three
        return True
    if any(v is None for v in explicit):
        raise ValueError(
            "multi-process start needs --coordinator, --num-processes and --process-id together "
            f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r})"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
        # The CPU backend has no cross-process collectives of its own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def add_mesh_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--mesh`` and ``--strategy``, the flags of a CLI that can run sharded."""
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="data=1,expert=8,tensor=1",
        help="run sharded over a device mesh (sizes must multiply to the device count)",
    )
    parser.add_argument(
        "--strategy",
        choices=("decode", "dp_attention", "context_parallel"),
        default="decode",
        help="with --mesh: the sharding rules (dp_attention: data-parallel attention, the batch "
        "and its KV pages split over data x expert; context_parallel: every sequence's KV pages "
        "striped over all devices, for long contexts; see docs/sharding.md)",
    )
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator``, ``--num-processes`` and ``--process-id`` to a CLI's parser."""
    group = parser.add_argument_group("multi-host (same command on every host)")
    group.add_argument(
        "--coordinator", default=None, help="host:port of process 0 (default: $K2JAX_COORDINATOR)"
    )
    group.add_argument(
        "--num-processes", type=int, default=None, help="hosts in the job ($K2JAX_NUM_PROCESSES)"
    )
    group.add_argument(
        "--process-id", type=int, default=None, help="this host's index ($K2JAX_PROCESS_ID)"
    )
    return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
    """``initialize`` with the values ``add_arguments`` parsed."""
    return initialize(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    """True on process 0, the one that prints results."""
    return jax.process_index() == 0


def print0(*args, file=None, **kwargs) -> None:
    """``print`` on process 0 only, so N hosts do not print N copies."""
    if is_main_process():
        print(*args, file=file or sys.stdout, **kwargs)
