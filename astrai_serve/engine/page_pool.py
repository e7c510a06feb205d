"""PagePool: which KV-cache pages are free, and how many holders each used page has.

A page is a fixed run of `page_size` token slots in the preallocated KV storage. A page can be
held by several owners at once -- the prefix cache and any number of sequences whose prompts
share it -- so ownership is a reference count: a page returns to the free list exactly when its
count drops to zero. Pure Python, no tensors: the scheduler plans with it on the CPU.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class PageAccountingError(RuntimeError):
    """A double free or a reference to a page nobody holds: a bug, never a user error."""


class PagePool:
    def __init__(self, num_pages: int) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be a positive integer")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self, n: int) -> list[int]:
        """n fresh pages, each with one reference (the caller's)."""
        if n > len(self._free):
            raise PageAccountingError(f"asked for {n} pages but only {len(self._free)} are free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise PageAccountingError(f"incref of free page {p}")
            self._refs[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference from each page; returns how many pages became free."""
        freed = 0
        for p in pages:
            if self._refs[p] <= 0:
                raise PageAccountingError(f"double free of page {p}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def check(self) -> None:
        """Internal consistency: the free list is exactly the pages with no reference."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise PageAccountingError("a page is on the free list twice")
        for p, r in enumerate(self._refs):
            if (r == 0) != (p in free) or r < 0:
                raise PageAccountingError(f"page {p} has {r} references but free={p in free}")
