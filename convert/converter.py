"""Streaming conversion of an HF K2-format checkpoint into a k2jax checkpoint.

The order of work, and why:

1. Validate everything first (``HFCheckpoint.validate``: every tensor present once, shapes,
   dtypes, missing or truncated shards): a bad checkpoint fails in seconds, before any output
   exists, not hours in.
2. Create ``OUT_DIR.partial`` with the full-size, empty arrays (``checkpoint_format``), the
   config and the tokenizer files.
3. One unit at a time (each layer, then the embeddings and head): read each tensor with plain
   positioned reads (not mmap, whose touched pages would count against the process), place it
   through the one name map (``hf_names``), write it into its slice of the stacked array, drop
   it. Host memory is about one tensor (the largest is the 2.3 GB embedding, plus its transposed
   lm_head copy) plus a bounded amount of writes in flight, whatever the number of layers. A
   unit's crc32s go to ``progress.jsonl`` only once all its writes have completed; that is what
   ``--resume`` trusts.
4. Re-open what was written and check it against the config (every array's shape, dtype and
   every chunk present); with ``verify`` re-read the source and compare every array bit for bit.
5. Write the manifest, last, then rename ``OUT_DIR.partial`` to ``OUT_DIR``. Until that rename
   nothing at ``OUT_DIR`` looks like a checkpoint; a crash or Ctrl-C leaves a resumable partial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import sys
import time
import zlib
from collections import deque

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import checkpoint_format as fmt
from convert import expert_formats, hf_names
from convert.hf_reader import CheckpointError, HFCheckpoint, cast_for_model, load_tensor
from k2jax import model as k2model

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
STATE = "state.json"
# The converter's mark on OUT_DIR.partial, written before anything else: only a folder carrying
# it is ever resumed or removed.
PARTIAL_MARKER = ".k2jax-convert-partial"
PROGRESS = "progress.jsonl"
HEAD = "head"
# Test hook: SIGKILL this process once N units have been committed in this run, right after
# the first write of the next unit (so a half-written unit is left behind, as in a real crash).
KILL_ENV = "K2JAX_CONVERT_TEST_KILL_AFTER_UNITS"
WRITE_BLOCK_BYTES = 256 << 20
IN_FLIGHT_BYTES = 512 << 20

_ST_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "I64": np.int64,
    "I8": np.int8,
    "U8": np.uint8,
    expert_formats.FP8_DTYPE: ml_dtypes.float8_e4m3fn,
}


class ConvertError(RuntimeError):
    """The conversion cannot start or finish as asked (output exists, resume mismatch...)."""


@dataclasses.dataclass
class Summary:
    out_dir: str
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    units_done: int
    units_skipped: int

    def __str__(self) -> str:
        gb = 1e9
        rate = self.bytes_read / max(self.seconds, 1e-9) / 1e6
        return (
            f"converted into {self.out_dir}: {self.units_done} units written, "
            f"{self.units_skipped} resumed; read {self.bytes_read / gb:.3f} GB, wrote "
            f"{self.bytes_written / gb:.3f} GB in {self.seconds:.1f} s ({rate:.0f} MB/s); "
            f"peak host RSS {self.peak_rss_bytes / gb:.3f} GB"
        )


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so
    a converter started from a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Shard:
    """One safetensors file, read with positioned reads into fresh buffers (no mmap)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.fd = os.open(path, os.O_RDONLY)

    def offset(self, name: str) -> int:
        return self.header[name]["data_offsets"][0]

    def read(self, name: str) -> np.ndarray:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        buf = np.empty(end - begin, np.uint8)
        view, pos = memoryview(buf), 0
        while pos < len(buf):
            got = os.preadv(self.fd, [view[pos:]], self.data_start + begin + pos)
            if got <= 0:
                raise CheckpointError(f"tensor {name!r} in {self.path}: file ends early")
            pos += got
        return buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        os.close(self.fd)


