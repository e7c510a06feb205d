"""PagePool and RadixCache: unit tests and a hypothesis state machine over random interleavings."""
from __future__ import annotations

import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from astrai_serve.engine.page_pool import PageAccountingError, PagePool
from astrai_serve.engine.radix_cache import RadixCache

PS = 2


def test_pool_alloc_free_and_double_free():
    pool = PagePool(4)
    a = pool.alloc(3)
    assert pool.num_free == 1 and sorted(a) == [0, 1, 2]
    pool.incref([a[0]])
    assert pool.decref(a) == 2          # a[0] still has one holder
    assert pool.refcount(a[0]) == 1
    assert pool.decref([a[0]]) == 1
    with pytest.raises(PageAccountingError, match="double free of page"):
        pool.decref([a[0]])
    with pytest.raises(PageAccountingError, match="incref of free page"):
        pool.incref([a[1]])
    with pytest.raises(PageAccountingError, match="only 4 are free"):
        pool.alloc(5)
    pool.check()


def test_radix_match_split_and_lru_eviction():
    pool = PagePool(16)
    tree = RadixCache(pool, PS)
    # Insert [1,2,3,4,5,6] (3 pages) then [1,2,3,4,9,9] sharing 2 pages.
    p1 = pool.alloc(3)
    tree.insert([1, 2, 3, 4, 5, 6], p1)
    pool.decref(p1)
    p2 = pool.alloc(3)
    got, _ = tree.insert([1, 2, 3, 4, 9, 9], p2)
    assert got[:2] == p1[:2] and got[2] == p2[2]
    assert pool.decref(p2) == 2          # the two duplicate pages are freed at once
    tree.check()
    assert tree.num_pages == 4
    pages, node = tree.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert pages == p1
    pages2, _ = tree.match_prefix([1, 2, 3, 5])   # mismatch inside the second page
    assert pages2 == p1[:1]
    # Lock the [..5,6] branch; eviction may only take the [9,9] leaf, then nothing more.
    tree.lock(node)
    assert tree.evictable_pages == 1
    assert tree.evict(10) == 1
    tree.check()
    assert tree.match_prefix([1, 2, 3, 4, 9, 9])[0] == p1[:2]
    tree.unlock(node)
    with pytest.raises(PageAccountingError):
        tree.unlock(node)
    # Eviction trims a leaf from its tail: the shared prefix outlives the branch.
    assert tree.evict(1) == 1
    assert tree.match_prefix([1, 2, 3, 4, 5, 6])[0] == p1[:2]
    assert tree.evict(100) == 2
    assert pool.num_free == 16 and tree.num_pages == 0
    tree.check()
    pool.check()


def test_eviction_does_not_walk_the_tree(monkeypatch):
    # A full cache evicts on nearly every page a decode step allocates: the LRU leaf must come
    # from the heap, not from a walk over thousands of leaves.
    pool = PagePool(4000)
    tree = RadixCache(pool, PS)
    for i in range(1000):
        pages = pool.alloc(2)
        tree.insert([i, i + 1, i + 2, i + 3], pages)
        pool.decref(pages)
    monkeypatch.setattr(tree, "_leaves", lambda: pytest.fail("evict walked the tree"))
    assert sum(tree.evict(1) for _ in range(500)) == 500
    monkeypatch.undo()
    tree.check()
    pool.check()


def test_radix_lru_order():
    pool = PagePool(8)
    tree = RadixCache(pool, PS)
    for toks in ([1, 1], [2, 2], [3, 3]):
        pages = pool.alloc(1)
        tree.insert(toks, pages)
        pool.decref(pages)
    tree.match_prefix([1, 1])            # touch [1,1]: now [2,2] is the least recently used
    tree.evict(1)
    assert tree.match_prefix([2, 2])[0] == []
    assert tree.match_prefix([1, 1])[0] and tree.match_prefix([3, 3])[0]


