"""LLMEngine on tiny random models: greedy parity with full recomputation, prefix cache, preemption,
n > 1 page sharing, seeded sampling across batch compositions, page accounting after finish/abort."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from astrai_serve.engine import LLM, LLMEngine, SamplingParams
from astrai_train.model import ModelConfig, Transformer

from engine_support import GQA, GREEDY, MLA  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread


def build(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def gqa():
    return build(GQA)


@pytest.fixture(scope="module")
def mla():
    return build(MLA)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of((3, 17, 40, 9, 33, 21))


@torch.no_grad()
def recompute_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


_REF: dict = {}


def reference(model, prompts, n=10):
    return [_REF.setdefault((id(model), tuple(p), n), recompute_greedy(model, p, n)) for p in prompts]


def run_all(engine: LLMEngine, prompts, params=GREEDY, ids=None):
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[(out.request_id, out.index)] = out
    return [done[(rid, 0)] for rid in ids]


SETUPS = {
    "default": dict(num_pages=64, page_size=4),
    "no-prefix-cache": dict(num_pages=64, page_size=4, enable_prefix_cache=False),
    "chunked-prefill": dict(num_pages=64, page_size=4, max_num_batched_tokens=7),
    "tiny-pool": dict(num_pages=13, page_size=4),   # 52 slots: the 40-token prompt + 10 fits alone
    "tiny-pool-no-cache": dict(num_pages=13, page_size=4, enable_prefix_cache=False),
}


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_matches_full_recompute(request, arch, setup):
    model = request.getfixturevalue(arch)
    engine = LLMEngine.from_model(model, None, **SETUPS[setup])
    outs = run_all(engine, PROMPTS)
    assert [o.token_ids for o in outs] == reference(model, PROMPTS)
    assert all(o.finish_reason == "length" and o.completion_tokens == 10 for o in outs)
    stats = engine.stats()
    if setup.startswith("tiny-pool"):
        assert stats.num_preemptions_total > 0
    assert stats.pages_in_use == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.generation_tokens_total == 60 and stats.prompt_tokens_total == sum(map(len, PROMPTS))


def test_shared_prefix_hits_cache_and_matches_cache_off(gqa):
    prefix = prompts_of((45,), seed=7)[0]
    prompts = [prefix + t for t in prompts_of((3, 6, 1), seed=8)]
    with_cache = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4)
    first = run_all(with_cache, prompts[:1], ids=["a"])
    rest = run_all(with_cache, prompts[1:], ids=["b", "c"])
    assert first[0].cached_tokens == 0
    assert all(o.cached_tokens == 44 for o in rest)          # 11 full pages of the shared prefix
    assert with_cache.stats().prefix_cache_hit_tokens_total == 88
    assert with_cache.stats().pages_cached > 0 and with_cache.stats().pages_in_use == 0
    without = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4, enable_prefix_cache=False)
    plain = run_all(without, prompts)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in plain] == reference(gqa, prompts)
    assert all(o.cached_tokens == 0 for o in plain)
    # After a weight change the cached K/V are stale: reset drops them, and nothing is reused.
    with_cache.reset_prefix_cache()
    assert with_cache.stats().pages_cached == 0
    assert run_all(with_cache, prompts[1:2], ids=["d"])[0].cached_tokens == 0


def test_n_samples_share_prompt_pages(gqa):
    engine = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4)
    prompt = prompts_of((18,), seed=3)[0]                      # 4 full pages + 2 tokens
    engine.add_request("n", prompt, SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=5))
    outs = []
    for _ in range(2):                                         # sample 0 prefills, then the rest join
        outs += engine.step()
    samples = engine._requests["n"]
    assert all(len(s.page_table) == 5 for s in samples)
    shared = samples[0].page_table[:4]
    assert all(s.page_table[:4] == shared for s in samples)
    assert len({s.page_table[4] for s in samples}) == 4        # each sample writes its own tail page
    assert [engine.kv.pool.refcount(p) for p in shared] == [5] * 4   # 4 samples + the prefix cache
    assert engine.stats().pages_in_use == 4 + 4
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = {o.index: o for o in outs if o.finished}
    assert sorted(final) == [0, 1, 2, 3] and all(o.completion_tokens == 6 for o in final.values())
    assert len({tuple(o.token_ids) for o in final.values()}) > 1
    assert engine.stats().pages_in_use == 0


SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, n=2)


def samples_of(engine, rid):
    got = {}
    while engine.has_unfinished_requests():
        got.update({o.index: o.token_ids for o in engine.step() if o.finished and o.request_id == rid})
    return [got[i] for i in sorted(got)]


def test_seeded_sampling_is_reproducible_across_batches(gqa):
    target = PROMPTS[1]
    alone_engine = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4)
    alone_engine.add_request("target", target, SEEDED)
    alone = samples_of(alone_engine, "target")
    assert len(alone) == 2 and alone[0] != alone[1]
    engine = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4, seed=99, max_num_batched_tokens=16)
    mixed_params = [GREEDY, SamplingParams(max_tokens=5, temperature=0.7), SamplingParams(max_tokens=9, seed=1235)]
    for i, (p, sp) in enumerate(zip(PROMPTS[2:5], mixed_params)):
        engine.add_request(f"other{i}", p, sp)
    engine.step()                                             # the target joins a batch already running
    engine.add_request("target", target, SEEDED)
    assert samples_of(engine, "target") == alone
    other = LLMEngine.from_model(gqa, None, num_pages=64, page_size=4)
    other.add_request("target", target, dataclasses.replace(SEEDED, seed=4321))
    assert samples_of(other, "target") != alone


def test_pages_return_to_zero_after_finish_and_abort(gqa):
    engine = LLMEngine.from_model(gqa, None, num_pages=40, page_size=4, max_num_seqs=3)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0.0, n=2 if i == 1 else 1))
    for _ in range(3):
        engine.step()
    assert engine.stats().pages_in_use > 0 and engine.stats().num_waiting > 0
    engine.abort_request("r0")          # running
    engine.abort_request("r5")          # still waiting
    engine.abort_request("r1")          # n=2: one sample running, one waiting
    engine.abort_request("nope")        # unknown: no-op
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"r2", "r3", "r4"}
    stats = engine.stats()
    assert stats.pages_in_use == 0 and stats.num_running == 0 and stats.num_waiting == 0
    # An aborted id can be reused; a finished one too.
    assert [o.token_ids for o in run_all(engine, PROMPTS[:2], ids=["r0", "r2"])] == reference(gqa, PROMPTS[:2])


def test_add_request_rejects_bad_input(gqa):
    engine = LLMEngine.from_model(gqa, None, num_pages=8, page_size=4)   # pool of 32 tokens
    engine.add_request("dup", [1, 2, 3], GREEDY)
    cases = [
        ("dup", [1, 2], "already in use"),
        ("e", [], "prompt must be a non-empty"),
        ("big", list(range(32)), "prompt has 32 tokens but at most 31 fit"),
        ("neg", [1, -1], "prompt token 1 is -1"),
        ("vocab", [300], r"prompt token 0 is 300: token ids must be integers in \[0, 300\)"),
        ("bool", [1, 2, True], "prompt token 2 is True"),
        ("float", [1.0, 2], "prompt token 0 is 1.0"),
        ("text", "hello", "needs a tokenizer"),
        ("", [1], "request_id must be a non-empty string"),
    ]
    for rid, prompt, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.add_request(rid, prompt, GREEDY)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("s", [1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_model_len=999 exceeds the model's max_len=256"):
        LLMEngine.from_model(gqa, None, max_model_len=999)
    with pytest.raises(ValueError, match="unknown engine setting 'pages'"):
        LLMEngine.from_model(gqa, None, pages=3)


def test_llm_offline_api_with_token_prompts_and_logprobs(gqa):
    llm = LLM.from_model(gqa, None, num_pages=64, page_size=4)
    ref1 = reference(gqa, PROMPTS[1:2])[0]
    j = next(j for j in range(1, 10) if ref1[j] not in ref1[:j])     # first "new" token after the first
    params = [SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[ref1[j]])]
    res = llm.generate(PROMPTS[:2], params)
    assert res[0].token_ids == reference(gqa, PROMPTS[:1])[0] and res[0].finish_reason == "length"
    assert res[1].token_ids == ref1[:j + 1] and res[1].finish_reason == "stop"
    lps = res[0].outputs[0].logprobs
    assert len(lps) == 10
    with torch.no_grad():
        logits = gqa(torch.tensor([PROMPTS[0] + res[0].token_ids]))[0].float().log_softmax(-1)
    n0 = len(PROMPTS[0])
    for j, (tok, lp, top) in enumerate(lps):
        assert tok == res[0].token_ids[j]
        assert lp == pytest.approx(logits[n0 - 1 + j, tok].item(), abs=1e-4)
        assert len(top) == 3 and top[0][0] == tok and top[0][1] >= top[1][1] >= top[2][1]
    assert res[0].prompt_tokens == len(PROMPTS[0]) and res[0].completion_tokens == 10
    single = llm.generate(PROMPTS[3], GREEDY)                   # one token-id prompt, not a batch
    assert len(single) == 1 and single[0].token_ids == reference(gqa, PROMPTS[3:4])[0]
