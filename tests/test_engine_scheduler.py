"""Scheduler without a model: a fake KV store checks every step's plan.

The fake model writes, for each computed token, a fingerprint of its whole prefix into the slot
the page table names; before computing a chunk it checks that every earlier slot of the
sequence holds the right fingerprint. So a wrong page table, a shared page written twice, a
stale prefix-cache hit or a lost page after preemption all fail the run, and the "sampled"
token (a function of the prefix) makes the final outputs comparable with a plain loop.
"""
from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from astrai_serve.engine.kv_manager import KVCacheManager
from astrai_serve.engine.sampling_params import SamplingParams
from astrai_serve.engine.scheduler import Scheduler
from astrai_serve.engine.sequence import Sequence

VOCAB = 7


def next_token(prefix: list[int], index: int) -> int:
    return hash((tuple(prefix), index)) % VOCAB


def reference(prompt: list[int], max_tokens: int, index: int, max_seq_len: int) -> list[int]:
    toks = list(prompt)
    while len(toks) - len(prompt) < max_tokens and len(toks) < max_seq_len:
        toks.append(next_token(toks, index))
    return toks[len(prompt):]


class FakeEngine:
    def __init__(self, num_pages=64, page_size=4, budget=64, max_seqs=8, prefix_cache=True,
                 max_seq_len=10_000):
        self.kv = KVCacheManager(num_pages, page_size, prefix_cache)
        self.sched = Scheduler(self.kv, max_seqs, budget, max_seq_len)
        self.store: list[object] = [None] * (num_pages * page_size)
        self.ids = itertools.count()
        self.seqs: dict[str, list[Sequence]] = {}
        self.max_pages_in_use = 0

    def add(self, rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> list[Sequence]:
        params = SamplingParams(max_tokens=max_tokens, n=n)
        samples = [Sequence(seq_id=next(self.ids), request_id=rid, index=i, token_ids=list(prompt),
                            num_prompt_tokens=len(prompt), params=params, arrival=next(self.ids))
                   for i in range(n)]
        self.sched.add(samples)
        self.seqs[rid] = samples
        return samples

    def slot(self, seq: Sequence, t: int) -> int:
        ps = self.kv.page_size
        return seq.page_table[t // ps] * ps + t % ps

    def step(self):
        plan = self.sched.schedule()
        assert plan.num_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        sampled = []
        for c in plan.chunks:
            seq = c.seq
            assert c.start == seq.num_computed and len(seq.page_table) * self.kv.page_size >= c.start + c.num_tokens
            for t in range(c.start):
                assert self.store[self.slot(seq, t)] == tuple(seq.token_ids[:t + 1]), "stale or lost KV"
            for t in range(c.start, c.start + c.num_tokens):
                page = seq.page_table[t // self.kv.page_size]
                assert self.kv.pool.refcount(page) == 1, "writing into a shared page"
                self.store[self.slot(seq, t)] = tuple(seq.token_ids[:t + 1])
            if c.samples:
                sampled.append(next_token(seq.token_ids, seq.index))
        for seq in self.sched.update(plan, sampled):
            if seq.num_completion_tokens >= seq.params.max_tokens or seq.num_tokens >= self.sched.max_seq_len:
                self.sched.finish(seq, "length")
        used = self.kv.pool.num_used - self.kv.num_cached_only()
        self.max_pages_in_use = max(self.max_pages_in_use, used)
        self.kv.pool.check()
        if self.kv.tree is not None:
            self.kv.tree.check()
            tree_only = sum(1 for p in self.kv.tree.all_pages() if self.kv.pool.refcount(p) == 1)
            assert self.kv.num_cached_only() == tree_only
        return plan

    def run(self, max_steps=5000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")

    def assert_clean(self):
        assert self.kv.pool.num_used == self.kv.num_cached_only(), "pages still in use"
        if self.kv.tree is not None:
            self.kv.tree.evict(self.kv.num_pages)
        assert self.kv.pool.num_free == self.kv.num_pages


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_pages=st.integers(6, 40), page_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(1, 24), max_seqs=st.integers(1, 6), prefix_cache=st.booleans())
def test_random_workloads_match_reference(data, num_pages, page_size, budget, max_seqs, prefix_cache):
    eng = FakeEngine(num_pages, page_size, budget, max_seqs, prefix_cache)
    base = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=12))
    reqs = []
    for i in range(data.draw(st.integers(1, 6))):
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10))
        prompt = (base + tail)[: eng.sched.max_seq_len - 1]
        reqs.append((str(i), prompt, data.draw(st.integers(1, 8)), data.draw(st.integers(1, 3))))
    pending = list(reqs)
    arrivals = random.Random(data.draw(st.integers(0, 2**32)))
    while pending or eng.sched.has_unfinished():   # requests arrive while others run
        if pending and arrivals.random() < 0.4:
            rid, prompt, mt, n = pending.pop(0)
            eng.add(rid, prompt, mt, n)
        elif eng.sched.has_unfinished():
            eng.step()
    for rid, prompt, mt, n in reqs:
        for seq in eng.seqs[rid]:
            assert seq.completion_ids == reference(prompt, mt, seq.index, eng.sched.max_seq_len)
    eng.assert_clean()


