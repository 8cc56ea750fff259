"""Serving figures of the persistent engine on the default model (CPU): an agent conversation's
time-to-first-token per turn with and without the prefix cache, and throughput with 1, 8 and 32
concurrent clients.

Usage: ``python benchmarks/serve.py [--rounds 3] [--turns 50]`` (writes benchmarks/serve.md).

Agent rows: a conversation of ``--turns`` tool-call turns. Each turn renders the whole
conversation with K2's chat template (``k2jax.chat.render_text``: system prompt, two declared
tools, the user's task, every earlier assistant tool call with its reasoning and every tool
result) and encodes it as UTF-8 bytes, the default model's vocabulary. The engine generates 4
tokens of the next turn; the model is random, so the scripted assistant turn and tool result
are appended instead of its output. Measured per turn: prefill tokens the engine computed
(``stats().prefill_tokens_computed``) and the time from ``submit`` to the first token. With the
cache every turn runs (the cache builds up turn by turn); without it a turn's work does not
depend on earlier turns, so only the reported turns (1, 10, 25, 50) run.

Throughput rows: one engine with 32 slots; N client threads each send 4 requests one after the
other (a 96-byte prompt of its own, 32 new tokens, seeded sampling); tokens/s = all new tokens /
wall time, after warm-up.

How: every configuration runs in its own fresh process (``--worker``), the configurations
alternate in order from round to round, and the table gives the median over the rounds. The
processes share a JAX compilation cache directory so later ones load the step programs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 8, 32)
PROMPT_BYTES = 96
NEW_TOKENS = 32
REQUESTS_PER_CLIENT = 4
TTFT_TURNS = (1, 10, 25, 50)


def _setup_jax(cache_dir: str):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax


def _engine(model, prefix_cache: bool, max_batch: int):
    from k2jax.default_model import FAST_COMPILE
    from k2jax.serving.options import EngineConfig
    from k2jax.serving.persistent_engine import PersistentEngine

    config = EngineConfig(
        max_batch=max_batch, prefill_chunk=128, compiler_options=FAST_COMPILE, num_pages=1025
    )
    engine = PersistentEngine(model, config, prefix_cache=prefix_cache)  # warm-up compiles
    engine.start()
    return engine


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


def _conversation_turn(i: int) -> list[dict]:
    call_id = f"functions.read_file:{i}"
    return [
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": f"Part {i}.",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "read_file", "arguments": json.dumps({"path": f"f{i}"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": f"x{i} = {i * 7 % 97}"},
    ]


def agent_worker(prefix_cache: bool, turns: int) -> dict:
    from k2jax.chat import render_text
    from k2jax.default_model import default_model, encode_bytes
    from k2jax.serving.persistent_engine import EngineRequest
    from k2jax.serving.sampling import SamplingParams

    engine = _engine(default_model(), prefix_cache, max_batch=1)
    messages = [
        {"role": "system", "content": "You are a careful coding agent. Use the tools."},
        {"role": "user", "content": "Find the bug in the repository and fix it."},
    ]
    prompt_tokens, computed, ttft = [], [], []
    for turn in range(turns):
        if not prefix_cache and turn + 1 not in TTFT_TURNS:
            # Without the cache a turn's work does not depend on the turns before it: only
            # the reported turns run (the whole conversation re-prefilled each time).
            messages += _conversation_turn(turn)
            prompt_tokens.append(None)
            computed.append(None)
            ttft.append(None)
            continue
        prompt = tuple(encode_bytes(render_text(messages, TOOLS)))
        before = engine.stats().prefill_tokens_computed
        start = time.perf_counter()
        handle = engine.submit(EngineRequest(prompt, 4, SamplingParams(temperature=0.0), ()))
        handle.get()
        ttft.append(time.perf_counter() - start)
        list(handle)
        computed.append(engine.stats().prefill_tokens_computed - before)
        prompt_tokens.append(len(prompt))
        messages += _conversation_turn(turn)
    engine.close()
    return {"prompt_tokens": prompt_tokens, "computed": computed, "ttft": ttft}


def throughput_worker(clients: int) -> dict:
    import numpy as np

    from k2jax.default_model import default_model
    from k2jax.serving.persistent_engine import EngineRequest
    from k2jax.serving.sampling import SamplingParams

    engine = _engine(default_model(), True, max_batch=32)
    rng = np.random.default_rng(0)
    prompts = [
        [
            tuple(int(t) for t in rng.integers(0, 256, PROMPT_BYTES))
            for _ in range(REQUESTS_PER_CLIENT)
        ]
        for _ in range(clients)
    ]
    produced = [0] * clients

    def client(c: int) -> None:
        for i, prompt in enumerate(prompts[c]):
            sampling = SamplingParams(seed=c * 100 + i)
            request = EngineRequest(prompt, NEW_TOKENS, sampling, stop_token_ids=())
            produced[c] += sum(1 for _ in engine.submit(request))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    engine.close()
    return {"tokens": sum(produced), "seconds": elapsed, "tokens_per_s": sum(produced) / elapsed}


def _run_worker(args: list[str], cache_dir: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "K2JAX_SERVE_BENCH_CACHE": cache_dir}
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(xs):
    return statistics.median(xs)


def report(agent: dict[bool, list[dict]], throughput: dict[int, list[dict]], rounds: int) -> str:
    turns = len(agent[True][0]["ttft"])
    lines = [
        f"Default model (random, CPU), `python benchmarks/serve.py --rounds {rounds} "
        f"--turns {turns}`: each configuration in its own process, alternated, median of "
        f"{rounds} rounds.",
        "",
        "| agent turn | prompt tokens | prefill computed, no cache | prefill computed, cache "
        "| TTFT no cache (ms) | TTFT cache (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    shown = [t for t in TTFT_TURNS if t <= turns]
    for t in shown:
        i = t - 1
        lines.append(
            f"| {t} | {agent[True][0]['prompt_tokens'][i]} "
            f"| {agent[False][0]['computed'][i]} | {agent[True][0]['computed'][i]} "
            f"| {1000 * _median([r['ttft'][i] for r in agent[False]]):.1f} "
            f"| {1000 * _median([r['ttft'][i] for r in agent[True]]):.1f} |"
        )
    last = turns - 1
    for cache in (False, True):
        ratios = [r["ttft"][last] / r["ttft"][0] for r in agent[cache]]
        label = "with" if cache else "without"
        lines.append("")
        lines.append(
            f"TTFT turn {turns} / turn 1 {label} the prefix cache: "
            f"**{_median(ratios):.2f}x** (rounds {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    total_cached = sum(agent[True][0]["computed"])
    total_plain = sum(agent[True][0]["prompt_tokens"])  # without the cache: every prompt whole
    lines += [
        "",
        f"Prefill tokens computed over all {turns} turns: {total_plain} without the cache (every "
        f"prompt in full), {total_cached} with it ({total_plain / total_cached:.1f}x fewer).",
        "",
        f"| concurrent clients (32 slots, {REQUESTS_PER_CLIENT} requests each, {NEW_TOKENS} new "
        "tokens) | tokens/s (median) | rounds |",
        "| --- | --- | --- |",
    ]
    for c in CLIENTS:
        values = [r["tokens_per_s"] for r in throughput[c]]
        lines.append(f"| {c} | {_median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--worker", choices=["agent", "throughput"])
    parser.add_argument("--prefix-cache", choices=["on", "off"], default="on")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "serve.md"))
    args = parser.parse_args()
    if args.worker is not None:
        _setup_jax(os.environ["K2JAX_SERVE_BENCH_CACHE"])
        if args.worker == "agent":
            result = agent_worker(args.prefix_cache == "on", args.turns)
        else:
            result = throughput_worker(args.clients)
        print(json.dumps(result))
        return
    configs = [("agent", "off"), ("agent", "on"), *(("throughput", c) for c in CLIENTS)]
    agent: dict[bool, list[dict]] = {False: [], True: []}
    throughput: dict[int, list[dict]] = {c: [] for c in CLIENTS}
    with tempfile.TemporaryDirectory(prefix="k2jax-serve-bench-") as cache_dir:
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for kind, value in order:
                if kind == "agent":
                    worker = [
                        "--worker",
                        "agent",
                        "--prefix-cache",
                        value,
                        "--turns",
                        str(args.turns),
                    ]
                    agent[value == "on"].append(_run_worker(worker, cache_dir))
                else:
                    worker = ["--worker", "throughput", "--clients", str(value)]
                    throughput[value].append(_run_worker(worker, cache_dir))
                print(f"[serve] round {r + 1}: {kind} {value} done", file=sys.stderr, flush=True)
    table = report(agent, throughput, args.rounds)
    Path(args.out).write_text("# Serving benchmark\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