class PoolAndTree(RuleBasedStateMachine):
    """Random interleavings of alloc/free/insert/match+lock/unlock/evict/reset.

    Holders model sequences: each holds pool references on its pages and maybe a lock on the
    node its match ended at. After every rule: every page's reference count equals the tree's
    reference plus the holders', no page is leaked or freed twice, and every page a holder
    references is resident (not on the free list).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(12)
        self.tree = RadixCache(self.pool, PS)
        self.holders: list[tuple[list[int], object]] = []   # (pages, locked node or None)
        self.locked: dict[int, tuple[list[int], list[int]]] = {}  # id(node) -> (tokens, pages) matched

    tokens = st.lists(st.integers(0, 2), min_size=0, max_size=4).map(
        lambda pages: [t for p in pages for t in (p, p % 2)])

    @rule(n=st.integers(1, 4))
    def alloc(self, n):
        if self.pool.num_free < n:
            self.tree.evict(n - self.pool.num_free)
        if self.pool.num_free >= n:
            self.holders.append((self.pool.alloc(n), None))

    @rule(toks=tokens)
    def insert_fresh(self, toks):
        n = len(toks) // PS
        if self.pool.num_free < n:
            self.tree.evict(n - self.pool.num_free)
        if n and self.pool.num_free >= n:
            pages = self.pool.alloc(n)
            got, _ = self.tree.insert(toks, pages)
            assert len(got) == n
            self.pool.decref(pages)

    @rule(toks=tokens)
    def match_and_lock(self, toks):
        pages, node = self.tree.match_prefix(toks)
        self.pool.incref(pages)
        self.tree.lock(node)
        self.holders.append((pages, node))
        self.locked[id(node)] = (toks[:len(pages) * PS], pages)

    @precondition(lambda self: self.holders)
    @rule(i=st.integers(0, 100), publish=st.booleans(), toks=tokens)
    def release(self, i, publish, toks):
        pages, node = self.holders.pop(i % len(self.holders))
        if publish and node is None and pages and len(toks) >= len(pages) * PS:
            self.tree.insert(toks[:len(pages) * PS], pages)   # a finished sequence caches its pages
        if node is not None:
            self.tree.unlock(node)
        self.pool.decref(pages)

    @rule(n=st.integers(0, 12))
    def evict(self, n):
        before = self.pool.num_free
        freed = self.tree.evict(n)
        assert self.pool.num_free == before + freed

    @rule()
    def evict_one_takes_a_least_recently_used_leaf(self):
        # Against a walk of the whole tree: the page trimmed is the tail of an unlocked leaf
        # whose last use is the oldest (the heap must agree with the brute force).
        leaves = [leaf for leaf in self.tree._leaves() if leaf.lock_ref == 0]
        if not leaves:
            assert self.tree.evict(1) == 0
            return
        oldest = min(leaf.last_used for leaf in leaves)
        tails = {leaf.pages[-1] for leaf in leaves if leaf.last_used == oldest}
        before = set(self.tree.all_pages())
        self.tree.evict(1)
        gone = before - set(self.tree.all_pages())
        assert len(gone) == 1 and gone <= tails, (gone, tails)

    @rule()
    def reset(self):
        self.tree.reset()
        self.locked.clear()   # detached: holders keep their pages, the tree forgets them

    @invariant()
    def locked_prefixes_stay_cached(self):
        live = {id(node) for _, node in self.holders if node is not None}
        for key, (toks, pages) in self.locked.items():
            if key in live:
                assert self.tree.match_prefix(toks)[0] == pages

    @invariant()
    def accounting(self):
        self.pool.check()
        self.tree.check()
        expected = [0] * self.pool.num_pages
        for p in self.tree.all_pages():
            expected[p] += 1
        for pages, _ in self.holders:
            for p in pages:
                expected[p] += 1
        assert [self.pool.refcount(p) for p in range(self.pool.num_pages)] == expected

    def teardown(self):
        for pages, node in self.holders:
            if node is not None:
                self.tree.unlock(node)
            self.pool.decref(pages)
        self.tree.evict(self.pool.num_pages)
        assert self.pool.num_free == self.pool.num_pages, "pages leaked"


TestPoolAndTree = PoolAndTree.TestCase
TestPoolAndTree.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_radix_match_length_equals_the_longest_cached_page_prefix():
    """Random prompts from a few shared stems, inserted and matched in random order: a match
    covers exactly the longest whole-page prefix shared with any inserted prompt (edges split
    anywhere, matches that end inside an edge, mismatches in its first or a later page)."""
    rng = random.Random(0)
    pool = PagePool(4000)
    tree = RadixCache(pool, PS)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(0, 9) * PS)] for _ in range(4)]

    def prompt() -> list[int]:
        stem = rng.choice(stems)
        return stem[:rng.randrange(len(stem) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 12))]

    inserted: list[list[int]] = []
    for _ in range(200):
        p = prompt()
        want = max((_common_pages(p, q) for q in inserted), default=0)
        pages, _ = tree.match_prefix(p)
        assert len(pages) == want, (p, want, len(pages))
        n = len(p) // PS
        if n:
            got = pool.alloc(n)
            tree.insert(p[:n * PS], got)
            pool.decref(got)
            inserted.append(p[:n * PS])
        tree.check()
    pool.check()


def _common_pages(a: list[int], b: list[int]) -> int:
    n = 0
    while (n + 1) * PS <= min(len(a), len(b)) and a[n * PS:(n + 1) * PS] == b[n * PS:(n + 1) * PS]:
        n += 1
    return n