def test_small_pool_preempts_and_still_matches():
    eng = FakeEngine(num_pages=10, page_size=2, budget=32, max_seqs=8)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 8))] for _ in range(6)]
    for i, p in enumerate(prompts):
        eng.add(str(i), p, 8)
    eng.run()
    assert eng.sched.num_preemptions_total > 0
    for i, p in enumerate(prompts):
        assert eng.seqs[str(i)][0].completion_ids == reference(p, 8, 0, 10_000)
    assert eng.max_pages_in_use <= 10
    eng.assert_clean()


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    eng = FakeEngine(budget=5, page_size=4)
    eng.add("short", [1, 2], 20)
    eng.step()                       # prefill "short"
    eng.add("long", list(range(7)) * 3, 2)
    plan = eng.step()
    assert [(c.seq.request_id, c.num_tokens, c.samples) for c in plan.chunks] == [
        ("short", 1, True), ("long", 4, False)]
    eng.run()
    assert eng.seqs["long"][0].completion_ids == reference(list(range(7)) * 3, 2, 0, 10_000)


def test_prefix_cache_hits_are_counted():
    eng = FakeEngine(page_size=4)
    shared = list(range(1, 7)) * 2               # 12 tokens = 3 pages
    eng.add("a", shared + [1], 2)
    eng.run()
    b = eng.add("b", shared + [2], 2)[0]
    eng.run()
    assert b.cached_tokens == 12 and eng.sched.prefix_cache_hit_tokens_total == 12
    assert b.completion_ids == reference(shared + [2], 2, 0, 10_000)


def test_requests_behind_one_system_prompt_compute_it_once():
    """Arriving together, the followers wait for the first prefill to publish the shared pages
    (an unrelated request is admitted past them), then hit the cache."""
    eng = FakeEngine(page_size=4, budget=64, max_seqs=8)
    system = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]           # 3 pages
    a = eng.add("a", system + [1, 2], 3)[0]
    followers = [eng.add(f"f{i}", system + [i, 2, 3], 3)[0] for i in range(3)]
    other = eng.add("o", [6, 5, 4, 3, 2, 1, 6], 3)[0]
    first = eng.step()
    assert [c.seq for c in first.chunks] == [a, other]      # followers deferred, not recomputing
    second = eng.step()
    assert {c.seq.request_id for c in second.chunks if c.num_tokens > 1} == {"f0", "f1", "f2"}
    eng.run()
    assert all(f.cached_tokens == 12 for f in followers)
    assert eng.sched.prefix_cache_hit_tokens_total == 36
    for i, f in enumerate(followers):
        assert f.completion_ids == reference(system + [i, 2, 3], 3, 0, 10_000)
    eng.assert_clean()


def test_n_samples_share_prompt_pages():
    for prefix_cache in (True, False):
        eng = FakeEngine(page_size=4, prefix_cache=prefix_cache)
        prompt = list(range(1, 7)) * 2 + [3]     # 13 tokens: 3 full pages + 1
        samples = eng.add("r", prompt, 6, n=3)
        for _ in range(3):
            eng.step()
        assert all(s.page_table for s in samples)
        shared = samples[0].page_table[:3]
        for s in samples[1:]:
            assert s.page_table[:3] == shared and s.page_table[3] != samples[0].page_table[3]
        tree_ref = 1 if prefix_cache else 0
        assert all(eng.kv.pool.refcount(p) == 3 + tree_ref for p in shared)
        assert eng.kv.pool.num_used == 3 + 3          # 3 shared pages + one own tail page each
        eng.run()
        for s in samples:
            assert s.completion_ids == reference(prompt, 6, s.index, 10_000)
        assert len({tuple(s.completion_ids) for s in samples}) > 1
        eng.assert_clean()


def test_admission_control_and_context_end():
    eng = FakeEngine(num_pages=4, page_size=4, max_seq_len=100)
    assert eng.sched.max_seq_len == 16                # capped by the pool
    with pytest.raises(ValueError, match="prompt has 16 tokens but at most 15 fit"):
        eng.add("big", [1] * 16, 1)
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add("empty", [], 1)
    seq = eng.add("edge", [1] * 15, 50)[0]           # runs alone until the context is full
    eng.run()
    assert seq.num_tokens == 16 and seq.finish_reason == "length"
    eng.assert_clean()


def test_abort_frees_pages_and_releases_waiting_siblings():
    eng = FakeEngine(page_size=2)
    a = eng.add("a", [1, 2, 3, 4, 5], 50, n=2)
    b = eng.add("b", [5, 4, 3], 50)
    eng.step()
    eng.step()
    assert eng.kv.pool.num_used > 0
    for s in a:
        eng.sched.finish(s, "abort")
    eng.sched.finish(b[0], "abort")
    assert not eng.sched.has_unfinished() and eng.sched.num_waiting == 0
    eng.assert_clean()
    # Aborting sample 0 before its prefill lets the other samples run on their own.
    c = eng.add("c", [1, 2, 3], 3, n=2)
    eng.sched.finish(c[0], "abort")
    eng.run()
    assert c[1].completion_ids == reference([1, 2, 3], 3, 1, 10_000)
    eng.assert_clean()


def test_siblings_share_after_chunked_prefill_ending_in_one_token():
    eng = FakeEngine(page_size=4, budget=4)
    prompt = list(range(1, 7)) * 2 + [3]         # 13 tokens: chunks of 4, 4, 4 and 1
    samples = eng.add("r", prompt, 3, n=2)
    for _ in range(4):
        eng.step()
    assert samples[0].num_tokens == 14 and not samples[1].page_table
    eng.step()                                   # sample 1 joins, reusing 3 pages
    assert samples[1].cached_tokens == 12 and samples[1].page_table[:3] == samples[0].page_table[:3]
    eng.run()
    assert samples[1].completion_ids == reference(prompt, 3, 1, 10_000)
    eng.assert_clean()