class _Source:
    """The validated HF checkpoint's shards, opened lazily."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self._shards: dict[str, _Shard] = {}

    def read(self, name: str) -> np.ndarray:
        return self.shard(name).read(name)

    def shard(self, name: str) -> _Shard:
        file = self.ckpt.weight_map[name]
        if file not in self._shards:
            self._shards[file] = _Shard(os.path.join(self.ckpt.path, file))
        return self._shards[file]

    def ordered(self, specs: list[hf_names.TensorSpec]) -> list[hf_names.TensorSpec]:
        """Specs in file order, so each shard is read front to back."""
        return sorted(
            specs,
            key=lambda s: (
                self.ckpt.weight_map[s.hf_name],
                self.shard(s.hf_name).offset(s.hf_name),
            ),
        )

    def placements(self, spec: hf_names.TensorSpec, dtype):
        """(param path, index into the stored array, value) for one HF tensor."""
        # FP8 weights are dequantized (or kept, for FP8 experts) by the reader's one decoder.
        array = load_tensor(self.ckpt, spec.hf_name, self.read, fp8_raw=spec.fp8_raw)
        try:
            placed = spec.place(array)
        except ValueError as e:
            raise CheckpointError(
                f"{spec.hf_name} in {self.ckpt.weight_map[spec.hf_name]}: {e}"
            ) from None
        for path, value in placed:
            if spec.stack is None:
                full, index = path, ()
            else:
                full = (spec.stack, *path)
                index = (spec.layer,) if spec.expert is None else (spec.layer, spec.expert)
            yield full, index, np.ascontiguousarray(cast_for_model(value, path, dtype))

    def close(self) -> None:
        for s in self._shards.values():
            s.close()
        self._shards.clear()


def units(cfg, experts: str | None = None) -> list[tuple[str, list[hf_names.TensorSpec]]]:
    """The work in order: every layer, then the embeddings and head (the last shard in K2)."""
    out = [(f"layer_{i:03d}", hf_names.layer_specs(cfg, i, experts)) for i in range(cfg.num_layers)]
    out.append((HEAD, hf_names.head_specs(cfg)))
    return out


def _crc(value: np.ndarray, crc: int) -> int:
    return zlib.crc32(value.reshape(-1).view(np.uint8), crc)


class _Writer:
    """Asynchronous tensorstore writes with a bound on the bytes in flight."""

    def __init__(self):
        self.pending: deque = deque()
        self.in_flight = 0
        self.written = 0

    def write(self, array, index: tuple[int, ...], value: np.ndarray, chunks) -> None:
        if tuple(array[index].shape) != value.shape:
            raise ConvertError(f"placing {value.shape} into {tuple(array[index].shape)}")
        # Split along the value's first axis at chunk boundaries, so a 2 GB embedding is not
        # copied whole into tensorstore's buffers.
        axis_chunk = chunks[len(index)] if value.ndim else 1
        row_bytes = value[0].nbytes if value.ndim else value.nbytes
        rows = max(1, WRITE_BLOCK_BYTES // max(row_bytes, 1) // axis_chunk) * axis_chunk
        n = value.shape[0] if value.ndim else 1
        for start in range(0, n, rows):
            block = value[start : start + rows] if value.ndim else value
            target = (
                array[(*index, slice(start, start + block.shape[0]))]
                if value.ndim
                else (array[index])
            )
            self.pending.append((target.write(block), block.nbytes, block))
            self.in_flight += block.nbytes
            while self.in_flight > IN_FLIGHT_BYTES:
                self._retire()

    def _retire(self) -> None:
        future, nbytes, _ = self.pending.popleft()
        future.result()
        self.in_flight -= nbytes
        self.written += nbytes

    def flush(self) -> None:
        while self.pending:
            self._retire()


def _fingerprint(ckpt: HFCheckpoint, dtype: str, experts: str = "int4") -> dict:
    """What a resumed conversion must find unchanged: source files, config, index, dtype and
    expert format."""

    def sha(name: str) -> str | None:
        p = os.path.join(ckpt.path, name)
        if not os.path.isfile(p):
            return None
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    out = {
        "format_version": fmt.VERSION,
        "dtype": dtype,
        "config_sha256": sha("config.json"),
        "index_sha256": sha("model.safetensors.index.json"),
        "files": {f: os.path.getsize(os.path.join(ckpt.path, f)) for f in ckpt.files},
    }
    if experts != "int4":  # absent for INT4, so partials of earlier versions still resume
        out["experts"] = experts
    return out


def _read_progress(partial: str) -> dict[str, dict[str, int]]:
    done = {}
    path = os.path.join(partial, PROGRESS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line: that unit is redone
                done[entry["unit"]] = entry["crc32"]
    return done


def _append_progress(partial: str, unit: str, crcs: dict[str, int]) -> None:
    with open(os.path.join(partial, PROGRESS), "a", encoding="utf-8") as f:
        f.write(json.dumps({"unit": unit, "crc32": crcs}, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved, symlinks followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_output_location(out: str, partial: str, source: str) -> None:
    """Refuse outputs that overlap the source: replacing them would delete the checkpoint."""
    for target in (out, partial):
        if _inside(source, target):
            what = "is" if os.path.realpath(source) == os.path.realpath(target) else "contains"
            raise ConvertError(
                f"{target} {what} the source checkpoint {source}: choose an output directory "
                "outside it (the converter never writes over its source)"
            )
        if _inside(target, source):
            raise ConvertError(
                f"{target} lies inside the source checkpoint {source}: choose an output "
                "directory outside it (the converter never writes into its source)"
            )


def _owned_partial(partial: str) -> bool:
    return os.path.isfile(os.path.join(partial, PARTIAL_MARKER))


def _prepare_output(
    out: str,
    partial: str,
    ckpt: HFCheckpoint,
    fp: dict,
    resume: bool,
    force: bool,
    abstract: dict,
    say,
) -> dict:
    """Decide between a fresh start and a resume; return the array info for the manifest.

    Nothing the converter did not write is ever removed: ``--force`` replaces only a finished
    k2jax checkpoint or an empty directory at ``out``, and only a partial output carrying the
    converter's marker is resumed or restarted.
    """
    _check_output_location(out, partial, ckpt.path)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise ConvertError(f"{out} exists and is not a directory: choose another OUT_DIR")
        if fmt.is_converted_checkpoint(out):
            if not force:
                raise ConvertError(
                    f"{out} already exists (a finished k2jax checkpoint); pass --force to "
                    "replace it"
                )
        elif os.listdir(out):
            raise ConvertError(
                f"{out} already exists and is not a k2jax checkpoint (no {fmt.MANIFEST}): the "
                "converter replaces only its own output; move it away or choose another OUT_DIR"
            )
    state_path = os.path.join(partial, STATE)
    if os.path.lexists(partial):
        if not _owned_partial(partial):
            raise ConvertError(
                f"{partial} exists but was not written by k2jax-convert (no {PARTIAL_MARKER}): "
                "move it away or choose another OUT_DIR; nothing was changed"
            )
        if resume and os.path.isfile(state_path):
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
            if state["fingerprint"] != fp and not force:
                raise ConvertError(
                    f"{partial} was started from a different source or --dtype (or --experts); "
                    "pass --force to start over"
                )
            if state["fingerprint"] == fp:
                say(f"resuming the conversion in {partial}")
                return {tuple(k.split(".")): v for k, v in state["arrays"].items()}
        if not resume and not force:
            raise ConvertError(
                f"{partial} holds an interrupted conversion: pass --resume to continue it or "
                "--force to start over"
            )
        shutil.rmtree(partial)  # ours: --force, or set-up itself was interrupted (cheap to redo)
    os.makedirs(partial)
    # Written first: whatever else is interrupted, this folder is known to be ours.
    fmt.write_json_atomic(os.path.join(partial, PARTIAL_MARKER), {"written_by": "k2jax-convert"})
    for name in fmt.SIDE_FILES:
        src = os.path.join(ckpt.path, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(partial, name))
    info = fmt.create_params(os.path.join(partial, fmt.PARAMS_DIR), abstract)
    # Written last: a partial without it is an interrupted set-up, which a resume redoes.
    fmt.write_json_atomic(
        state_path,
        {"fingerprint": fp, "arrays": {fmt.leaf_name(p): v for p, v in info.items()}},
    )
    return info


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    resume: bool = False,
    force: bool = False,
    verify: bool = False,
    quiet: bool = False,
    experts: str | None = None,
) -> Summary:
    """Convert the HF K2-format checkpoint at ``hf_dir`` into a k2jax checkpoint at ``out_dir``.

    ``dtype`` is the storage dtype of the dense (non-expert) float weights (FP8 ones are
    dequantized to it); INT4 expert words and scales and the router bias are stored as on disk.
    ``experts`` is the routed experts' format (``convert.expert_formats``: ``"int4"``, ``"fp8"``
    or ``"bf16"``; None keeps the checkpoint's own). Raises ``CheckpointError`` for a bad
    source (before writing anything) and ``ConvertError`` for an output it will not touch.
    """
    start = time.monotonic()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported (use one of {list(DTYPES)})")
    np_dtype = np.dtype(DTYPES[dtype])
    out = os.path.abspath(os.fspath(out_dir))
    partial = out + ".partial"
    ckpt = HFCheckpoint(hf_dir)
    try:
        experts = expert_formats.resolve(ckpt.config, experts)
    except ValueError as e:
        raise ConvertError(f"--experts: {e}") from None
    ckpt.validate(hf_names.all_specs(ckpt.config, experts))
    cfg = ckpt.config
    layout = expert_formats.STORAGE_LAYOUT[experts]
    abstract = k2model.abstract_params(cfg, np_dtype, layout)
    fp = _fingerprint(ckpt, dtype, experts)
    info = _prepare_output(out, partial, ckpt, fp, resume, force, abstract, say)
    params_dir = os.path.join(partial, fmt.PARAMS_DIR)
    arrays = fmt.open_params(params_dir, info)
    done = _read_progress(partial)

    work = units(cfg, experts)
    total = sum(ckpt.nbytes(s.hf_name) for _, specs in work for s in specs)
    skipped = sum(ckpt.nbytes(s.hf_name) for name, specs in work if name in done for s in specs)
    kill_after = os.environ.get(KILL_ENV)
    kill_after = int(kill_after) if kill_after else None
    source = _Source(ckpt)
    writer = _Writer()
    bytes_read, units_done = 0, 0
    bar = tqdm(
        total=total,
        initial=skipped,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="converting",
        disable=quiet,
        smoothing=0.1,
        dynamic_ncols=True,
    )
    try:
        for name, specs in work:
            if name in done:
                continue
            crcs: dict[str, int] = {}
            for spec in source.ordered(specs):
                for path, index, value in source.placements(spec, np_dtype):
                    key = fmt.leaf_name(path)
                    if value.dtype != np.dtype(info[path]["dtype"]):
                        raise ConvertError(
                            f"{key}: placing {value.dtype}, stored as {info[path]['dtype']}"
                        )
                    writer.write(arrays[path], index, value, info[path]["chunks"])
                    crcs[key] = _crc(value, crcs.get(key, 0))
                nbytes = ckpt.nbytes(spec.hf_name)
                bytes_read += nbytes
                bar.update(nbytes)
                if kill_after is not None and units_done == kill_after:
                    writer.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            writer.flush()
            _append_progress(partial, name, crcs)
            done[name] = crcs
            units_done += 1
    finally:
        bar.close()
        source.close()

    say("checking the written arrays against the config")
    _check_written(params_dir, info, abstract)
    if verify:
        say("--verify: re-reading the source and comparing every array")
        verify_against_source(ckpt, partial, np_dtype, quiet, experts)
    manifest = _manifest(cfg, info, done, fp, dtype, experts)
    # The resume bookkeeping goes before the manifest: a finished checkpoint carries only the
    # manifest, whose crc32s already hold what progress.jsonl recorded.
    for name in (PROGRESS, STATE, PARTIAL_MARKER):
        if os.path.exists(os.path.join(partial, name)):
            os.remove(os.path.join(partial, name))
    fmt.write_json_atomic(os.path.join(partial, fmt.MANIFEST), manifest)
    if os.path.exists(out):  # --force over a finished k2jax checkpoint, or an empty directory
        old = f"{out}.old-{os.getpid()}"  # a fresh name: nothing of the user's is removed
        if os.path.lexists(old):
            raise ConvertError(f"{old} exists: move it away and rerun with --resume")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    fmt.fsync_dir(os.path.dirname(os.path.abspath(out)))  # the rename itself survives power loss
    written = sum(
        int(np.prod(v["shape"])) * np.dtype(_np_name(v["dtype"])).itemsize for v in info.values()
    )
    summary = Summary(
        out,
        bytes_read,
        written,
        time.monotonic() - start,
        peak_rss_bytes(),
        units_done,
        len(work) - units_done,
    )
    say(str(summary))
    return summary


def _np_name(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else name


def _manifest(cfg, info, done, fp, dtype, experts="int4") -> dict:
    arrays = {}
    for path, v in info.items():
        key = fmt.leaf_name(path)
        if fmt.is_stacked(path):
            names = [
                f"layer_{i:03d}"
                for i in range(cfg.num_layers)
                if hf_names.stack_position(cfg, i)[0] == path[0]
            ]
        else:
            names = [HEAD]
        arrays[key] = {**v, "crc32": [done[n].get(key, 0) for n in names]}
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "finished": True,
        "dtype": dtype,
        "experts": experts,
        "source": fp,
        "arrays": arrays,
    }


def _check_written(params_dir: str, info: dict, abstract: dict) -> None:
    """Re-open every array: the tree, shapes and dtypes the config implies, every chunk on disk."""
    want = fmt.flat_leaves(abstract)
    if set(want) != set(info):
        raise ConvertError(f"{params_dir}: the written tree differs from the config's")
    reopened = fmt.open_params(params_dir, info)
    for path, arr in reopened.items():
        key = fmt.leaf_name(path)
        if tuple(arr.shape) != tuple(want[path].shape):
            raise ConvertError(f"{key}: written shape {arr.shape}, expected {want[path].shape}")
        if np.dtype(arr.dtype.numpy_dtype) != np.dtype(want[path].dtype):
            raise ConvertError(f"{key}: written dtype {arr.dtype}, expected {want[path].dtype}")
        have = fmt.count_chunks(params_dir, path)
        expect = fmt.expected_chunks(info[path]["shape"], info[path]["chunks"])
        if have != expect:
            raise ConvertError(f"{key}: {have} of {expect} chunks on disk: a write was lost")


def verify_against_source(
    ckpt: HFCheckpoint, out: str, np_dtype, quiet: bool = True, experts: str | None = None
) -> int:
    """Re-read every source tensor, place it, and compare bit for bit with the stored array.

    Returns the number of arrays compared; raises ``ConvertError`` naming the tensor on the
    first difference. ``out`` is a converted (or partial) checkpoint directory.
    """
    params_dir = os.path.join(out, fmt.PARAMS_DIR)
    experts = expert_formats.resolve(ckpt.config, experts)
    layout = expert_formats.STORAGE_LAYOUT[experts]
    paths = fmt.flat_leaves(k2model.abstract_params(ckpt.config, np_dtype, layout))
    arrays = fmt.open_params(params_dir, paths)
    source = _Source(ckpt)
    work = units(ckpt.config, experts)
    total = sum(ckpt.nbytes(s.hf_name) for _, specs in work for s in specs)
    compared = 0
    try:
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="verifying",
            disable=quiet,
        ) as bar:
            for _, specs in work:
                for spec in source.ordered(specs):
                    for path, index, value in source.placements(spec, np_dtype):
                        stored = arrays[path][index].read().result()
                        if (
                            stored.dtype != value.dtype
                            or stored.shape != value.shape
                            or not (
                                np.array_equal(
                                    stored.reshape(-1).view(np.uint8),
                                    value.reshape(-1).view(np.uint8),
                                )
                            )
                        ):
                            raise ConvertError(
                                f"--verify: {fmt.leaf_name(path)}{list(index)} differs from "
                                f"{spec.hf_name} in {ckpt.weight_map[spec.hf_name]}"
                            )
                        compared += 1
                    bar.update(ckpt.nbytes(spec.hf_name))
    finally:
        source.close()
    return compared
