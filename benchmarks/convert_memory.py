"""Peak host memory and throughput of the converter on a synthetic K2-format checkpoint.

Builds a checkpoint in K2 Thinking's on-disk format (compressed-tensors pack-quantized INT4
routed experts, bf16 everything else, float32 router bias; one shard for the dense layer, one
per MoE layer, one for embeddings and head, plus the index), then runs ``python -m convert`` on
it in a subprocess while a thread samples the child's ``VmHWM``/``VmRSS`` from /proc. Prints
peak RSS, the largest shard and MB/s, and checks the target: peak RSS <= largest shard + 1.5 GB.

Weights are random. The INT4 payload is uniformly random int32 words: every 32-bit word is a
valid pack-quantized encoding of 8 nibbles, i.e. of 8 uniform INT4 values in [-8, 7] (checked
below by round-tripping a sample through ``k2jax.kernels.int4_format.unpack_int4`` and
``k2jax.kernels.int4_format.pack_int4_numpy``); packing gigabytes through compressed-tensors would
take far
longer on a 2-core machine and the converter never looks at the values. Scales are random
positive bf16, ``weight_shape`` is int64 as compressed-tensors writes it.

    python benchmarks/convert_memory.py [--layers 25] [--experts 96] [--vocab 32768] [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GB = 1e9
_ST = {
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float32): "F32",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def config_dict(layers: int, experts: int, vocab: int = 32768) -> dict:
    """A K2 Thinking config.json (INT4 experts) with small dims and ``layers`` layers."""
    from k2jax.model.config import Config, int4_quantization_config

    base = {
        "vocab_size": vocab,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "n_routed_experts": experts,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "rope_theta": 50000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "quantization_config": int4_quantization_config(32),
    }
    # Round-trip through Config so the file is exactly what k2jax itself would write.
    return Config.from_hf(base).to_hf()


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, object]]):
    """Stream a safetensors file: header first, then each tensor made by its callable, so the
    generator holds one tensor at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype, make in tensors:
            a = np.ascontiguousarray(make(), dtype=dtype)
            assert a.shape == tuple(shape), name
            f.write(a.tobytes())
    return offset + 8 + len(blob)


def build(
    out: str, layers: int, experts: int, vocab: int = 32768, seed: int = 0
) -> tuple[int, int]:
    """Write the checkpoint; returns (total bytes, largest shard bytes)."""
    from convert import hf_names
    from k2jax.model.config import Config

    raw = config_dict(layers, experts, vocab)
    cfg = Config.from_hf(raw)
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)

    def make(spec: hf_names.TensorSpec):
        shape, dt = spec.shape, spec.dtypes[0]
        if spec.hf_name.endswith("weight_shape"):
            o, i = _logical_shape(cfg, spec.hf_name)
            return lambda: np.array([o, i], np.int64), np.int64
        if dt == "I32":
            return lambda: rng.integers(-(2**31), 2**31, size=shape, dtype=np.int32), np.int32
        if spec.hf_name.endswith("weight_scale"):
            return lambda: rng.uniform(1e-3, 2e-2, size=shape).astype(ml_dtypes.bfloat16), (
                ml_dtypes.bfloat16
            )
        if spec.hf_name.endswith("e_score_correction_bias"):
            return lambda: rng.normal(0, 0.05, size=shape).astype(np.float32), np.float32
        fan_in = shape[-1]
        return lambda: (rng.standard_normal(size=shape, dtype=np.float32) / fan_in**0.5).astype(
            ml_dtypes.bfloat16
        ), ml_dtypes.bfloat16

    n_shards = cfg.num_moe_layers + 2
    groups = [list(range(cfg.num_dense_layers))] + [
        [i] for i in range(cfg.num_dense_layers, cfg.num_layers)
    ]
    weight_map, sizes = {}, []
    for k, group in enumerate([*groups, None]):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        specs = (
            hf_names.head_specs(cfg)
            if group is None
            else [s for layer in group for s in hf_names.layer_specs(cfg, layer)]
        )
        entries = []
        for s in specs:
            fn, dt = make(s)
            entries.append((s.hf_name, s.shape, dt, fn))
            weight_map[s.hf_name] = shard
        sizes.append(write_safetensors(os.path.join(out, shard), entries))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    return sum(sizes), max(sizes)


def _logical_shape(cfg, name: str) -> tuple[int, int]:
    d, m = cfg.hidden_size, cfg.moe_intermediate_size
    return (d, m) if ".down_proj." in name else (m, d)


def check_packing_sample(seed: int = 1) -> None:
    """Random int32 words are a valid packing: unpack then repack gives the same words."""
    import jax.numpy as jnp

    from k2jax.kernels.int4_format import pack_int4_numpy, unpack_int4

    words = np.random.default_rng(seed).integers(-(2**31), 2**31, size=(64, 128), dtype=np.int32)
    values = np.asarray(unpack_int4(jnp.asarray(words)))
    assert values.min() >= -8 and values.max() <= 7
    assert np.array_equal(pack_int4_numpy(values), words)


class RssSampler(threading.Thread):
    """Samples a process's VmHWM (the kernel's own peak RSS) and VmRSS every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith(("VmHWM:", "VmRSS:")):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=25, help="1 dense + (layers-1) MoE layers")
    p.add_argument("--experts", type=int, default=96)
    p.add_argument(
        "--vocab", type=int, default=32768, help="a large vocab makes the head shard the largest"
    )
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--verify", action="store_true", help="also run the converter's --verify")
    args = p.parse_args()

    check_packing_sample()
    scratch = args.dir or tempfile.mkdtemp(prefix="k2jax_convert_bench_")
    src, dst = os.path.join(scratch, "hf"), os.path.join(scratch, "k2jax")
    try:
        t0 = time.monotonic()
        total, largest = build(src, args.layers, args.experts, args.vocab)
        print(
            f"built {total / GB:.2f} GB in {args.layers} layers ({len(os.listdir(src)) - 2} "
            f"shards, largest {largest / GB:.3f} GB) in {time.monotonic() - t0:.0f} s"
        )
        cmd = [sys.executable, "-m", "convert", src, dst]
        if args.verify:
            cmd.append("--verify")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        _, err = proc.communicate()
        seconds = time.monotonic() - t0
        sampler.running = False
        sampler.join()
        if proc.returncode:
            print(err, file=sys.stderr)
            return proc.returncode
        summary = [line for line in err.splitlines() if line.startswith("converted into")]
        print(summary[-1] if summary else err[-2000:])
        out_bytes = sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs
        )
        peak, target = sampler.peak, largest + 1.5 * GB
        print(f"source             {total / GB:8.3f} GB")
        print(f"largest shard      {largest / GB:8.3f} GB")
        print(f"output on disk     {out_bytes / GB:8.3f} GB")
        print(
            f"wall time          {seconds:8.1f} s (process start, validation, conversion"
            f"{', verify' if args.verify else ''})"
        )
        print(f"throughput         {total / seconds / 1e6:8.1f} MB/s of source")
        print(
            f"peak RSS           {peak / GB:8.3f} GB (target <= {target / GB:.3f} GB: "
            f"{'met' if peak <= target else 'MISSED'})"
        )
        return 0 if peak <= target else 1
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
