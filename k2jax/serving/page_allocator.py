"""Host-side page bookkeeping for the paged latent cache: a free list and per-sequence tables.

The device pool (``k2jax.model.kv_cache``) is ``[L, P, S_page, W]``; this allocator decides which of
the P pages each sequence owns. Page 0 is the scratch page padding tokens write to, so it is
never handed out. A page belongs to at most one live sequence at a time, which is what
guarantees the cache never overwrites a live page. Allocation is all-or-nothing: a request
that cannot be met changes nothing and raises ``OutOfPages``, so the engine can preempt a
sequence and retry.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from k2jax.model.kv_cache import SCRATCH_PAGE


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than an allocation needs."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` positions."""
    return -(-num_tokens // page_size)


class PageAllocator:
    """A free list over pages 1..num_pages-1 and the block table of each live sequence."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Popped from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, seq: Hashable) -> list[int]:
        """The block table of ``seq`` (a copy; empty when it holds nothing)."""
        return list(self._tables.get(seq, ()))

    def needed(self, seq: Hashable, num_tokens: int) -> int:
        """Extra pages ``seq`` needs to hold ``num_tokens`` positions."""
        have = len(self._tables.get(seq, ()))
        return max(0, pages_for(num_tokens, self.page_size) - have)

    def ensure(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Grow ``seq``'s table to hold positions 0..num_tokens-1; returns its table.

        Raises ``OutOfPages`` (and allocates nothing) when the free list is too short.
        """
        extra = self.needed(seq, num_tokens)
        if extra > len(self._free):
            raise OutOfPages(
                f"sequence {seq!r} needs {extra} more page(s) of {self.page_size} tokens for "
                f"{num_tokens} positions; {len(self._free)} of {self.num_pages - 1} are free"
            )
        table = self._tables.setdefault(seq, [])
        for _ in range(extra):
            table.append(self._free.pop())
        return list(table)

    def free(self, seq: Hashable) -> None:
        """Return every page of ``seq`` to the free list (a no-op for an unknown sequence)."""
        self._free.extend(reversed(self._tables.pop(seq, [])))

    def block_table(self, seq: Hashable, width: int) -> np.ndarray:
        """``seq``'s table as int32 [width], padded with the scratch page."""
        table = self._tables.get(seq, [])
        if len(table) > width:
            raise ValueError(f"sequence {seq!r} holds {len(table)} pages, more than width {width}")
        row = np.full((width,), SCRATCH_PAGE, np.int32)
        row[: len(table)] = table
        return row
