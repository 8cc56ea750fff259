"""The on-disk layout of a converted k2jax checkpoint, and how it is written and restored.

A converted checkpoint is a directory::

    OUT_DIR/
      config.json                      the HF config, byte for byte
      tiktoken.model, tokenizer_config.json, chat_template.jinja, generation_config.json
                                       (those the HF directory has; never any .py file)
      params/                          an orbax PyTree checkpoint (zarr3 arrays, no OCDBT):
        _METADATA, _CHECKPOINT_METADATA  written by orbax itself
        moe_layers.moe.experts.gate_packed/zarr.json + c/...   one zarr3 array per param leaf
        ...
      k2jax_checkpoint.json            the manifest, written LAST: format version, dtype, every
                                       array's shape/dtype/chunks and crc32s per layer

Why this layout. Every leaf of the params tree (stacked [L, ...] layers, [L, E, ...] experts)
is ONE full-size zarr3 array that the converter creates empty and fills slice by slice through
tensorstore: a layer's tensors, even a single expert's, are written the moment they are read and
placed, so the converter holds about one tensor in memory, not one layer or one shard. Chunks
are cut so that every write covers whole chunks (one layer, one expert: no read-modify-write)
and no chunk exceeds ``CHUNK_BYTES``, so a device restoring its shard of an expert- or
tensor-sharded array reads little more than its own bytes. The directory is an ordinary orbax
checkpoint: orbax writes ``_METADATA`` (from a placeholder tree of the same structure, so the
file follows whatever orbax version is installed) and ``k2jax.load`` restores it with orbax,
each array straight into its target sharding, per device shard, with orbax's own bound on host
memory. Saving whole layers through orbax instead was measured to take about twice the saved
bytes of extra host memory, and one orbax checkpoint per layer would need the layers stacked
again on device at load time.

Arrays are stored uncompressed (the zarr3 ``bytes`` codec): INT4 words barely compress, and the
converter should run at disk speed. Chunks that equal the fill value are stored anyway, so a
chunk missing on disk always means a write that never happened (post-write check).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class _ExpectedOrbaxNotice(logging.Filter):
    """Drops orbax's "Skipping merge of OCDBT checkpoints" warning: ``create_params`` saves
    with ``use_ocdbt=False`` (plain zarr3 arrays the converter then fills), so there is never an
    OCDBT checkpoint to merge, yet orbax warns so on every conversion."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


logging.getLogger("absl").addFilter(_ExpectedOrbaxNotice())

FORMAT = "k2jax-checkpoint"
VERSION = 2  # 2: w_k_up / w_v_up head-major [N, H|U, C] (1 had [C, N, H|U])
MANIFEST = "k2jax_checkpoint.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 32 << 20
# orbax reads at most this many GB from disk into host buffers at once while restoring; this,
# not the model size, bounds the loader's host memory (orbax's own default is larger).
RESTORE_CONCURRENT_GB = 16
# Copied from the HF directory when present. An allowlist, not a denylist: nothing else (in
# particular no modeling_*.py / tokenization_*.py) ever reaches the converted checkpoint.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tiktoken.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class FormatError(ValueError):
    """A directory is not a finished k2jax checkpoint of a format this version reads."""


def leaf_name(path: tuple[str, ...]) -> str:
    """The param path as orbax names the leaf's directory (keys joined by dots)."""
    return ".".join(path)


def flat_leaves(tree: dict) -> dict[tuple[str, ...], Any]:
    """{param path: leaf} for a nested dict of params."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def is_stacked(path: tuple[str, ...]) -> bool:
    return path[0] in ("dense_layers", "moe_layers")


def is_expert(path: tuple[str, ...]) -> bool:
    return len(path) > 2 and path[-2] == "experts"


def chunk_shape(path: tuple[str, ...], shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks every converter write covers whole, of at most CHUNK_BYTES where possible.

    The converter writes one layer of a stacked array, and one expert of an expert array, at a
    time: those axes get chunk extent 1. The remaining axes are halved (largest first) until a
    chunk fits CHUNK_BYTES; any split of a fully written extent stays aligned.
    """
    chunk = list(shape)
    fixed = 0
    if is_stacked(path):
        chunk[0] = 1
        fixed = 1
        if is_expert(path):
            chunk[1] = 1
            fixed = 2
    while math.prod(chunk) * itemsize > CHUNK_BYTES:
        axis = max(range(fixed, len(chunk)), key=lambda a: (chunk[a], -a), default=None)
        if axis is None or chunk[axis] == 1:
            break
        chunk[axis] = -(-chunk[axis] // 2)
    return tuple(max(c, 1) for c in chunk)


def _zarr_dtype(dtype: np.dtype) -> str:
    return {"bfloat16": "bfloat16"}.get(np.dtype(dtype).name, np.dtype(dtype).name)


def array_spec(directory: str, path: tuple[str, ...]) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": os.path.join(directory, leaf_name(path))},
    }


