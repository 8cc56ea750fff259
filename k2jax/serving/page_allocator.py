"""Host-side page bookkeeping for the paged latent cache: free list, reference counts, tables.

The device pool (``k2jax.model.kv_cache``) is ``[L, P, S_page, W]``; this allocator decides which of
the P pages each sequence's block table names. Page 0 is the scratch page padding tokens write
to, so it is never handed out. Allocation is all-or-nothing: a request that cannot be met
changes nothing and raises ``OutOfPages``, so the engine can preempt a sequence and retry.

With ``prefix_cache=True`` full pages are also named by the chain hash of the prefix they end
(``k2jax.serving.prefix_cache``) and may be held by several sequences at once (a reference
count per page). A sequence only ever *writes* positions at or after its cached length, and a
shared page lies wholly before that length in every holder (it is full, and the last partial
page is never shared), so a shared page is never written. A page whose last holder lets go stays
cached (idle) when it is named, and is evicted, least recently used first, only when a page is
needed and the free list is empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from k2jax.model.kv_cache import SCRATCH_PAGE
from k2jax.serving.prefix_cache import ROOT_DIGEST, PrefixCache, chain_digest, page_digests


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than an allocation needs."""


class RequestTooLarge(OutOfPages, ValueError):
    """A request that could not fit even in an empty pool (refused before any work)."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` positions."""
    return -(-num_tokens // page_size)


@dataclasses.dataclass
class _Chain:
    """How far a sequence's pages are named in the prefix cache."""

    named: int = 0  # leading pages whose digest is known (cached by this or another page)
    digest: bytes = ROOT_DIGEST  # the digest of page ``named - 1``


class PageAllocator:
    """A free list over pages 1..num_pages-1, per-page holder counts, and each sequence's table."""

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = False):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Popped from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._holders = np.zeros((num_pages,), np.int32)
        self.cache = PrefixCache() if prefix_cache else None
        self._chains: dict[Hashable, _Chain] = {}

    @property
    def num_free(self) -> int:
        """Pages on the free list (holding nothing worth keeping)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Idle cached pages: held by no sequence, kept for a later prompt, evictable."""
        return 0 if self.cache is None else self.cache.num_idle

    @property
    def num_available(self) -> int:
        """Pages an allocation may take: the free list, then evicted idle cached pages."""
        return self.num_free + self.num_cached

    @property
    def num_used(self) -> int:
        """Pages held by at least one sequence."""
        return int(np.count_nonzero(self._holders))

    def all_free_or_cached(self) -> bool:
        """No page is held and no sequence has a table: nothing leaked."""
        return not self._tables and self.num_available == self.num_pages - 1

    def pages(self, seq: Hashable) -> list[int]:
        """The block table of ``seq`` (a copy; empty when it holds nothing)."""
        return list(self._tables.get(seq, ()))

    def needed(self, seq: Hashable, num_tokens: int) -> int:
        """Extra pages ``seq`` needs to hold ``num_tokens`` positions."""
        have = len(self._tables.get(seq, ()))
        return max(0, pages_for(num_tokens, self.page_size) - have)

    @property
    def pages_per_sequence(self) -> int:
        """The most pages one sequence can hold (every page but the scratch page)."""
        return self.num_pages - 1

    def _take(self, index: int) -> int:
        """A page for entry ``index`` of a table: from the free list, else evicted."""
        del index  # any page serves any entry here; StripedAllocator places by it
        if self._free:
            return self._free.pop()
        return self.cache.evict()

    def _release(self, page: int) -> None:
        self._free.append(page)

    def _can_take(self, first: int, count: int) -> bool:
        """Whether table entries ``first .. first + count - 1`` can all get a page."""
        del first
        return count <= self.num_available

    def ensure(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Grow ``seq``'s table to hold positions 0..num_tokens-1; returns its table.

        Raises ``OutOfPages`` (and allocates nothing) when fewer pages are available.
        """
        extra = self.needed(seq, num_tokens)
        if not self._can_take(len(self._tables.get(seq, ())), extra):
            raise OutOfPages(
                f"sequence {seq!r} needs {extra} more page(s) of {self.page_size} tokens for "
                f"{num_tokens} positions; {self.num_available} of {self.num_pages - 1} are "
                "available"
            )
        table = self._tables.setdefault(seq, [])
        for _ in range(extra):
            page = self._take(len(table))
            self._holders[page] = 1
            table.append(page)
        return list(table)

    def free(self, seq: Hashable) -> None:
        """Let go of every page of ``seq`` (a no-op for an unknown sequence).

        A page nobody holds any more goes back to the free list, or, when it is named in the
        prefix cache, stays cached as idle. The table is released from its end, so a prefix's
        later pages are evicted before its earlier ones (which other prompts share more).
        """
        self._chains.pop(seq, None)
        for page in reversed(self._tables.pop(seq, [])):
            self._holders[page] -= 1
            if self._holders[page]:
                continue
            if self.cache is not None and page in self.cache:
                self.cache.park(page)
            else:
                self._release(page)

    def block_table(self, seq: Hashable, width: int) -> np.ndarray:
        """``seq``'s table as int32 [width], padded with the scratch page."""
        table = self._tables.get(seq, [])
        if len(table) > width:
            raise ValueError(f"sequence {seq!r} holds {len(table)} pages, more than width {width}")
        row = np.full((width,), SCRATCH_PAGE, np.int32)
        row[: len(table)] = table
        return row

    # Prefix caching.

    def cached_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached pages a sequence of ``tokens`` may start with, and its page digests.

        At most ``(len(tokens) - 1) // page_size`` pages: at least one token is always left to
        compute (its logits give the next token), and a partial page is never shared.
        """
        if self.cache is None:
            return [], []
        digests = page_digests(tokens, self.page_size, (len(tokens) - 1) // self.page_size)
        return self.cache.lookup(digests), digests

    def fits(self, hit_pages: Sequence[int], num_tokens: int) -> bool:
        """Whether a sequence starting with ``hit_pages`` can hold ``num_tokens`` positions."""
        revived = sum(1 for p in hit_pages if self.cache is not None and self.cache.is_idle(p))
        need = pages_for(num_tokens, self.page_size) - len(hit_pages)
        return need <= self.num_available - revived

    def start(self, seq: Hashable, hit_pages: Sequence[int], digests: Sequence[bytes]) -> None:
        """Give ``seq`` (holding nothing) the cached pages ``hit_pages`` as its first pages."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already holds pages")
        for page in hit_pages:
            if not self._holders[page]:
                self.cache.unpark(page)
            self._holders[page] += 1
        self._tables[seq] = list(hit_pages)
        if self.cache is not None:
            chain = _Chain()
            if hit_pages:
                chain = _Chain(len(hit_pages), digests[len(hit_pages) - 1])
            self._chains[seq] = chain

    def name_full_pages(self, seq: Hashable, tokens: Sequence[int], num_cached: int) -> None:
        """Name in the prefix cache every page of ``seq`` that positions 0..num_cached-1 fill.

        ``tokens`` are the sequence's tokens (at least ``num_cached`` of them). A page whose
        prefix another page already holds stays private (freed, not cached, at the end).
        """
        if self.cache is None:
            return
        chain = self._chains.setdefault(seq, _Chain())
        table = self._tables.get(seq, [])
        size = self.page_size
        for k in range(chain.named, min(num_cached // size, len(table))):
            chain.digest = chain_digest(chain.digest, tokens[k * size : (k + 1) * size])
            chain.named = k + 1
            self.cache.insert(table[k], chain.digest)


class PartitionedAllocator:
    """The pool's pages in ``shards`` equal ranges, one ``PageAllocator`` each (data-parallel
    attention: each shard of the batch owns its sequences' pages on its own devices).

    Shard s owns global pages ``[s * shard_pages, (s + 1) * shard_pages)``; the first of them is
    its scratch page. A sequence is bound to one shard when it starts (``start``) and every
    later call for it is routed there; ``block_table`` gives global page ids (the scratch page
    stays ``SCRATCH_PAGE``), which the model's attention turns into its shard's local ids. With
    one shard this is exactly a ``PageAllocator`` over the whole pool.
    """

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = False, shards=1):
        if shards < 1 or num_pages % shards:
            raise ValueError(
                f"num_pages {num_pages} cannot be split into {shards} equal pool shards: make it "
                f"a multiple of {shards}"
            )
        self.num_pages, self.page_size, self.shards = num_pages, page_size, shards
        self.shard_pages = num_pages // shards
        self.parts = [
            PageAllocator(self.shard_pages, page_size, prefix_cache) for _ in range(shards)
        ]
        self._shard_of: dict[Hashable, int] = {}

    @property
    def cache(self):
        """The first shard's prefix cache, or None when prefix caching is off."""
        return self.parts[0].cache

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.parts)

    @property
    def num_cached(self) -> int:
        return sum(p.num_cached for p in self.parts)

    @property
    def num_available(self) -> int:
        return sum(p.num_available for p in self.parts)

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self.parts)

    @property
    def num_usable(self) -> int:
        """Pages sequences may hold in all (each shard's scratch page excluded)."""
        return self.num_pages - self.shards

    @property
    def pages_per_sequence(self) -> int:
        """The most pages one sequence can hold: its shard's, less the scratch page."""
        return self.shard_pages - 1

    def all_free_or_cached(self) -> bool:
        return not self._shard_of and all(p.all_free_or_cached() for p in self.parts)

    def shard_of_slot(self, slot: int, slots: int) -> int:
        """The pool shard of batch row ``slot``: rows are split into ``shards`` equal blocks, as
        the batch axis is over the mesh."""
        return slot * self.shards // slots

    def shard(self, seq: Hashable) -> int:
        return self._shard_of.get(seq, 0)

    def _part(self, seq: Hashable) -> PageAllocator:
        return self.parts[self.shard(seq)]

    def pages(self, seq: Hashable) -> list[int]:
        """``seq``'s table as global page ids."""
        base = self.shard(seq) * self.shard_pages
        return [base + p for p in self._part(seq).pages(seq)]

    def needed(self, seq: Hashable, num_tokens: int) -> int:
        return self._part(seq).needed(seq, num_tokens)

    def ensure(self, seq: Hashable, num_tokens: int) -> list[int]:
        self._part(seq).ensure(seq, num_tokens)
        return self.pages(seq)

    def free(self, seq: Hashable) -> None:
        self._part(seq).free(seq)
        self._shard_of.pop(seq, None)

    def block_table(self, seq: Hashable, width: int) -> np.ndarray:
        """``seq``'s table as int32 [width] of global ids, padded with the scratch page."""
        row = self._part(seq).block_table(seq, width)
        base = self.shard(seq) * self.shard_pages
        return np.where(row == SCRATCH_PAGE, SCRATCH_PAGE, row + base).astype(np.int32)

    def cached_prefix(self, tokens: Sequence[int], shard: int = 0):
        """``PageAllocator.cached_prefix`` in ``shard`` (local page ids, for ``start``)."""
        return self.parts[shard].cached_prefix(tokens)

    def fits(self, hit_pages: Sequence[int], num_tokens: int, shard: int = 0) -> bool:
        return self.parts[shard].fits(hit_pages, num_tokens)

    def start(self, seq, hit_pages: Sequence[int], digests: Sequence[bytes], shard: int = 0):
        """Bind ``seq`` to ``shard`` and give it that shard's cached pages ``hit_pages``."""
        if seq in self._shard_of:
            raise ValueError(f"sequence {seq!r} already holds pages")
        self.parts[shard].start(seq, hit_pages, digests)
        self._shard_of[seq] = shard

    def name_full_pages(self, seq: Hashable, tokens: Sequence[int], num_cached: int) -> None:
        self._part(seq).name_full_pages(seq, tokens, num_cached)


