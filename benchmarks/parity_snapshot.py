"""Snapshot the parity configs' outputs, to show a refactor changes nothing bit for bit.

    python benchmarks/parity_snapshot.py save REPO OUT.npz   # run against a checkout REPO
    python benchmarks/parity_snapshot.py compare A.npz B.npz  # every array bit-identical?

``save`` loads the four parity configs of REPO/tests/reference.py from REPO itself (so an
older worktree, with ``../shared`` beside it, snapshots the older code) and records float32 and
bfloat16 prefill logits, greedy ids and seeded samples. ``compare`` prints each array's verdict
and exits 1 if any differs. Used for the wings restructure: 59301ac against c37133b.
"""

from __future__ import annotations

import os
import sys
import tempfile


def save(repo: str, out: str) -> None:
    sys.path[:0] = [os.path.join(repo, "tests"), repo]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import reference

    import k2jax

    res = {}
    for name in sorted(reference.PARITY_CONFIGS):
        ref = reference.build(seed=len(name), **reference.PARITY_CONFIGS[name])
        with tempfile.TemporaryDirectory() as d:
            path = reference.write_checkpoint(ref, d)
            model = k2jax.load(path, dtype="float32")
            tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 24))
            prompts = tokens[:, :8].tolist()
            res[f"{name}/logits"] = model.logits(tokens)
            res[f"{name}/greedy"] = np.array(
                model.generate(prompts, 12, temperature=0.0, stop_token_ids=[])
            )
            res[f"{name}/sampled"] = np.array(
                model.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
            )
            res[f"{name}/bf16logits"] = k2jax.load(path, dtype="bfloat16").logits(tokens)
    np.savez(out, **res)


def compare(a: str, b: str) -> int:
    import numpy as np

    old, new = np.load(a), np.load(b)
    if sorted(old) != sorted(new):
        print(f"different arrays: {sorted(old)} vs {sorted(new)}")
        return 1
    differ = 0
    for key in sorted(old):
        same = np.array_equal(old[key], new[key])
        differ += not same
        print(f"{key}: {'bit-identical' if same else 'DIFFERENT'}")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        save(sys.argv[2], sys.argv[3])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
