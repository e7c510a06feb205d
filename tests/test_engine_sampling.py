"""SamplingParams validation and the batched Sampler (filters, penalties, seeds, log-probs)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from astrai_serve.engine.penalty_counts import PenaltyCounts
from astrai_serve.engine.sampler import Sampler
from astrai_serve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=-1), "max_tokens=-1: must be an integer >= 0"),
    (dict(prompt_logprobs=-1), r"prompt_logprobs=-1: must be None \(off\) or an integer in \[0, 20\]"),
    (dict(prompt_logprobs=21), "prompt_logprobs=21"),
    (dict(prompt_logprobs=True), "prompt_logprobs=True"),
    (dict(temperature=-1), "temperature=-1: must be >= 0"),
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number"),
    (dict(top_p=0), r"top_p=0: must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(presence_penalty=3), "presence_penalty=3"),
    (dict(repetition_penalty=0), "repetition_penalty=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(stop=["ok", ""]), "stop="),
    (dict(stop_token_ids=[-3]), "stop_token_ids="),
    (dict(n=0), "n=0"),
    (dict(top_logprobs=3), "top_logprobs=3: needs logprobs=True"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs=21"),
    (dict(min_tokens=-1), "min_tokens=-1: must be an integer >= 0"),
    (dict(min_tokens=2.0), "min_tokens=2.0: must be an integer"),
    (dict(max_tokens=4, min_tokens=5), r"min_tokens=5: must not exceed max_tokens \(4\)"),
    (dict(logit_bias={-1: 5.0}), r"logit_bias=\{-1: 5.0\}: token ids must be integers >= 0"),
    (dict(logit_bias={"7": 5.0}), r"logit_bias=\{'7': 5.0\}: token ids"),
    (dict(logit_bias={7: 101}), r"logit_bias=\{7: 101\}: biases must be finite numbers in \[-100, 100\]"),
    (dict(logit_bias={7: float("nan")}), r"logit_bias=\{7: nan\}"),
    (dict(logit_bias=[(7, 1.0)]), "logit_bias=.*must be a dict"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_and_from_dict():
    p = SamplingParams(stop="END", stop_token_ids=[3], top_k=-1)
    assert p.stop == ("END",) and p.stop_token_ids == (3,) and p.top_k == 0
    assert SamplingParams.from_dict({"max_tokens": 3}).max_tokens == 3
    with pytest.raises(ValueError, match="unknown sampling parameter 'max_new_tokens'"):
        SamplingParams.from_dict({"max_new_tokens": 3})


def sample(logits, params, seeds=None, histories=None, seed=0, positions=None):
    sampler = Sampler(torch.device("cpu"), seed)
    n = len(params)
    return sampler(logits.clone(), params, seeds or [None] * n, positions or [0] * n, histories or [([], 0)] * n)


def freqs(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def test_mixed_greedy_and_filtered_rows_in_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=2.0, top_p=1e-6), SamplingParams(temperature=1.0, min_p=1.0),
              SamplingParams(temperature=0), SamplingParams(temperature=5.0)]
    for seed in range(5):
        out = sample(logits, params, seed=seed).token_ids
        assert out[:5] == logits[:5].argmax(-1).tolist()


def test_draws_follow_the_filtered_distribution():
    n = 4000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).repeat(n, 1)
    plain = freqs(sample(logits, [SamplingParams(temperature=1.0)] * n).token_ids, 3)
    assert torch.allclose(plain, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    top_k = freqs(sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * n).token_ids, 3)
    assert top_k[2] == 0 and torch.allclose(top_k[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    top_p = freqs(sample(logits, [SamplingParams(temperature=1.0, top_p=0.75)] * n).token_ids, 3)
    assert top_p[2] == 0 and torch.allclose(top_p[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    min_p = freqs(sample(logits, [SamplingParams(temperature=1.0, min_p=0.5)] * n).token_ids, 3)
    assert min_p[2] == 0
    hot = freqs(sample(logits, [SamplingParams(temperature=100.0)] * n).token_ids, 3)
    assert torch.allclose(hot, torch.full((3,), 1 / 3), atol=0.03)


def test_penalties():
    logits = torch.tensor([[4.0, 3.9, 1.0, -1.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy]).token_ids == [0]
    # token 0 in the prompt: repetition penalty divides its positive logit
    rep = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, [rep], histories=[([0, 2], 2)]).token_ids == [1]
    # token 0 generated twice: frequency 0.1 * 2 pulls it below 3.9; presence alone 0.05 does not
    freq = SamplingParams(temperature=0, frequency_penalty=0.1)
    pres = SamplingParams(temperature=0, presence_penalty=0.05)
    hist = ([2, 0, 0], 1)   # prompt [2], output [0, 0]
    assert sample(logits.repeat(2, 1), [freq, pres], histories=[hist, hist]).token_ids == [1, 0]
    # a prompt-only token is not hit by presence/frequency (output tokens only)
    assert sample(logits, [SamplingParams(temperature=0, presence_penalty=2.0)],
                  histories=[([0], 1)]).token_ids == [0]


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, 1000)
    seeded = SamplingParams(temperature=1.0, seed=7)
    free = SamplingParams(temperature=1.0)
    alone = [sample(logits[2:3], [seeded], [7], positions=[40], seed=s).token_ids[0] for s in range(2)]
    mixed = sample(logits, [free, free, seeded, SamplingParams(temperature=0), free],
                   [None, None, 7, None, None], seed=123, positions=[3, 9, 40, 1, 2]).token_ids
    assert alone[0] == alone[1] == mixed[2]
    # The noise moves with the position sampled: later positions draw other tokens.
    draws = [sample(logits[2:3], [seeded], [7], positions=[40 + k]).token_ids[0] for k in range(5)]
    assert len(set(draws)) > 1
    # Another seed, other noise; unseeded rows follow the sampler's own stream.
    assert [sample(logits[2:3], [seeded], [8 + k], positions=[40]).token_ids[0] for k in range(5)] != [alone[0]] * 5
    with pytest.raises(ValueError, match="seeded rows need the positions"):
        Sampler(torch.device("cpu"))(logits[:1], [seeded], [7], None)


def test_gumbel_draws_follow_softmax_at_temperature():
    # Many seeded rows of the same logits: each (seed, position) key is one independent draw.
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).repeat(4000, 1)
    params = [SamplingParams(temperature=0.5, seed=1)] * 4000
    got = freqs(sample(logits, params, list(range(4000)), positions=[5] * 4000).token_ids, 4)
    want = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(got, want, atol=0.03), (got, want)


def test_detokenize_false_refuses_stop_strings():
    with pytest.raises(ValueError, match="detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize=1)


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=2,
                             repetition_penalty=3.0), SamplingParams(temperature=0)]
    res = sample(logits, params, histories=[([0], 1), ([], 0)])
    raw = logits[0].log_softmax(-1)
    tok, lp, top = res.logprobs[0]
    assert tok == res.token_ids[0] and lp == pytest.approx(raw[tok].item())
    assert [t for t, _ in top] == [0, 1] and top[0][1] == pytest.approx(raw[0].item())
    assert res.logprobs[1] is None and res.token_ids[1] == 2
    assert math.isclose(sum(math.exp(v) for v in raw.tolist()), 1.0, rel_tol=1e-5)


def test_penalty_counts_kept_on_the_device_match_a_rebuild():
    """Keyed rows (the engine's path) advance their counts by each step's new tokens; every
    step must penalize exactly as rebuilding the counts from the whole histories does."""
    torch.manual_seed(3)
    vocab = 40
    params = [SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.3),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, frequency_penalty=-0.5)]
    histories = [([1, 2, 3], 2), ([4, 5], 1), ([6, 6, 7, 8], 3)]
    kept = Sampler(torch.device("cpu"), 0)
    kept._counts = PenaltyCounts(vocab, torch.device("cpu"), capacity=1)   # must grow to hold two rows
    for step in range(25):                      # more rows than the initial capacity, and growing
        logits = torch.randn(3, vocab)
        want = Sampler(torch.device("cpu"), 0)(logits.clone(), params, None, [0] * 3, histories).token_ids
        got = kept(logits.clone(), params, None, [0] * 3, histories, history_keys=[10, 11, 12]).token_ids
        assert got == want, step
        for (ids, _), t in zip(histories, got):
            ids.append(t)
    assert kept._counts.num_rows == 2            # the row without penalties never got one
    for key in (10, 11, 12):
        kept.release(key)
    assert kept._counts.num_rows == 0


def test_engine_releases_penalty_rows_when_sequences_end():
    from astrai_serve.engine import LLMEngine
    from astrai_train.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, dim_ffn=64,
                                    max_len=128)).eval()
    engine = LLMEngine.from_model(model, None, num_pages=64, page_size=4, max_num_seqs=4)
    pen = SamplingParams(max_tokens=6, temperature=0.8, seed=1, presence_penalty=0.5, repetition_penalty=1.2, n=2)
    engine.add_request("a", [1, 2, 3, 4, 5], pen)
    engine.add_request("b", [9, 8, 7], pen)
    engine.step()
    engine.step()
    engine.abort_request("b")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.sampler._counts is not None and engine.sampler._counts.num_rows == 0


def test_bf16_logits_sample_as_their_float32_copies():
    """The engine hands the sampler logits in the model's dtype (no fp32 copy of [S, vocab] per
    step): every kind of row draws the same token and log-probs as from the float32 copy."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 300, generator=g) * 3).to(torch.bfloat16)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1          # a tie: the first index wins
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=4),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, logprobs=True,
                             top_logprobs=3),
              SamplingParams(temperature=0.7, frequency_penalty=0.4, seed=5),
              SamplingParams(temperature=0.0, logprobs=True)]
    histories = [([1, 2, 3, 7, 9], 3)] * 6
    kwargs = dict(seeds=[p.seed for p in params], positions=[5] * 6, histories=histories)
    got = Sampler(torch.device("cpu"))(logits, params, **kwargs)
    want = Sampler(torch.device("cpu"))(logits.float(), params, **kwargs)
    assert got.token_ids == want.token_ids and got.token_ids[0] == 7
    assert got.logprobs == want.logprobs and got.logprobs[3] is not None


