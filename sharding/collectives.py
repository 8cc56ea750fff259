"""The collectives of a compiled program, read from its HLO text: kind, count, bytes per chip.

``compiled.as_text()`` lists every computation; a collective (``all-reduce``, ``all-gather``,
``reduce-scatter``, ``all-to-all``, ``collective-permute``, or their async ``-start`` forms; the
``-done`` halves are not counted again) sits in the entry computation or in one it calls. A
``while`` body's collectives count once per trip, so the layer scan's count once per layer,
unlike XLA's cost analysis, which counts a loop body once (the trip count is XLA's
``known_trip_count``, or the bound of the loop condition's ``i < N`` where XLA:TPU does not
write it). Branches of a ``conditional`` are each counted once (an upper bound).

Bytes a chip moves, for a group of n chips and an operand of S bytes (the usual ring costs, as in
the scaling book): all-reduce 2 S (n-1)/n; all-gather S_out (n-1)/n; reduce-scatter
S_in (n-1)/n; all-to-all S (n-1)/n; collective-permute S.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_ITEMSIZE = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COND = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"= s(?:32|64)\[\][^=]*constant\((\d+)\)")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")


def _arrays(shape: str) -> list[float]:
    """Byte sizes of the arrays in an HLO shape string (a tuple lists several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _ITEMSIZE:
            continue
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(count * _ITEMSIZE[dtype])
    return out


def group_size(line: str, devices: int) -> int:
    """Devices in each replica group of the collective on HLO ``line``: from an explicit list
    (``{{0,1},{2,3}}``), an iota form (``[2,4]<=[8]``: 2 groups of 4), or a mesh form
    (``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}``: the product of the named axes)."""
    m = _GROUPS_MESH.search(line)
    if m:
        sizes = {name: int(size) for name, size in _MESH_AXIS.findall(m.group(1))}
        names = [n.strip().strip("'") for n in m.group(2).split(",") if n.strip()]
        return math.prod(sizes.get(n, 1) for n in names)
    m = _GROUPS_LIST.search(line)
    if m:
        return max(len([x for x in m.group(1).split(",") if x]), 1)
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    return devices  # no groups written: every device


def _moved(kind: str, start: bool, shape: str, n: int) -> float:
    """Bytes one chip sends for this op (see the module docstring)."""
    sizes = _arrays(shape)
    if not sizes or n <= 1:
        return 0.0
    frac = (n - 1) / n
    if kind == "all-reduce":
        return 2 * frac * sum(sizes)
    if kind == "all-gather":
        # The async form's result is (operand, result): the gathered result is the larger.
        return frac * (max(sizes) if start else sum(sizes))
    if kind == "reduce-scatter":
        out = min(sizes) if start else sum(sizes)
        return frac * out * n
    if kind == "collective-permute":
        return sizes[0] if start else sum(sizes)
    return frac * (sizes[0] if start else sum(sizes))


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    name, entry = None, None
    for line in text.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("{")[0].split("->")[0].split("(")[0]:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
            continue
        if line.strip() == "}":
            name = None
            continue
        comps[name].append(line)
    comps["__entry__"] = [entry or ""]
    return comps


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's ``known_trip_count`` where written, else the bound its
    condition compares the counter against (``i < N``, how a scan's loop is lowered; XLA:TPU
    does not write the backend config), else 1."""
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    m = _COND.search(line)
    cond = comps.get(m.group(1), []) if m else []
    if any("direction=LT" in ln for ln in cond):
        bounds = [int(c) for ln in cond for c in _INT_CONST.findall(ln)]
        if bounds:
            return max(bounds)
    return 1


def collectives(text: str, devices: int) -> dict[str, dict[str, float]]:
    """``{kind: {"count": ops per run, "bytes": bytes one chip sends per run}}`` for the
    compiled HLO ``text`` of a program over ``devices`` chips (kinds with no op are omitted)."""
    comps = _computations(text)
    entry = comps.pop("__entry__")[0]
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "bytes": 0.0})
    seen_stack: set[str] = set()

    def walk(name: str, times: int) -> None:
        if name not in comps or name in seen_stack:
            return
        seen_stack.add(name)
        for line in comps[name]:
            op = _OP.search(line)
            if op:
                kind, start = op.group("kind"), bool(op.group("start"))
                n = group_size(line, devices)
                totals[kind]["count"] += times
                totals[kind]["bytes"] += times * _moved(kind, start, op.group("shape"), n)
            trips = _trip_count(line, comps) if " while(" in line else 1
            for callee in _CALLS.findall(line):
                walk(callee, times * (trips if " while(" in line else 1))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    walk(callee.strip().lstrip("%"), times)
        seen_stack.discard(name)

    walk(entry, 1)
    return {k: dict(v) for k, v in totals.items() if v["count"]}


def collective_seconds(
    ops: dict[str, dict[str, float]], ici_bandwidth: float, latency_s: float
) -> float:
    """Time the collectives take on one chip, serialized: each op's latency plus its bytes
    over the chip's ICI bandwidth."""
    return sum(v["count"] * latency_s + v["bytes"] / ici_bandwidth for v in ops.values())
