"""Prompt log-probs (SamplingParams.prompt_logprobs) and max_tokens=0 on tiny random models: equal
to a full forward of the model whether the prompt is prefilled in one step, over chunked-prefill
steps, after preemption, or after it was cached; shared by the n samples; off by default."""
from __future__ import annotations

import pytest
import torch

from astrai_serve.engine import LLM, LLMEngine, SamplingParams

from engine_support import GQA, model_of, prompts_of

pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread


@pytest.fixture(scope="module")
def models():
    return {arch: model_of(arch) for arch in ("gqa", "mla")}


PROMPTS = prompts_of((40, 17, 2, 33), seed=4)


@torch.no_grad()
def full_forward(model, prompt):
    """log_softmax of the logits at positions 0..L-2, the reference the engine must match."""
    return model(torch.tensor([prompt]))[0, :-1].float().log_softmax(-1)


def check(model, prompt, got, k):
    ref = full_forward(model, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for p, (tok, lp, top) in enumerate(got[1:]):
        assert tok == prompt[p + 1]
        assert lp == pytest.approx(ref[p, tok].item(), rel=5e-5, abs=1e-4)   # float32 sums in another order
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        ref_v, ref_i = ref[p].topk(k)
        assert [t for t, _ in top] == ref_i.tolist()
        assert values == pytest.approx(ref_v.tolist(), rel=5e-5, abs=1e-4)
        if top and top[0][0] == tok:   # the greedy check lm-eval makes compares these floats exactly
            assert top[0][1] == lp


SETUPS = {
    "one-step": dict(num_pages=64, page_size=4),
    "chunked-prefill": dict(num_pages=64, page_size=4, max_num_batched_tokens=7),
    "tiny-pool-chunked": dict(num_pages=13, page_size=4, max_num_batched_tokens=16),  # preempts
    "no-prefix-cache": dict(num_pages=64, page_size=4, enable_prefix_cache=False),
}


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_prompt_logprobs_equal_a_full_forward(models, arch, setup):
    model = models[arch]
    llm = LLM.from_model(model, None, **SETUPS[setup])
    params = [SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=k) for k in (3, 0, 2, 1)]
    results = llm.generate(PROMPTS, params)
    for prompt, p, res in zip(PROMPTS, params, results):
        check(model, prompt, res.prompt_logprobs, p.prompt_logprobs)
        assert res.cached_tokens == 0 and res.completion_tokens == 5
    # Generation is what it is without scoring (the scored rows change nothing else).
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0.0))
    assert [r.token_ids for r in plain] == [r.token_ids for r in results]
    assert all(r.prompt_logprobs is None for r in plain)
    stats = llm.engine.stats()
    if setup.startswith("tiny-pool"):
        assert stats.num_preemptions_total > 0
    assert stats.pages_in_use == 0 and not llm.engine._scoring


def test_a_cached_prompt_is_scored_in_full_and_stays_cached(models):
    model = models["gqa"]
    llm = LLM.from_model(model, None, num_pages=64, page_size=4, max_num_batched_tokens=16)
    prompt = PROMPTS[0]
    first = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert first.cached_tokens == 0 and first.prompt_logprobs is None
    scored = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))[0]
    assert scored.cached_tokens == 0          # the cache has no hidden states: computed anew
    check(model, prompt, scored.prompt_logprobs, 2)
    assert scored.token_ids == first.token_ids
    again = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert again.cached_tokens == 36 and again.token_ids == first.token_ids   # 9 full pages of 40 tokens


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(models):
    model = models["gqa"]
    engine = LLMEngine.from_model(model, None, num_pages=64, page_size=4)
    engine.add_request("score", PROMPTS[1], SamplingParams(max_tokens=0, prompt_logprobs=1, n=2, logprobs=True))
    engine.add_request("plain", PROMPTS[3], SamplingParams(max_tokens=0))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert sorted((o.request_id, o.index) for o in outs) == [("plain", 0), ("score", 0), ("score", 1)]
    for o in outs:
        assert o.finished and o.finish_reason == "length" and o.token_ids == [] and o.new_token_ids == []
        assert o.text == "" and o.completion_tokens == 0 and not o.logprobs
        if o.request_id == "score":
            check(model, PROMPTS[1], o.prompt_logprobs, 1)   # every sample gets them
        else:
            assert o.prompt_logprobs is None
    stats = engine.stats()
    assert stats.generation_tokens_total == 0 and stats.pages_in_use == 0


def test_streamed_prompt_logprobs_come_once_with_the_first_output(models):
    engine = LLMEngine.from_model(models["gqa"], None, num_pages=64, page_size=4)
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=4, temperature=1.0, seed=3, n=2,
                                                       prompt_logprobs=0, logprobs=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    for index in (0, 1):
        mine = [o for o in outs if o.index == index]
        assert len(mine) == 4 and mine[0].prompt_logprobs is not None
        assert all(o.prompt_logprobs is None for o in mine[1:])
        assert [lp[0] for lp in mine[0].prompt_logprobs[1:]] == PROMPTS[0][1:]


def test_scoring_chunks_bound_the_logits(models):
    """The LM head over a long prompt runs in chunks of rows: the same values, one chunk or many."""
    from astrai_serve.engine.prompt_logprobs import PromptSpan, score
    from astrai_serve.engine.sequence import Sequence

    model = models["gqa"]
    prompt = PROMPTS[0]
    seq = Sequence(0, "r", 0, list(prompt), len(prompt), SamplingParams(prompt_logprobs=3))
    hidden = torch.randn(len(prompt) - 1, GQA.dim)
    spans = [PromptSpan(seq, 0, 20, 0), PromptSpan(seq, 20, len(prompt) - 21, 20)]
    whole = score(model, hidden, spans).result()
    pieces = score(model, hidden, spans, max_chunk_elements=3 * GQA.vocab_size).result()   # 3 rows a chunk
    assert [len(s) for s in whole] == [20, len(prompt) - 21]
    for a, b in zip(whole, pieces):
        for (ta, la, xa), (tb, lb, xb) in zip(a, b):
            assert ta == tb and la == pytest.approx(lb, abs=1e-5) and [t for t, _ in xa] == [t for t, _ in xb]


def test_prompt_logprobs_off_by_default(models):
    engine = LLMEngine.from_model(models["gqa"], None, num_pages=64, page_size=4)
    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 3 and all(o.prompt_logprobs is None for o in outs)
    assert not engine._scoring and engine._requests == {}
