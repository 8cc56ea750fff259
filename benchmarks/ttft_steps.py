"""Where turn 50's time-to-first-token goes: one prefill chunk step over a short and over a long
context, timed on the engine's own compiled programs.

Usage: ``python benchmarks/ttft_steps.py [--rounds 7]`` (prints a markdown table; ~1 minute).

The engine is ``benchmarks/serve.py``'s (the random default model, one slot, prefill chunks of
128 tokens, 1,025 pages of 16 tokens). Turn 1 of that benchmark's agent conversation prefills
580 tokens in 5 chunk steps at block-table widths of at most 64 pages; turn 50 prefills the 321
tokens the prefix cache does not hold in 3 chunk steps at width 1,024 pages, each attending over
the ~15,400 cached tokens. This script runs one 128-token chunk step of each kind on the
compiled step program (queries at positions 452..579, the last chunk of turn 1, and at
15,392..15,519 after turn 50's cached prefix; the pool's contents are whatever is there, which
does not change the work), alternating the two, and reports the median wall time of each over
the rounds. XLA's cost analysis cannot be used: on the CPU the attention is k2jax's kernel, a
custom call whose FLOPs XLA does not count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CHUNK = 128
CASES = {"turn 1, last chunk": (64, 452), "turn 50, each chunk": (1024, 15_392)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    import numpy as np

    from k2jax.default_model import FAST_COMPILE, default_model
    from k2jax.serving import sampling
    from k2jax.serving.options import EngineConfig
    from k2jax.serving.persistent_engine import PersistentEngine

    config = EngineConfig(
        max_batch=1, prefill_chunk=CHUNK, compiler_options=FAST_COMPILE, num_pages=1025
    )
    engine = PersistentEngine(default_model(), config, warmup=False)
    inner, sched = engine._engine, engine._scheduler
    greedy = sampling.BatchSampling.from_params([sampling.SamplingParams(temperature=0.0)])
    rng = np.random.default_rng(0)

    def run(width: int, start: int) -> float:
        inputs = (
            rng.integers(0, inner.cfg.vocab_size, (1, CHUNK)).astype(np.int32),
            np.arange(start, start + CHUNK, dtype=np.int32)[None],
            np.arange(1, width + 1, dtype=np.int32)[None],  # pages 1..width, in order
            np.asarray([CHUNK - 1], np.int32),
            np.asarray([True]),
            np.zeros((1,), np.int32),
        )
        program = engine._program(CHUNK, width)
        with inner._context():
            placed = inner._put((*inputs, greedy))
            started = time.perf_counter()
            sched.pages, sched.seen, out = program(inner.params, sched.pages, sched.seen, *placed)
            np.asarray(out)
        return time.perf_counter() - started

    for width, start in CASES.values():
        run(width, start)  # compile and warm
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, (width, start) in CASES.items():
            times[name].append(run(width, start))
    print(f"| chunk step (128 queries) | block-table width | median of {args.rounds} (ms) |")
    print("| --- | --- | --- |")
    medians = {}
    for name, (width, _) in CASES.items():
        medians[name] = statistics.median(times[name]) * 1e3
        print(f"| {name} | {width} pages | {medians[name]:.1f} |")
    long, short = medians["turn 50, each chunk"], medians["turn 1, last chunk"]
    print(f"\nlong / short step: {long / short:.1f}x; turn 50's 3 chunk steps: {3 * long:.0f} ms")
    engine.close()


if __name__ == "__main__":
    main()
