"""Cascade attention plans: which sequences of a decode batch hold a prompt prefix in the same pages.

Many sequences of a batch often start with the same tokens held in the same cache pages: a
system prompt from the prefix cache (every request of W2), or the prompt of a GRPO group (its n
samples share the prompt's pages). Attention then reads that prefix once per *chunk* of such
sequences instead of once per sequence: the Triton prefix kernel gives one program the query
rows of up to `max_chunk_seqs` sequences for one kv head, so each shared key is loaded once for
all of them, and the per-sequence kernel starts after that sequence's shared part. The split-K
merge combines both.

The plan is one int tensor, laid out so a CUDA graph can hold it in a fixed-size buffer:

    [ shared[S] | first[C] | count[C] | chunk_shared[C] ]

shared[s] is how many leading tokens of sequence s its chunk attends for it (0: none; always
whole pages, below its context length); chunk c covers sequences first[c] .. first[c]+count[c]-1
(count 0: an unused slot), which all hold their first chunk_shared[c] tokens in the pages of
sequence first[c]. Chunks take consecutive sequences, so a group must sit together in the
batch, as the scheduler keeps the samples of one request.

The planner is numpy on the host page tables (~20 µs for 256 sequences): neighbours' common
leading pages, runs of sequences linked by at least one page, runs cut into chunks.
"""
from __future__ import annotations

import numpy as np
import torch

# Query rows (sequences x query heads per kv head) of one prefix program: room for a chunk of
# CHUNK_SEQS sequences, at most PREFIX_BLOCK_ROWS. Measured on an H200 (kernels/NOTES.md, qwen3-0.6b,
# 2 query heads per kv head): 16 rows (8 sequences) beat 32 and 64 both behind 8-sample GRPO
# prompts (111 vs 158 µs a layer) and behind one 2,000-token prompt (141 vs 160 µs).
CHUNK_SEQS = 8
PREFIX_BLOCK_ROWS = 64
PREFIX_BLOCK_ROWS_WIDE = 16   # keys wider than 256 channels (MLA): registers


def prefix_block_rows(k_dim: int, group: int) -> int:
    if k_dim > 256:
        return PREFIX_BLOCK_ROWS_WIDE
    return min(PREFIX_BLOCK_ROWS, max(16, 1 << (CHUNK_SEQS * group - 1).bit_length()))


def max_chunk_seqs(group: int, k_dim: int) -> int:
    """Most sequences one prefix program takes: its rows over the query heads per kv head."""
    return max(1, prefix_block_rows(k_dim, group) // group)


def plan_cascade(tables: np.ndarray, context_lens: np.ndarray, page_size: int, max_seqs: int,
                 capacity: int | None = None) -> tuple[np.ndarray, int]:
    """(plan int64 [S + 3C], key reads saved per layer and kv head) for page tables [S, W].

    C is `capacity` (a graph's fixed slot count; chunks beyond it are dropped) or the number of
    chunks found. A chunk has at least two sequences (one alone saves nothing)."""
    s = len(context_lens)
    shared = np.zeros(s, dtype=np.int64)
    chunks: list[tuple[int, int, int]] = []
    if s >= 2 and max_seqs >= 2:
        limit = (context_lens.astype(np.int64) - 1) // page_size       # whole pages below the context
        width = int(min(tables.shape[1], max(int(limit.max()), 0)))
        same = tables[1:, :width] == tables[:-1, :width]
        links = np.cumprod(same, axis=1).sum(axis=1) if width else np.zeros(s - 1, dtype=np.int64)
        links = np.minimum(links, np.minimum(limit[1:], limit[:-1]))   # pages s-1 and s share
        start = 0
        for cut in [*np.flatnonzero(links <= 0).tolist(), s - 1]:      # runs of linked neighbours
            end = cut + 1                                              # sequences [start, end)
            for first in range(start, end - 1, max_seqs):
                last = min(first + max_seqs, end)
                if last - first >= 2:
                    pages = int(links[first:last - 1].min())
                    chunks.append((first, last - first, pages * page_size))
            start = end
    if capacity is not None:
        chunks = chunks[:capacity]
    c = len(chunks) if capacity is None else capacity
    plan = np.zeros(s + 3 * c, dtype=np.int64)
    saved = 0
    for j, (first, count, tokens) in enumerate(chunks):
        shared[first:first + count] = tokens
        plan[s + j], plan[s + c + j], plan[s + 2 * c + j] = first, count, tokens
        saved += tokens * (count - 1)
    plan[:s] = shared
    return plan, saved


def check_cascade(plan: torch.Tensor, page_table: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                  max_seqs: int) -> None:
    """Raise unless `plan` keeps the promise the kernels rely on (the torch reference calls this,
    so an engine test on the CPU fails loudly on a wrong plan)."""
    s = context_lens.shape[0]
    plan = plan.reshape(-1).long().cpu()
    if plan.numel() < s or (plan.numel() - s) % 3:
        raise ValueError(f"cascade plan of {plan.numel()} entries does not fit {s} sequences "
                         "(want S + 3 x chunks)")
    c = (plan.numel() - s) // 3
    shared, first, count, tokens = plan[:s], plan[s:s + c], plan[s + c:s + 2 * c], plan[s + 2 * c:]
    ctx, table = context_lens.long().cpu(), page_table.cpu()
    covered = torch.zeros(s, dtype=torch.long)
    for j in range(c):
        n, f, t = int(count[j]), int(first[j]), int(tokens[j])
        if n == 0:
            continue
        if not (2 <= n <= max_seqs and 0 <= f and f + n <= s) or t <= 0 or t % page_size:
            raise ValueError(f"cascade chunk {j} (first {f}, count {n}, shared {t}) is malformed: at most "
                             f"{max_seqs} of the {s} sequences, sharing whole pages of {page_size} tokens")
        members = slice(f, f + n)
        if bool((shared[members] != t).any()) or bool((ctx[members] <= t).any()):
            raise ValueError(f"cascade chunk {j}: its sequences must have shared={t} below their context lengths")
        pages = table[members, : t // page_size]
        if not bool((pages == pages[:1]).all()):
            raise ValueError(f"cascade chunk {j}: sequences {f}..{f + n - 1} do not share their first "
                             f"{t // page_size} pages")
        covered[members] += 1
    if bool(((shared != 0) & (covered != 1)).any()) or bool((covered > 1).any()):
        raise ValueError("cascade plan: every sequence with a shared prefix must be in exactly one chunk")


def graph_plan_len(batch: int) -> int:
    """Entries of the plan a CUDA graph of `batch` rows holds: a slot for every possible chunk."""
    return batch + 3 * (batch // 2)


def pad_plan(plan: np.ndarray | None, n_seqs: int, batch: int) -> np.ndarray:
    """`plan` for n_seqs sequences laid out for a graph of `batch` rows (padding rows and unused
    chunk slots zero); None gives the all-zero plan (cascade off)."""
    out = np.zeros(graph_plan_len(batch), dtype=np.int64)
    if plan is None:
        return out
    c, cap = (len(plan) - n_seqs) // 3, batch // 2
    if c > cap:
        raise ValueError(f"a plan of {c} chunks does not fit a graph of batch {batch} ({cap} slots)")
    out[:n_seqs] = plan[:n_seqs]
    for k in range(3):
        out[batch + k * cap:batch + k * cap + c] = plan[n_seqs + k * c:n_seqs + (k + 1) * c]
    return out
