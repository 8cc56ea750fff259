"""A request handle's blocking event stream as an async iterator for the event loop.

The persistent engine feeds each `RequestHandle` from its own thread; `handle.get` blocks. One
small daemon thread per request waits on its handle and hands every `StepToken` to the event
loop (`call_soon_threadsafe`), so no route ever blocks the loop and no executor pool caps how
many requests stream at once. `close()` (called when the reply is done, the client went away,
or a stop string matched) cancels the request in the engine if it is still running, which frees
its pages at the next step boundary, and lets the thread end.
"""

from __future__ import annotations

import asyncio
import threading

_POLL_SECONDS = 0.2  # how often a waiting thread checks whether it was closed
_END = object()


class HandleEvents:
    """`async for token in HandleEvents(handle)`; ends after the finished token."""

    def __init__(self, handle):
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="k2jax-request", daemon=True)
        self._thread.start()

    def _deliver(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self._closed.set()

    def _pump(self) -> None:
        try:
            while not self._closed.is_set():
                token = self._handle.get(timeout=_POLL_SECONDS)
                if token is None:
                    if self._handle.done:
                        # Finished (or cancelled) meanwhile: hand over what is left.
                        while (token := self._handle.get(timeout=0)) is not None:
                            self._deliver(token)
                        break
                    continue
                self._deliver(token)
                if token.finished:
                    break
        except BaseException as error:  # noqa: BLE001  (re-raised in the loop, where it is seen)
            self._deliver(error)
        finally:
            self._deliver(_END)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Cancels the request unless it already finished; idempotent."""
        self._closed.set()
        if not self._handle.done:
            self._handle.cancel()
