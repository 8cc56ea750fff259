"""`python -m k2jax.serve` as a two-process job on 127.0.0.1 (4 fake CPU devices each, the
default model's experts over all 8): process 0 serves HTTP and drives the engine, process 1
replays its steps in lockstep (``k2jax.serving.lockstep``).

Checked through the real `openai` client: concurrent requests (greedy and seeded) get exactly
the tokens one process gives for them alone; the job survives an idle spell longer than the
heartbeat; a client that walks away mid-stream has its request cancelled on both processes
(the next requests still agree); and when process 0 stops, process 1 ends by itself, exit 0.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from k2jax.serving import lockstep

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START_TIMEOUT_S = 420
PROMPTS = [[5, 9, 14, 20, 31], [7, 3], [100, 200, 300, 400, 500, 600, 700], [42] * 19]
NEW_TOKENS = 6
LONG = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve_multihost")
    port, coordinator = _free_port(), f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    args = ["--port", str(port), "--max-batch", "4", "--num-pages", "64", "--no-compile-cache"]
    args += ["--dtype", "float32", "--mesh", "expert=8", "--coordinator", coordinator]
    args += ["--num-processes", "2", "--log-level", "warning"]
    procs = []
    for pid in range(2):
        log = open(logs / f"process{pid}.txt", "w")  # noqa: SIM115  (closed below)
        cmd = [sys.executable, "-m", "k2jax.serve", *args, "--process-id", str(pid)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))

    def tail(pid: int) -> str:
        procs[pid][1].flush()
        return (logs / f"process{pid}.txt").read_text()[-3000:]

    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            for pid, (proc, _) in enumerate(procs):
                assert proc.poll() is None, f"process {pid} exited:\n{tail(pid)}"
            assert time.monotonic() < deadline, f"no server in {START_TIMEOUT_S} s:\n{tail(0)}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}/v1", "procs": procs, "tail": tail}
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()


@pytest.fixture(scope="module")
def alone():
    """Each prompt's tokens from one process and one device, request by request."""
    import k2jax
    from k2jax.serving.options import GenerateOptions
    from k2jax.serving.sampling import SamplingParams

    model = k2jax.load_default(dtype="float32")

    def generate(prompt, temperature, seed, new_tokens=NEW_TOKENS):
        options = GenerateOptions(sampling=SamplingParams(temperature=temperature, seed=seed))
        return model.generate([prompt], new_tokens, options=options)[0]

    return generate


def _client(job) -> openai.OpenAI:
    return openai.OpenAI(base_url=job["url"], api_key="unused", max_retries=0, timeout=300)


def _complete(client, prompt, temperature, seed):
    reply = client.completions.create(
        model="k2jax-default",
        prompt=prompt,
        max_tokens=NEW_TOKENS,
        temperature=temperature,
        seed=seed,
        extra_body={"return_token_ids": True},
    )
    return reply


def _token_ids(reply) -> list[int]:
    return list(reply.choices[0].model_extra["token_ids"])


def test_concurrent_requests_match_one_process_then_survive_idle_and_a_cancel(job, alone):
    client = _client(job)
    cases = [(p, 0.0, 0) for p in PROMPTS] + [(p, 0.9, 11 + i) for i, p in enumerate(PROMPTS)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda c: _complete(client, *c), cases))
    for (prompt, temperature, seed), reply in zip(cases, replies, strict=True):
        assert _token_ids(reply) == alone(prompt, temperature, seed), (prompt, temperature)

    # Idle for longer than the heartbeat: process 1 waits in the channel, not in a step.
    time.sleep(lockstep.HEARTBEAT_SECONDS * 1.5)
    for pid, (proc, _) in enumerate(job["procs"]):
        assert proc.poll() is None, f"process {pid} died while idle:\n{job['tail'](pid)}"

    # A streaming client that walks away after two chunks of a reply that would run on (one
    # process gives it all LONG tokens): cancelled on process 0, dropped on process 1. Were it
    # still running on process 1 only, the processes' batches would differ and the experts'
    # cross-process sums would mix rows: the next replies would not match.
    seed = next(s for s in range(100) if len(alone(PROMPTS[1], 1.0, s, LONG)) == LONG)
    stream = client.completions.create(
        model="k2jax-default",
        prompt=PROMPTS[1],
        max_tokens=LONG,
        temperature=1.0,
        seed=seed,
        stream=True,
    )
    for _, _chunk in zip(range(2), stream, strict=False):
        pass
    stream.close()
    time.sleep(1.0)
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda c: _complete(client, *c), cases[: len(PROMPTS)]))
    for (prompt, temperature, seed), reply in zip(cases, replies, strict=False):
        assert _token_ids(reply) == alone(prompt, temperature, seed), (prompt, temperature)
    metrics = urllib.request.urlopen(job["url"].removesuffix("/v1") + "/metrics").read().decode()
    assert "k2jax_running_requests 0.0" in metrics
    assert "k2jax_kv_pages_used 0.0" in metrics


def test_process_1_ends_when_process_0_stops(job):
    (leader, _), (follower, _) = job["procs"]
    leader.send_signal(signal.SIGINT)
    assert leader.wait(timeout=60) == 0, job["tail"](0)
    code = follower.wait(timeout=lockstep.HEARTBEAT_SECONDS * 4 + 30)
    assert code == 0, job["tail"](1)
    assert "following process 0" in job["tail"](1)