def create_params(params_dir: str, abstract: dict) -> dict[tuple[str, ...], dict]:
    """Create the empty orbax checkpoint at ``params_dir``: orbax metadata + empty zarr3 arrays.

    Returns {param path: {"shape", "dtype", "chunks"}} for the manifest.
    """
    import orbax.checkpoint as ocp
    import tensorstore as ts

    leaves = flat_leaves(abstract)
    placeholder = jax.tree.map(lambda s: np.zeros((1,) * len(s.shape), s.dtype), abstract)
    # orbax writes _METADATA and its commit files for the tree's structure; the placeholder
    # arrays it writes are then replaced by the full-size ones (metadata stores no shapes).
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(params_dir, args=ocp.args.PyTreeSave(placeholder))
    info = {}
    for path, s in leaves.items():
        leaf_dir = os.path.join(params_dir, leaf_name(path))
        if not os.path.isdir(leaf_dir):
            raise FormatError(
                f"orbax did not write {leaf_dir}: this orbax version names leaves differently"
            )
        shutil.rmtree(leaf_dir)
        dtype = np.dtype(s.dtype)
        chunks = chunk_shape(path, tuple(s.shape), dtype.itemsize)
        ts.open(
            {
                **array_spec(params_dir, path),
                "metadata": {
                    "shape": list(s.shape),
                    "data_type": _zarr_dtype(dtype),
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "fill_value": 0,
                },
                "store_data_equal_to_fill_value": True,
            },
            create=True,
        ).result()
        info[path] = {"shape": list(s.shape), "dtype": dtype.name, "chunks": list(chunks)}
    return info


def open_params(params_dir: str, paths) -> dict[tuple[str, ...], Any]:
    """The params' zarr3 arrays, opened for reading and writing."""
    import tensorstore as ts

    return {
        # file_io_sync (tensorstore's default, stated so it stays): every chunk write is
        # fsynced before it completes, so a unit logged as done in progress.jsonl is on disk.
        p: ts.open(
            {**array_spec(params_dir, p), "store_data_equal_to_fill_value": True},
            open=True,
            context=ts.Context({"file_io_sync": True}),
        ).result()
        for p in paths
    }


def count_chunks(params_dir: str, path: tuple[str, ...]) -> int:
    """How many chunk files of one array exist on disk."""
    root = os.path.join(params_dir, leaf_name(path), "c")
    return sum(len(files) for _, _, files in os.walk(root))


def expected_chunks(shape, chunks) -> int:
    return math.prod(-(-s // c) for s, c in zip(shape, chunks, strict=True))


def fsync_dir(path: str) -> None:
    """Make a rename or new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a finished checkpoint; FormatError if absent, unfinished or unknown."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FormatError(
            f"{path}: no {MANIFEST}, so not a finished k2jax checkpoint (an interrupted "
            "conversion leaves OUT_DIR.partial; rerun the converter with --resume)"
        )
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or not manifest.get("finished"):
        raise FormatError(f"{mpath}: not a finished {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise FormatError(
            f"{mpath}: format version {manifest.get('version')}, this k2jax reads {VERSION}"
        )
    return manifest


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def check_against(manifest: dict, abstract: dict, where: str) -> None:
    """Every leaf of ``abstract`` is in the manifest with its shape; nothing else is."""
    want = {leaf_name(p): s for p, s in flat_leaves(abstract).items()}
    have = manifest["arrays"]
    for name, s in want.items():
        if name not in have:
            raise FormatError(f"{where}: array {name} is missing from the checkpoint")
        if tuple(have[name]["shape"]) != tuple(s.shape):
            raise FormatError(
                f"{where}: array {name} has shape {have[name]['shape']}, the config "
                f"expects {list(s.shape)}"
            )
    for name in have:
        if name not in want:
            raise FormatError(f"{where}: unexpected array {name}: the config has no such param")


def restore_params(
    path: str | os.PathLike,
    abstract: dict,
    shardings: dict,
    leave_out: Callable[[tuple[str, ...]], bool] | None = None,
) -> dict:
    """Restore the params of a finished checkpoint, each array into its sharding.

    ``abstract`` gives each leaf's shape and the dtype to restore as (a stored bf16 weight read
    as float32 is widened exactly); ``shardings`` is a matching tree of jax Shardings. orbax
    reads each device's shard from disk and places it on that device: no host copy of the
    whole model is made. Leaves whose path ``leave_out`` accepts are checked but not restored
    (absent from the result): the caller reads them layer by layer (``read_layer``).
    """
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    manifest = read_manifest(path)
    check_against(manifest, abstract, path)
    if leave_out is not None:
        abstract = _without(abstract, leave_out)
        shardings = _without(shardings, leave_out)
    restore_args = jax.tree.map(
        lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape, dtype=s.dtype),
        abstract,
        shardings,
    )
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=RESTORE_CONCURRENT_GB)
    with ocp.Checkpointer(handler) as ckptr:
        return ckptr.restore(
            os.path.join(path, PARAMS_DIR),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=leave_out is not None
            ),
        )


def _without(tree: dict, leave_out: Callable[[tuple[str, ...]], bool], prefix=()) -> dict:
    """``tree`` without the leaves ``leave_out`` accepts (and without emptied subtrees)."""
    out = {}
    for key, value in tree.items():
        where = (*prefix, key)
        if isinstance(value, dict):
            kept = _without(value, leave_out, where)
            if kept:
                out[key] = kept
        elif not leave_out(where):
            out[key] = value
    return out


def read_layer(path: str | os.PathLike, leaf: tuple[str, ...], index: int, dtype) -> np.ndarray:
    """Layer ``index`` of the stacked array ``leaf`` of a finished checkpoint, on the host."""
    import tensorstore as ts

    spec = array_spec(os.path.join(os.fspath(path), PARAMS_DIR), leaf)
    array = ts.open(spec, open=True, read=True).result()
    return np.asarray(array[index].read().result()).astype(np.dtype(dtype), copy=False)