def test_logit_bias_forces_bans_and_leaves_other_rows_alone():
    torch.manual_seed(4)
    logits = torch.randn(4, 50)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}),    # forced, greedy
              SamplingParams(temperature=0, logit_bias={top[1]: -100}),  # its argmax banned
              SamplingParams(temperature=0),                             # no bias: untouched
              SamplingParams(temperature=1.0, top_p=0.9, logit_bias={7: 100.0})]  # forced, sampled
    for seed in range(3):
        out = sample(logits, params, seed=seed).token_ids
        second = logits[1].clone()
        second[top[1]] -= 100
        assert out[:3] == [7, second.argmax().item(), top[2]] and out[3] == 7
    # with penalties too (one float32 copy for both), and on the model's bf16 logits
    both = [SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias={top[0]: -100}),
            SamplingParams(temperature=0)]
    assert sample(logits[:2].bfloat16(), both, histories=[([1], 1), ([], 0)]).token_ids[0] != top[0]
    assert sample(logits[:2].bfloat16(), both, histories=[([1], 1), ([], 0)]).token_ids[1] == top[1]
    # log-probs stay the model's (before the bias), like the penalties'
    lp = sample(logits[:1], [SamplingParams(temperature=0, logprobs=True, logit_bias={7: 100})]).logprobs[0]
    assert lp[0] == 7 and lp[1] == pytest.approx(logits[0].log_softmax(-1)[7].item())


