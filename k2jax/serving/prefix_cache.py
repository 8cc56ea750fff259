"""Prefix caching: full cache pages named by a hash of the whole token prefix they end.

Page k of a sequence holds the latents of tokens ``[k*S, (k+1)*S)``, and those latents depend on
every token before them, so a page is named by a *chain hash*: ``digest_k = H(digest_{k-1} ||
tokens of page k)``. Two sequences whose first ``k`` pages hash alike hold identical latents
there and can share those pages. The hash is BLAKE2b (128-bit), not Python's ``hash``: a prompt
crafted to collide with another user's prefix would read that user's cache.

``PrefixCache`` only names pages; ``PageAllocator`` (page_allocator.py) owns them, counts their
references and asks this cache which ones are idle. A cached page no sequence holds is *idle*:
it stays readable by a later prompt until the allocator needs a page and the free list is
empty, then the least recently used idle page is evicted (forgotten and reused).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

ROOT_DIGEST = b""


def chain_digest(parent: bytes, page_tokens: Sequence[int]) -> bytes:
    """The name of a full page: the hash of its parent's name and its own tokens."""
    data = np.asarray(page_tokens, np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def page_digests(
    tokens: Sequence[int], page_size: int, num_pages: int, parent: bytes = ROOT_DIGEST
) -> list[bytes]:
    """The chain digests of the first ``num_pages`` full pages of ``tokens``."""
    digests = []
    for k in range(num_pages):
        parent = chain_digest(parent, tokens[k * page_size : (k + 1) * page_size])
        digests.append(parent)
    return digests


class PrefixCache:
    """Which page holds which prefix digest, and which cached pages are idle (LRU order)."""

    def __init__(self, group: Callable[[int], int] | None = None) -> None:
        self._page_of: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        # Idle cached pages, least recently used first: all of them, and by group (a striped
        # pool's shard, ``group(page)``), so a shard's count and its oldest page cost O(1).
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._group = group or (lambda page: 0)
        self._idle_in: collections.defaultdict[int, collections.OrderedDict[int, None]]
        self._idle_in = collections.defaultdict(collections.OrderedDict)

    def __contains__(self, page: int) -> bool:
        return page in self._digest_of

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._digest_of)

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """The pages of the longest run of ``digests`` (from the first) that is cached."""
        pages = []
        for digest in digests:
            page = self._page_of.get(digest)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, page: int, digest: bytes) -> bool:
        """Name ``page`` by ``digest``; False (nothing changes) when another page has it."""
        if digest in self._page_of or page in self._digest_of:
            return False
        self._page_of[digest] = page
        self._digest_of[page] = digest
        return True

    def park(self, page: int) -> None:
        """``page`` lost its last holder: idle, the most recently used."""
        self._idle[page] = None
        self._idle.move_to_end(page)
        group = self._idle_in[self._group(page)]
        group[page] = None
        group.move_to_end(page)

    def unpark(self, page: int) -> None:
        """``page`` is held again: no longer evictable."""
        del self._idle[page]
        del self._idle_in[self._group(page)][page]

    def num_idle_in(self, group: int) -> int:
        """Idle pages of ``group``."""
        return len(self._idle_in[group])

    def evict(self, group: int | None = None) -> int:
        """Forget the least recently used idle page (of ``group``, when given) and return it
        (the caller reuses it)."""
        page = next(iter(self._idle if group is None else self._idle_in[group]))
        del self._idle[page]
        del self._idle_in[self._group(page)][page]
        del self._page_of[self._digest_of.pop(page)]
        return page
