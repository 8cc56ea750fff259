"""Decode speed of the k2jax engine on this machine, against transformers on the same weights.

    python benchmarks/decode.py              # the full table (about 15 minutes on 2 cores)
    python benchmarks/decode.py --quick      # smaller model, fewer rounds
    python benchmarks/decode.py --rounds 5   # more alternating rounds for the tokens/s rows

A mid-size K2-structured model (hidden 1024, 8 layers = 1 dense + 7 MoE, 64 experts top-8,
INT4 group-32 experts, MLA with K2's head dims, YaRN) is built once by tests/reference.py and
written twice: as the K2-format checkpoint k2jax loads (experts stay packed INT4; k2jax's
default dtype "auto" runs the dense weights in float32 on a CPU, since XLA's bf16 dot is ~20x
slower there) and as transformers' own float32 checkpoint with the experts dequantized, which
is what a CPU user of transformers gets.

Each side runs in its own fresh interpreter, one per round, the two alternating (k2jax first in
even rounds, transformers first in odd ones): a JAX process slows torch in the same process
about 3x, and these shared cores drift, so neither side may share a process or a time slot with
the other. The transformers process imports torch and transformers only. The tokens/s rows are
the median over the rounds, and the ratio is the ratio of the medians (each round's ratio is
printed too). Both sides count only tokens after the first (prefill excluded).

The other rows run in one more k2jax process:

- routed experts of one layer at decode shapes: INT4 packed through the CPU kernel (the
  default, k2jax.kernels.int4_cpu) and through the jnp formulation (``words_tiled``), vs the
  same experts in bf16 and float32 (``k2jax.model.expert_matmul.routed_experts``);
- decode step time with 32 vs 256 experts at top-8 (random weights, same everything else);
- decode step time at context 1K, 8K, 32K (batch 1; a synthetic filled cache, since the step's
  cost does not depend on the cached values).

Prints a markdown table; writes benchmarks/decode.png if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
BATCHES = (1, 8)
CONTEXT = 512

MID = {
    "vocab_size": 32768,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 512,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 65536,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
}
QUICK = {
    **MID,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "vocab_size": 4096,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
}


def hf_decode_tps(torch_model, batch: int, context: int, new: int) -> float:
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, torch_model.config.vocab_size, (batch, context)))

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            torch_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t

    run(2)
    return batch * (new - 1) / (run(new) - run(1))


def transformers_worker(hf_dir: str, new: int) -> dict:
    """Decode tokens/s per batch of transformers' float32 model, in this process (torch only)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return {str(b): hf_decode_tps(model, b, CONTEXT, new) for b in BATCHES}


def _run(args: list[str]) -> dict:
    """One fresh interpreter; its last stdout line is its JSON result."""
    out = subprocess.run(
        [sys.executable, *args], check=True, capture_output=True, text=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_checkpoints(quick: bool, root: str) -> tuple[str, str]:
    """The K2-format checkpoint (k2jax's input) and transformers' own float32 checkpoint."""
    sys.path.insert(0, TESTS)
    import reference

    ref = reference.build(seed=0, **(QUICK if quick else MID))
    k2_dir = reference.write_checkpoint(ref, os.path.join(root, "k2"))
    hf_dir = os.path.join(root, "hf")
    ref.torch_model.save_pretrained(hf_dir)
    return k2_dir, hf_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, two rounds")
    ap.add_argument("--new", type=int, default=17, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--worker", choices=("transformers",), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(args.hf_dir, args.new)))
        return
    rounds = args.rounds or (2 if args.quick else 3)
    env_quick = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        k2_dir, hf_dir = build_checkpoints(args.quick, root)
        print(f"built the model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        ours_cmd = [os.path.join(HERE, "decode_k2jax.py"), "--checkpoint", k2_dir]
        theirs_cmd = [os.path.abspath(__file__), "--worker", "transformers", "--hf-dir", hf_dir]
        ours: list[dict] = []
        theirs: list[dict] = []
        for r in range(rounds):
            sides = [("k2jax", ours), ("transformers", theirs)]
            if args.skip_hf:
                sides = sides[:1]
            for side, results in sides if r % 2 == 0 else sides[::-1]:
                extra = ["--part", "tokens"] if side == "k2jax" else []
                cmd = (ours_cmd if side == "k2jax" else theirs_cmd) + extra
                results.append(_run([*cmd, "--new", str(args.new)]))
                print(f"round {r + 1} {side}: {results[-1]}", file=sys.stderr, flush=True)
        extras = _run([*ours_cmd, "--part", "extras", *env_quick])

    rows: list[tuple[str, str]] = []
    for b in map(str, BATCHES):
        mine = statistics.median(res[b] for res in ours)
        rows.append(
            (f"k2jax decode tokens/s, batch {b}, context {CONTEXT} (median)", f"{mine:.1f}")
        )
        if not theirs:
            continue
        hf = statistics.median(res[b] for res in theirs)
        per_round = ", ".join(f"{o[b] / h[b]:.2f}" for o, h in zip(ours, theirs, strict=True))
        rows.append((f"transformers decode tokens/s, batch {b} (median)", f"{hf:.1f}"))
        rows.append((f"k2jax / transformers, batch {b}", f"{mine / hf:.2f}x (rounds: {per_round})"))
    rows += [tuple(row) for row in extras["rows"]]
    print(f"\n{rounds} rounds, each side in its own process, alternating")
    print("\n| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    plot({int(c): s for c, s in extras["contexts"].items()})


def plot(times: dict[int, float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(times), [s * 1e3 for s in times.values()], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms), batch 1")
    ax.set_title("k2jax decode step vs context")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "decode.png"), dpi=120)


if __name__ == "__main__":
    main()
