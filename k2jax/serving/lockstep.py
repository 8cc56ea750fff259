"""Multi-process serving: process 0's engine decides each step, every other process replays it.

In a multi-controller JAX job every process must launch the same device programs on the same
inputs in the same order, but only process 0 hears the HTTP requests. So process 0's
``PersistentEngine`` (the leader) publishes, at every step boundary, what it applied there
(the keys of cancelled requests, the admitted requests in full) and whether it steps; every
other process (a follower, ``PersistentEngine.follow``) applies exactly those to its own
scheduler and runs the same step. Scheduling is a deterministic function of that sequence
(page allocation, prefix cache, admission order, preemption), so every process builds the same
block tables and launches the same programs; the device outputs are the same global arrays.

The channel is ``jax.experimental.multihost_utils.broadcast_one_to_all``, the collective the
processes already share: a fixed header (payload length, step and close flags), then, only when
something happened, the payload as JSON bytes (never pickle: a follower parses data, it never
runs code) padded to a power of two so that few shapes compile.

While idle the leader publishes an empty boundary every ``heartbeat_seconds`` (a follower waits
in the broadcast until then), so a follower notices a closed leader within that time, and no
process waits in one collective for long. Waiting is safe in itself (measured on gloo, JAX
0.10.2: 45 s and 700 s waits in ``broadcast_one_to_all`` complete; docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from k2jax.serving.engine import Request
from k2jax.serving.sampling import SamplingParams

HEARTBEAT_SECONDS = 5.0
_MIN_PAYLOAD = 1024  # bytes: smaller payloads are padded to this (one compiled shape)
_HEADER = 4  # int32: payload bytes, stepping, closing, spare


@dataclasses.dataclass(frozen=True)
class Boundary:
    """What the leader did at one step boundary, in order.

    ``events``: ``("cancel", key)`` or ``("add", key, Request)``, applied cancellations first,
    then admissions, exactly as the leader applied them."""

    events: tuple[tuple, ...] = ()
    stepping: bool = False
    closing: bool = False


def request_to_json(request: Request) -> dict[str, Any]:
    return {
        "prompt": list(request.prompt),
        "max_new_tokens": request.max_new_tokens,
        "sampling": dataclasses.asdict(request.sampling),
        "stop_token_ids": None if request.stop_token_ids is None else list(request.stop_token_ids),
        "top_logprobs": request.top_logprobs,
    }


def request_from_json(raw: dict[str, Any]) -> Request:
    stops = raw["stop_token_ids"]
    return Request(
        prompt=tuple(int(t) for t in raw["prompt"]),
        max_new_tokens=int(raw["max_new_tokens"]),
        sampling=SamplingParams(**raw["sampling"]),
        stop_token_ids=None if stops is None else tuple(int(t) for t in stops),
        top_logprobs=int(raw["top_logprobs"]),
    )


def encode(boundary: Boundary) -> bytes:
    """The payload of ``boundary``'s events (empty when there are none)."""
    if not boundary.events:
        return b""
    wire = []
    for event in boundary.events:
        if event[0] == "cancel":
            wire.append(["cancel", event[1]])
        elif event[0] == "add":
            wire.append(["add", event[1], request_to_json(event[2])])
        else:
            raise ValueError(f"unknown lockstep event {event[0]!r}")
    return json.dumps(wire, separators=(",", ":")).encode()


def decode(payload: bytes, stepping: bool, closing: bool) -> Boundary:
    events: list[tuple] = []
    for item in json.loads(payload.decode()) if payload else ():
        if item[0] == "cancel":
            events.append(("cancel", item[1]))
        elif item[0] == "add":
            events.append(("add", item[1], request_from_json(item[2])))
        else:
            raise ValueError(f"unknown lockstep event {item[0]!r} from process 0")
    return Boundary(tuple(events), stepping, closing)


def _padded_size(n: int) -> int:
    size = _MIN_PAYLOAD
    while size < n:
        size *= 2
    return size


class Channel:
    """Process 0 ``publish``es boundaries; the others ``receive`` them, in the same order."""

    def __init__(self, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        if heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds must be > 0, got {heartbeat_seconds}")
        self.heartbeat_seconds = heartbeat_seconds
        self.is_leader = jax.process_index() == 0

    @staticmethod
    def _broadcast(values: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(values))

    def agree(self, value: int) -> int:
        """Process 0's ``value`` on every process (e.g. the pool size, which each host would
        otherwise derive from its own free memory)."""
        return int(self._broadcast(np.asarray([value], np.int64))[0])

    def publish(self, boundary: Boundary) -> None:
        if not self.is_leader:
            raise RuntimeError("only process 0 publishes lockstep boundaries")
        payload = encode(boundary)
        header = np.asarray([len(payload), boundary.stepping, boundary.closing, 0], np.int32)
        self._broadcast(header)
        if payload:
            buffer = np.zeros((_padded_size(len(payload)),), np.uint8)
            buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
            self._broadcast(buffer)

    def receive(self) -> Boundary:
        if self.is_leader:
            raise RuntimeError("process 0 publishes lockstep boundaries; it never receives")
        length, stepping, closing, _ = (
            int(v) for v in self._broadcast(np.zeros(_HEADER, np.int32))
        )
        payload = b""
        if length:
            buffer = self._broadcast(np.zeros((_padded_size(length),), np.uint8))
            payload = buffer[:length].tobytes()
        return decode(payload, bool(stepping), bool(closing))