class StripedAllocator(PageAllocator):
    """The pool's pages in ``shards`` equal ranges, each sequence striped over all of them
    (context-parallel decode): entry j of every block table is a page of shard ``j mod
    shards``, so a sequence's pages, and the reads of its attention, spread evenly over the
    devices of the pool's axes (``k2jax.model.context_parallel``).

    Shard s owns global pages ``[s * shard_pages, (s + 1) * shard_pages)``; the first is its
    scratch page, never handed out. Tables, holders and the prefix cache are one, as in
    ``PageAllocator``: a cached prefix page sits at the same table entry in every sequence that
    shares it, so in the right shard. Only taking and returning pages is per shard (a free list
    each, and eviction of an idle cached page of the shard that needs one). Every row may use
    every shard: there is no binding of rows to shards (``shard`` is 0 for every sequence).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = False, shards=1):
        if shards < 1 or num_pages % shards or num_pages // shards < 2:
            raise ValueError(
                f"num_pages {num_pages} cannot be striped over {shards} pool shards: make it a "
                f"multiple of {shards} with at least 2 pages a shard (one is its scratch page)"
            )
        super().__init__(num_pages, page_size, prefix_cache)
        self.shards, self.shard_pages = shards, num_pages // shards
        span = self.shard_pages
        self._free_in = [list(range((s + 1) * span - 1, s * span, -1)) for s in range(shards)]
        self._free = []  # unused: the per-shard lists replace it
        if prefix_cache:  # idle pages kept by shard too: counted and evicted per shard in O(1)
            self.cache = PrefixCache(group=self.shard_of_page)

    def shard_of_page(self, page: int) -> int:
        return page // self.shard_pages

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free_in)

    @property
    def num_usable(self) -> int:
        """Pages sequences may hold in all (each shard's scratch page excluded)."""
        return self.num_pages - self.shards

    @property
    def pages_per_sequence(self) -> int:
        """The most pages one sequence can hold: every shard's, less their scratch pages."""
        return self.num_pages - self.shards

    def all_free_or_cached(self) -> bool:
        return not self._tables and self.num_available == self.num_usable

    def _available_in(self) -> list[int]:
        """Pages an allocation may take in each shard: its free list and its idle pages."""
        idle = self.cache.num_idle_in if self.cache is not None else lambda shard: 0
        return [len(free) + idle(shard) for shard, free in enumerate(self._free_in)]

    def _need_in(self, first: int, count: int) -> list[int]:
        need = [0] * self.shards
        for index in range(first, first + count):
            need[index % self.shards] += 1
        return need

    def _can_take(self, first: int, count: int) -> bool:
        need = self._need_in(first, count)
        return all(n <= a for n, a in zip(need, self._available_in(), strict=True))

    def _take(self, index: int) -> int:
        shard = index % self.shards
        if self._free_in[shard]:
            return self._free_in[shard].pop()
        return self.cache.evict(shard)

    def _release(self, page: int) -> None:
        self._free_in[self.shard_of_page(page)].append(page)

    def fits(self, hit_pages: Sequence[int], num_tokens: int, shard: int = 0) -> bool:
        """Whether a sequence starting with ``hit_pages`` can hold ``num_tokens`` positions,
        shard by shard (``shard`` is accepted for the scheduler and ignored)."""
        del shard
        available = self._available_in()
        for page in hit_pages:
            if self.cache is not None and self.cache.is_idle(page):
                available[self.shard_of_page(page)] -= 1  # revived: no longer evictable
        need = self._need_in(len(hit_pages), pages_for(num_tokens, self.page_size) - len(hit_pages))
        return all(n <= a for n, a in zip(need, available, strict=True))

    # The scheduler's shard interface: one group of rows that spans every shard.

    def shard_of_slot(self, slot: int, slots: int) -> int:
        return 0

    def shard(self, seq: Hashable) -> int:
        return 0

    def cached_prefix(self, tokens: Sequence[int], shard: int = 0):
        return super().cached_prefix(tokens)

    def start(self, seq, hit_pages: Sequence[int], digests: Sequence[bytes], shard: int = 0):
        super().start(seq, hit_pages, digests)
