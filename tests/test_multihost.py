"""Two processes on localhost, 4 CPU devices each, give the same logits as one process.

The test starts this file twice as a script (``--worker``): each process joins the job through
``sharding.distributed.initialize`` over loopback (gloo collectives), builds the same tiny
model, places it on a global (1, 4, 2) mesh -- experts over all 8 devices, so the MoE psum
crosses the process boundary -- and writes its logits. Processes are killed on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = {"num_attention_heads": 8, "num_key_value_heads": 8}
MESH = (1, 4, 2)
SEED = 7
TIMEOUT_S = 420


def _tokens(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (4, 8))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    import jax
    import jax.numpy as jnp
    import reference

    from k2jax import model as k2model
    from k2jax.model.config import Config
    from k2jax.serving.loaded_model import Model

    raw = reference.hf_config_dict(**TINY)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    cfg = Config.from_hf(raw)
    params = k2model.init_params(cfg, jax.random.key(SEED), jnp.float32)
    expected = Model(cfg, params, jnp.float32).logits(_tokens(cfg.vocab_size))

    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
    )
    procs = []
    try:
        for pid in range(2):
            cmd = [
                sys.executable,
                os.path.join(HERE, "test_multihost.py"),
                "--worker",
                f"--coordinator={coordinator}",
                "--num-processes=2",
                f"--process-id={pid}",
                f"--config={config_path}",
                f"--out={tmp_path / f'logits{pid}.npy'}",
            ]
            log = open(tmp_path / f"log{pid}.txt", "w")  # closed in finally
            procs.append(
                (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            )
        deadline = time.monotonic() + TIMEOUT_S
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = [(tmp_path / f"log{pid}.txt").read_text() for pid in range(2)]
    for (proc, _), text in zip(procs, logs, strict=True):
        assert proc.returncode == 0, text[-4000:]
    for pid in range(2):
        got = np.load(tmp_path / f"logits{pid}.npy")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert "process 0 of 2: 8 devices, 4 local" in logs[0]
    assert "process 1 of 2" not in logs[1]  # only process 0 prints


def _worker(argv: list[str]) -> None:
    """One host of the two: join, place the model on the global mesh, write the logits."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    from sharding import distributed

    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    assert distributed.initialize_from_args(args)

    import jax
    import jax.numpy as jnp

    from k2jax import model as k2model
    from k2jax.model.config import Config
    from k2jax.serving.loaded_model import Model
    from sharding import rules
    from sharding.mesh import make_mesh

    jax.config.update("jax_numpy_rank_promotion", "raise")
    cfg = Config.from_hf(args.config)
    # Every process builds the same params from the same seed; each keeps only its shards.
    params = k2model.init_params(cfg, jax.random.key(SEED), jnp.float32)
    mesh = make_mesh(*MESH)
    placed = rules.shard_params(params, cfg, mesh)
    model = Model(cfg, placed, jnp.float32, mesh, rules.flax_rules("decode"))
    logits = model.logits(_tokens(cfg.vocab_size))
    np.save(args.out, logits)
    distributed.print0(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.device_count()} devices, {jax.local_device_count()} local"
    )


if __name__ == "__main__":
    _worker(sys.argv[1:])


def test_sample_cli_on_two_processes_matches_one(tmp_path):
    """The README's multi-host launch, as two localhost processes: ``python -m k2jax.sample
    --checkpoint DIR --mesh expert=8 --coordinator ... --num-processes 2 --process-id I`` (4 fake
    CPU devices each). Each process loads the checkpoint straight onto the global mesh, the
    engine feeds replicated inputs and reads replicated tokens; both exit 0, and process 0
    prints the greedy ids one process gives."""
    import reference

    ckpt = reference.write_checkpoint(reference.build(seed=3), tmp_path / "ckpt")
    args = ["--checkpoint", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "6"]
    args += ["--temperature", "0", "--json", "--no-compile-cache"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "TPU_"))}
    env["JAX_PLATFORMS"] = "cpu"
    single = subprocess.run(
        [sys.executable, "-m", "k2jax.sample", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    want = json.loads(single.stdout.strip().splitlines()[-1])["new_ids"]

    coordinator = f"127.0.0.1:{_free_port()}"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    multi = [*args, "--mesh", "expert=8", "--coordinator", coordinator, "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "k2jax.sample", *multi, "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, (i, err[-2000:])
    printed = json.loads(outs[0][0].strip().splitlines()[-1])
    assert "sharded over mesh expert=8" in printed["model"]
    assert printed["new_ids"] == want and len(want) == 6
    assert '"new_ids"' not in outs[1][0]  # only process 0 prints results