def test_engine_logit_bias_per_request():
    from astrai_serve.engine import LLM
    from astrai_train.model import Transformer
    from engine_support import GQA, prompts_of

    torch.manual_seed(0)
    llm = LLM.from_model(Transformer(GQA).eval(), None, num_pages=64, page_size=4)
    prompt = prompts_of([9])[0]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = llm.generate([prompt], greedy)[0].token_ids
    banned = plain[0]
    res = llm.generate([prompt] * 3, [dataclasses.replace(greedy, logit_bias={123: 100}),
                                      dataclasses.replace(greedy, logit_bias={banned: -100}), greedy])
    assert res[0].token_ids == [123] * 6
    assert banned not in res[1].token_ids and res[1].token_ids != plain
    assert res[2].token_ids == plain                       # the row without a bias is unchanged
    with pytest.raises(ValueError, match=r"logit_bias=\{300: 1.0\}: token id 300 is outside the vocabulary \[0, 300\)"):
        llm.engine.add_request("bad", prompt, SamplingParams(logit_bias={300: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_banned_tokens_are_never_drawn_and_share_the_bias_copy():
    torch.manual_seed(5)
    logits = torch.randn(3, 50)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={top[0]: 100.0}),   # forced, then banned: banned wins
              SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0)]
    sampler = Sampler(torch.device("cpu"))
    for _ in range(20):
        out = sampler(logits.clone(), params, banned=[{top[0], 10**6}, {top[1]}, None]).token_ids
        assert out[0] != top[0] and out[1] != top[1] and out[2] == top[2]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_min_tokens_holds_back_stop_tokens(async_scheduling):
    from astrai_serve.engine import LLM
    from engine_support import model_of, prompts_of

    llm = LLM.from_model(model_of("gqa"), None, num_pages=64, page_size=4, overlap_steps=async_scheduling,
                         async_scheduling=async_scheduling)
    prompt = prompts_of([9])[0]
    # token 123 forced (bias) and a stop token: without min_tokens the sample stops at once
    forced = SamplingParams(max_tokens=12, temperature=0, logit_bias={123: 100}, stop_token_ids=[123])
    assert llm.generate([prompt], forced)[0].token_ids == [123]
    plain = SamplingParams(max_tokens=6, temperature=0)
    res = llm.generate([prompt] * 4, [dataclasses.replace(forced, min_tokens=5),
                                      dataclasses.replace(forced, min_tokens=5, temperature=1.0, seed=3),
                                      dataclasses.replace(forced, min_tokens=12), plain])
    for r in res[:2]:      # 5 other tokens, then the forced stop token
        assert len(r.token_ids) == 6 and 123 not in r.token_ids[:5] and r.token_ids[5] == 123
        assert r.finish_reason == "stop"
    assert len(res[2].token_ids) == 12 and 123 not in res[2].token_ids and res[2].finish_reason == "length"
    assert res[3].token_ids == llm.generate([prompt], plain)[0].token_ids   # a row without it is unchanged
