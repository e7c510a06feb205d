"""Async scheduling on the CPU: a pure decode step launched on the previous step's sampled ids
while they are still on the device (LLMEngine._launch_ahead). The tokens must be exactly those of
the engine without it, through stops it learns of one step late, max_tokens, requests arriving
and aborted mid-run, preemption, seeds and penalties, with graphs (emulated) and without."""
from __future__ import annotations

import pytest

from astrai_serve.engine import LLMEngine, SamplingParams

from engine_support import prompts_of  # noqa: E402
from test_engine_runner import models, recompute_greedy, with_emulated_graphs  # noqa: E402, F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread

PROMPTS = prompts_of((3, 17, 40, 9, 33, 21, 5), seed=4)


def engine_of(model, async_scheduling, graphs=False, **kw):
    kw = dict(num_pages=80, page_size=4, max_num_seqs=8, overlap_steps=True) | kw
    engine = LLMEngine.from_model(model, None, async_scheduling=async_scheduling, **kw)
    if graphs:
        with_emulated_graphs(engine, max_batch=6)
    return engine


def drain(engine, arrivals=None, abort=None):
    """Step until done; arrivals {step: [(id, prompt, params)]} are added before that step,
    abort (step, id) aborts after it. Returns {(request id, index): token ids} of finished ones."""
    done, step = {}, 0
    while engine.has_unfinished_requests() or (arrivals and any(s >= step for s in arrivals)):
        for rid, prompt, params in (arrivals or {}).get(step, []):
            engine.add_request(rid, prompt, params)
        for o in engine.step():
            if o.finished:
                done[o.request_id, o.index] = o.token_ids
        if abort and abort[0] == step:
            engine.abort_request(abort[1])
        step += 1
    assert engine.stats().pages_in_use == 0 and engine.stats().num_running == 0
    return done


def both(model, requests, graphs=False, **kw):
    """(tokens with async scheduling, tokens without, async steps taken) for the same requests."""
    results = []
    for flag in (True, False):
        engine = engine_of(model, flag, graphs, **kw)
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        results.append((drain(engine), engine.num_async_steps))
    (on, steps_on), (off, steps_off) = results
    assert steps_off == 0
    return on, off, steps_on


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_tokens_equal_recompute(models, arch, graphs):
    model = models[arch]
    lengths = [12, 3, 9, 1, 14, 6, 10]               # sequences end at different steps (by length)
    requests = [(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0)) for i, (p, n) in
                enumerate(zip(PROMPTS, lengths))]
    on, off, ahead = both(model, requests, graphs)
    assert on == off
    assert [on[f"r{i}", 0] for i in range(len(PROMPTS))] == [
        recompute_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    assert ahead >= 5                                  # most decode steps went ahead


def test_stop_tokens_learned_one_step_late(models):
    """A sequence that stops on a stop token has already been launched one more step: that token
    is dropped, the others go on, and nothing leaks."""
    model = models["gqa"]
    free = [recompute_greedy(model, p, 12) for p in PROMPTS]
    requests = []
    for i, (p, toks) in enumerate(zip(PROMPTS, free)):
        stop = toks[2 + i % 5]                         # a token each sequence emits mid-run
        requests.append((f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop])))
    on, off, ahead = both(model, requests)
    assert on == off and ahead > 0
    for i, toks in enumerate(free):
        stop = toks[2 + i % 5]
        assert on[f"r{i}", 0] == toks[:toks.index(stop) + 1]


def test_seeded_samples_and_n_equal_the_engine_without(models):
    model = models["mla"]
    requests = [(f"s{i}", p, SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=11 + i, n=2))
                for i, p in enumerate(PROMPTS[:4])]
    on, off, ahead = both(model, requests, graphs=True)
    assert on == off and ahead > 0 and len(on) == 8


def test_arrivals_aborts_and_preemption(models):
    """Requests that arrive mid-run are admitted (the engine stops running ahead while one
    waits), an abort mid-run frees its pages, and a pool too small for everyone preempts: the
    survivors' tokens still equal a recompute."""
    model = models["gqa"]
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    arrivals = {0: [("a0", PROMPTS[0], greedy), ("a1", PROMPTS[1], greedy), ("gone", PROMPTS[2], greedy)],
                4: [("late", PROMPTS[3], greedy)], 7: [("later", PROMPTS[4], greedy)]}
    for pages in (80, 14):                             # 14 pages of 4 tokens: preemption
        engine = engine_of(model, True, num_pages=pages)
        done = drain(engine, arrivals, abort=(5, "gone"))
        assert ("gone", 0) not in done and engine.num_async_steps > 0
        for rid, i in (("a0", 0), ("a1", 1), ("late", 3), ("later", 4)):
            assert done[rid, 0] == recompute_greedy(model, PROMPTS[i], 10), (pages, rid)
    assert engine.stats().num_preemptions_total > 0


def test_penalties_are_not_run_ahead(models):
    """Penalty counts need the newest token on the host: such batches take the normal path."""
    model = models["gqa"]
    requests = [(f"p{i}", p, SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3,
                                            frequency_penalty=0.5)) for i, p in enumerate(PROMPTS[:3])]
    on, off, ahead = both(model, requests)
    assert on == off and ahead == 0
