"""KVCacheManager: page tables of sequences over the PagePool, with the RadixCache in front.

The three ways a sequence gets pages:
- `match`: at admission, reuse the pages of the longest cached full-page prefix of its tokens
  (always leaving the newest token to compute, since its logits are what the step is for; none
  for a sequence that scores its prompt, see prompt_logprobs.py);
- `ensure`: before a step, allocate fresh pages to cover the tokens it will compute, evicting
  unused cached prefixes if the free list is short;
- `share`: without a prefix cache, sample k>0 of a request borrows sample 0's full prompt pages.
and two ways it gives them back: `publish` (prefill done: the full pages enter the tree so
concurrent requests and sibling samples can reuse them) and `release` (finish, abort, preempt).
"""
from __future__ import annotations

from .page_pool import PagePool
from .radix_cache import RadixCache
from .sequence import Sequence, SeqStatus


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be a positive integer")
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.tree = RadixCache(self.pool, page_size) if enable_prefix_cache else None

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def num_available(self) -> int:
        """Pages a new allocation could get: free ones plus unused cached ones."""
        return self.pool.num_free + (self.tree.evictable_pages if self.tree else 0)

    def num_cached_only(self) -> int:
        """Pages held by the prefix cache and nobody else (reclaimable, not in use). O(1): a
        sequence holding a tree page always locks its node, so these are the unlocked pages."""
        return self.tree.evictable_pages if self.tree is not None else 0

    # ---- acquiring ---------------------------------------------------------------------------
    def match(self, seq: Sequence) -> int:
        """Reuse cached pages for seq's prefix; returns the number of tokens reused."""
        if seq.page_table or seq.cache_node is not None:
            raise RuntimeError(f"sequence {seq.seq_id} already holds pages")
        ps, parent = self.page_size, seq.share_from
        if self.tree is not None:
            # A sequence scoring its prompt needs the hidden state of every prompt position, which
            # cached tokens do not have: it computes them all (and still publishes its pages).
            pages, node = self.tree.match_prefix(() if seq.score_prompt else seq.token_ids[:-1])
            self.pool.incref(pages)
            self.tree.lock(node)
            seq.cache_node = node
        elif (parent is not None and parent.status is SeqStatus.RUNNING
              and parent.num_computed >= seq.num_prompt_tokens):
            # Only the prompt is common to siblings; whole pages only (the tail page gets written).
            pages = parent.page_table[:(seq.num_prompt_tokens - 1) // ps]
            self.pool.incref(pages)
        else:
            pages = []
        seq.page_table = list(pages)
        seq.num_computed = len(pages) * ps
        return seq.num_computed

    def ensure(self, seq: Sequence, n_tokens: int) -> bool:
        """Make seq's page table cover n_tokens tokens; False (and no change) if pages ran out."""
        need = self.pages_for(n_tokens) - len(seq.page_table)
        if need <= 0:
            return True
        if self.pool.num_free < need and self.tree is not None:
            self.tree.evict(need - self.pool.num_free)
        if self.pool.num_free < need:
            return False
        seq.page_table.extend(self.pool.alloc(need))
        return True

    # ---- giving back -------------------------------------------------------------------------
    def publish(self, seq: Sequence) -> None:
        """Put seq's computed full pages into the prefix cache and lock them for seq.

        Where the tree already had those tokens (another request computed them concurrently),
        seq switches to the tree's pages and frees its duplicates: same K/V, fewer pages.
        """
        if self.tree is None:
            return
        n = seq.num_computed // self.page_size
        if n == 0:
            return
        tree_pages, node = self.tree.insert(seq.token_ids[:n * self.page_size], seq.page_table[:n])
        for i, p in enumerate(tree_pages):
            if p != seq.page_table[i]:
                self.pool.incref([p])
                self.pool.decref([seq.page_table[i]])
                seq.page_table[i] = p
        self.tree.lock(node)
        if seq.cache_node is not None:
            self.tree.unlock(seq.cache_node)
        seq.cache_node = node

    def release(self, seq: Sequence, cache: bool = True) -> None:
        """Drop all of seq's pages (keeping its computed prefix cached when `cache`)."""
        if cache:
            self.publish(seq)
        if seq.cache_node is not None:
            self.tree.unlock(seq.cache_node)
            seq.cache_node = None
        self.pool.decref(seq.page_table)
        seq.page_table = []
        seq.num_computed = 0

    def reset_prefix_cache(self) -> None:
        if self.tree is not None:
            self.tree.reset()
