"""RadixCache: a radix tree over token ids that maps prompt prefixes to the KV pages holding them.

Granularity is a full page: every edge carries a whole number of pages, so a cached prefix is
always `k * page_size` tokens and a sequence that reuses it never writes into a shared page (its
own tokens start on a fresh page). Children are keyed by their first page of tokens.

Ownership: the tree holds ONE pool reference on every page it stores; sequences that reuse a
prefix hold their own references and `lock` the node where their match ended. `lock_ref` counts
the sequences below a node, so a node with lock_ref 0 has no user and its pages are evictable.
`evict(n)` trims the least-recently-used unlocked leaves, page by page from their tails, until n
pages are actually free -- leaves first, so a shared prefix outlives the branches that extend it.

Evictable leaves are kept in a heap by last use, updated as nodes change (a match touches a
leaf, an unlock frees one, an eviction bares a parent), with stale entries dropped when they
surface. A full cache evicts on almost every page a decode step allocates, so finding the LRU
leaf must not walk the tree: with 10,000 leaves a walk cost 5 ms per eviction.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from .page_pool import PageAccountingError, PagePool


class RadixNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_used")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: "RadixNode | None") -> None:
        self.key = key                  # the tokens on the edge into this node (len = pages * page_size)
        self.pages = pages              # KV pages holding those tokens, in order
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0               # sequences currently using the path root..this node
        self.last_used = 0              # logical clock of the last match/insert through this node


class RadixCache:
    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self.root = RadixNode((), [], None)
        self.root.lock_ref = 1          # the root is never evicted
        self._clock = 0
        self.num_pages = 0              # pages referenced by the tree
        self.evictable_pages = 0        # pages in nodes with lock_ref == 0
        # (last_used, tie-breaker, node) of leaves that were evictable when pushed; an entry whose
        # node has since changed (used again, locked, grown a child, left the tree) is stale.
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._ties = itertools.count()

    # ---- lookups -----------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Pages of the longest cached full-page prefix of `tokens`, and the node it ends at."""
        node, pages = self._walk(tokens, len(tokens) // self.page_size)
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Cache `pages` as holding `tokens` (len(tokens) == len(pages) * page_size).

        Where the tree already holds a prefix it keeps its own pages; the new pages are stored
        (and referenced) only past that point. Returns the tree's pages for the whole prefix --
        callers may swap their duplicates for these -- and the node where it ends.
        """
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError(f"insert of {len(tokens)} tokens with {len(pages)} pages of {ps}")
        node, out = self._walk(tokens, len(pages))
        done = len(out)
        if done < len(pages):
            leaf = RadixNode(tuple(tokens[done * ps:]), list(pages[done:]), node)
            self.pool.incref(leaf.pages)
            leaf.last_used = self._clock
            node.children[leaf.key[:ps]] = leaf
            self._offer(leaf)
            self.num_pages += len(leaf.pages)
            self.evictable_pages += len(leaf.pages)
            out.extend(leaf.pages)
            node = leaf
        return out, node

    def _walk(self, tokens: Sequence[int], max_pages: int) -> tuple[RadixNode, list[int]]:
        """Follow `tokens` down the tree for at most max_pages pages, splitting at a mismatch."""
        ps = self.page_size
        self._clock += 1
        node, pages, i = self.root, [], 0
        end = max_pages * ps
        while i < end:
            child = node.children.get(tuple(tokens[i:i + ps]))
            if child is None:
                break
            n_child = len(child.pages)
            m = min(n_child, (end - i) // ps)          # pages the edge and the tokens both have
            # One tuple compare of the whole span (in C) settles the usual case, a full match;
            # page by page in Python was 70 ms of a W2 run. Only a mismatch looks for its page.
            if child.key[ps:m * ps] != tuple(tokens[i + ps:i + m * ps]):
                m = 1
                while child.key[m * ps:(m + 1) * ps] == tuple(tokens[i + m * ps:i + (m + 1) * ps]):
                    m += 1
            if m < n_child:
                child = self._split(child, m)
            child.last_used = self._clock
            self._offer(child)
            pages.extend(child.pages)
            i += m * ps
            node = child
        return node, pages

    def _split(self, node: RadixNode, n_pages: int) -> RadixNode:
        """Cut `node` after n_pages pages; returns the new upper half (which inherits its locks)."""
        ps = self.page_size
        upper = RadixNode(node.key[:n_pages * ps], node.pages[:n_pages], node.parent)
        upper.lock_ref, upper.last_used = node.lock_ref, node.last_used
        node.parent.children[upper.key[:ps]] = upper
        node.key, node.pages, node.parent = node.key[n_pages * ps:], node.pages[n_pages:], upper
        upper.children[node.key[:ps]] = node
        return upper

    # ---- locking -----------------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        """Mark root..node as in use by one more sequence (its pages stop being evictable)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise PageAccountingError("unlock of a radix node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
                self._offer(node)
            node = node.parent

    # ---- eviction ----------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Free at least n pages if possible (LRU unlocked leaves first); returns pages freed."""
        freed, heap = 0, self._heap
        while freed < n and heap:
            last_used, _, leaf = heapq.heappop(heap)
            if not self._evictable(leaf, last_used):
                continue                                    # a stale entry
            # Trim the tail first: only as many pages as still needed, the prefix stays cached.
            k = min(len(leaf.pages), n - freed)
            drop = leaf.pages[len(leaf.pages) - k:]
            freed += self.pool.decref(drop)
            self.num_pages -= k
            self.evictable_pages -= k
            if k < len(leaf.pages):
                leaf.pages = leaf.pages[:len(leaf.pages) - k]
                leaf.key = leaf.key[:len(leaf.pages) * self.page_size]
                self._offer(leaf)                           # still the LRU leaf, shorter
                continue
            parent = leaf.parent
            del parent.children[leaf.key[:self.page_size]]
            leaf.parent, leaf.pages = None, []
            self._offer(parent)                             # may now be a bare, unlocked leaf
        return freed

    def _offer(self, node: RadixNode) -> None:
        """Queue node for eviction if it is an unlocked leaf (checked again when it comes up)."""
        if node.lock_ref == 0 and not node.children and node.parent is not None:
            if len(self._heap) > 2 * self.num_pages + 1024:   # mostly stale entries: rebuild
                self._heap = [(leaf.last_used, next(self._ties), leaf) for leaf in self._leaves()
                              if leaf.lock_ref == 0]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (node.last_used, next(self._ties), node))

    def _evictable(self, node: RadixNode, last_used: int) -> bool:
        """Whether a heap entry still describes an unlocked leaf of the tree, unused since."""
        parent = node.parent
        return (node.last_used == last_used and node.lock_ref == 0 and not node.children and bool(node.pages)
                and parent is not None and parent.children.get(node.key[:self.page_size]) is node)

    def reset(self) -> None:
        """Forget every cached prefix (e.g. after the weights changed and the KV went stale).

        Nodes still locked by running sequences are detached with no pages, so their later
        unlock is harmless; those sequences keep their own page references.
        """
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            self.pool.decref(node.pages)
            node.pages, node.children = [], {}
        self.root.children = {}
        self.num_pages = 0
        self.evictable_pages = 0
        self._heap = []

    # ---- introspection -----------------------------------------------------------------------
    def _leaves(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def all_pages(self) -> list[int]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.extend(node.pages)
            stack.extend(node.children.values())
        return out

    def check(self) -> None:
        """Structural invariants (tests and debugging): key/page lengths, counters, locks."""
        ps, total, evictable = self.page_size, 0, 0
        stack = [(c, self.root) for c in self.root.children.values()]
        while stack:
            node, parent = stack.pop()
            if node.parent is not parent or not node.pages or len(node.key) != len(node.pages) * ps:
                raise PageAccountingError(f"malformed radix node {node.key[:ps]}")
            child_locks = sum(c.lock_ref for c in node.children.values())
            if node.lock_ref < child_locks:
                raise PageAccountingError("a radix node has fewer locks than its children")
            total += len(node.pages)
            evictable += len(node.pages) if node.lock_ref == 0 else 0
            for p in node.pages:
                if self.pool.refcount(p) < 1:
                    raise PageAccountingError(f"radix node holds free page {p}")
            stack.extend((c, node) for c in node.children.values())
        if total != self.num_pages or evictable != self.evictable_pages:
            raise PageAccountingError(f"radix counters off: pages {self.num_pages} vs {total}, "
                                      f"evictable {self.evictable_pages} vs {evictable}")
