"""Scheduler: the CPU state machine that decides, each step, which tokens get computed.

Pure Python over sequences and pages (no tensors), so it is unit-tested without a model. A step
plan is a list of (sequence, first position, token count) chunks under a token budget:

1. Running sequences, decodes first (one token each, so a long prefill cannot stall them), then
   running prefills, oldest first, each taking as much of the remaining budget as it needs
   (chunked prefill). When a sequence needs a page and none is left, the NEWEST running
   sequence not yet in this step is preempted -- its pages freed (its computed prefix stays in
   the prefix cache, so the recompute is often a cache hit) and it goes back to the front of
   the queue. The oldest sequence can therefore always proceed: since admission rejects any
   sequence longer than the whole pool, a request the pool could serve alone is never failed.
2. If nothing was preempted, waiting sequences are admitted in order while budget, slots and
   pages last; an admission never preempts anything.
3. The step's decodes are then reordered so those starting in the same page sit side by side
   (what cascade attention needs); pages were already handed out oldest first.

Samples 1..n-1 of a request wait until sample 0 has prefilled the prompt and then reuse its
full prompt pages (through the prefix cache, or directly when the cache is off). Likewise, with
the prefix cache on, a waiting request whose next uncached page is what a running prefill is
computing right now waits for that prefill to publish it (and later ones are admitted past it):
256 requests arriving together behind one system prompt compute that prompt once, not once per
request admitted in the same step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from .kv_manager import KVCacheManager
from .sequence import Sequence, SeqStatus


_arrival = attrgetter("arrival")


class ScheduledChunk(NamedTuple):
    # A NamedTuple, not a frozen dataclass: 256 of these are built every step, and a frozen
    # dataclass's __init__ costs several times a tuple's.
    seq: Sequence
    start: int         # position of the first token computed (== seq.num_computed when planned)
    num_tokens: int    # tokens computed this step: token_ids[start:start + num_tokens]
    samples: bool      # the chunk ends at the newest token, so its logits yield a new token


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def sampling(self) -> list[ScheduledChunk]:
        return [c for c in self.chunks if c.samples]


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_seq_len: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs                      # running sequences at most
        self.max_num_batched_tokens = max_num_batched_tokens  # tokens computed per step at most
        # Longest sequence (prompt + output) that can run: the model's context, and never more
        # than the pool holds, so one sequence alone always fits.
        self.max_seq_len = min(max_seq_len, kv.num_pages * kv.page_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.prefix_cache_hit_tokens_total = 0

    # ---- requests in and out -----------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Admission control: reject what could never run, at add time rather than by hanging."""
        if num_prompt_tokens < 1:
            raise ValueError("prompt is empty: at least one token is needed")
        if num_prompt_tokens >= self.max_seq_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens but at most {self.max_seq_len - 1} fit "
                f"(max_seq_len={self.max_seq_len}: the model context, capped by the KV pool of "
                f"{self.kv.num_pages} pages x {self.kv.page_size} tokens, with room for one "
                f"generated token)")

    def add(self, samples: list[Sequence]) -> None:
        """Queue the samples of one request; samples after the first wait for its prefill."""
        self.check_prompt(samples[0].num_prompt_tokens)
        first, rest = samples[0], samples[1:]
        for s in rest:
            s.share_from = first
        first.pending_siblings = list(rest)
        self.waiting.append(first)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (done, stopped or aborted): its pages go back, its prefix stays cached."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.share_from is not None and seq in seq.share_from.pending_siblings:
            seq.share_from.pending_siblings.remove(seq)
        if seq.pending_siblings:   # aborted before its prefill: the siblings go on alone
            self.waiting.extendleft(reversed(seq.pending_siblings))
            seq.pending_siblings = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(s.pending_siblings) for s in self.waiting) + sum(
            len(s.pending_siblings) for s in self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        taken: set[int] = set()
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for s in sorted(self.running, key=_arrival):
            (prefills if len(s.token_ids) - s.num_computed > 1 else decodes).append(s)
        running, ps = SeqStatus.RUNNING, self.kv.page_size
        chunks, ensure = plan.chunks, self.kv.ensure
        n_decodes = len(decodes)
        decode_chunks = 0
        for i, seq in enumerate(decodes + prefills):
            if budget == 0:
                break
            if seq.status is not running:   # preempted earlier in this loop
                continue
            n = len(seq.token_ids)
            q = min(n - seq.num_computed, budget)
            end = seq.num_computed + q
            # (the first test is kv.ensure's own fast path, inlined: the pages already cover end)
            while len(seq.page_table) * ps < end and not ensure(seq, end):
                victim = max((s for s in self.running if s.seq_id not in taken), key=lambda s: s.arrival)
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed, q, end == n))
                taken.add(seq.seq_id)
                budget -= q
                decode_chunks += i < n_decodes
        if decode_chunks > 1:
            # Pages went out oldest first (so the oldest always proceeds); the batch then puts
            # decodes that start in the same page side by side (a cached system prompt, a
            # request's n samples), so cascade attention finds them as one run of neighbours
            # even when the requests behind one prompt arrived apart. Sorted only when some share
            # a page (the check costs ~0.05 ms for 256 decodes on a laptop-class CPU core).
            firsts = [c.seq.page_table[0] for c in chunks[:decode_chunks]]   # a decode holds pages
            if len(set(firsts)) < decode_chunks:
                order = sorted(range(decode_chunks), key=firsts.__getitem__)
                chunks[:decode_chunks] = [chunks[i] for i in order]
        if not plan.preempted:
            budget = self._admit(plan, budget)
        if not plan.chunks and self.waiting and not self.running:
            # Cannot happen if admission control is right; fail loudly instead of spinning.
            raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, none admissible "
                               f"with {self.kv.num_available()} pages available")
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> int:
        prefilling = [s for s in self.running if not s.published] if self.kv.tree is not None else None
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            matched = self.kv.match(seq)
            if prefilling and self._prefix_in_flight(seq, prefilling):
                self.kv.release(seq, cache=False)
                deferred.append(seq)
                continue
            q = min(seq.num_to_compute, budget)
            if not self.kv.ensure(seq, seq.num_computed + q):
                self.kv.release(seq, cache=False)
                self.waiting.appendleft(seq)
                break
            if prefilling is not None:
                prefilling.append(seq)
            seq.status = SeqStatus.RUNNING
            seq.published = False
            self.running.append(seq)
            if not seq.ever_admitted:
                seq.ever_admitted = True
                seq.cached_tokens = min(matched, seq.num_prompt_tokens)
                self.prefix_cache_hit_tokens_total += seq.cached_tokens
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, q, seq.num_computed + q == seq.num_tokens))
            budget -= q
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _prefix_in_flight(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether seq's first uncached page (a full one, so it could come from the cache) is
        being computed by a running prefill that has not published yet."""
        start, ps = seq.num_computed, self.kv.page_size
        end = start + ps
        if end >= seq.num_tokens or seq.score_prompt:   # the tail page is never shared; a scoring
            return False                                 # sequence takes nothing from the cache
        page = seq.token_ids[start:end]
        return any(s.num_tokens > end and s.token_ids[start:end] == page for s in prefilling)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1

    def update(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Apply a finished step: advance computed counts, append the sampled tokens.

        `sampled` holds one token per chunk of `plan.sampling`, in order. Returns the sequences
        that got a new token (the engine then checks their stop conditions), and those with
        max_tokens=0 whose prompt is now computed (they get none, and are done).
        """
        grew: list[Sequence] = []
        tokens = iter(sampled)
        for c in plan.chunks:
            token = next(tokens) if c.samples else None
            seq = c.seq
            if seq.status is not SeqStatus.RUNNING:
                continue   # aborted between schedule and update
            seq.num_computed = c.start + c.num_tokens
            if token is None:
                continue
            if seq.published or seq.params.max_tokens:
                seq.token_ids.append(token)
            # else max_tokens=0: the prompt is in (and scored); the sampled token is dropped and
            # the engine finishes the sequence with nothing generated
            if not seq.published:      # a prefill (or recompute) completed: share its pages
                self.kv.publish(seq)
                seq.published = True
            if seq.pending_siblings:
                self.waiting.extendleft(reversed(seq.pending_siblings))
                seq.pending_siblings = []
            grew.append(seq)
        return grew
