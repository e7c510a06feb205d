"""The engine with a real tokenizer (the shared tiny_model_dir): text and chat prompts, streamed
text deltas, stop strings, and the `astrai generate` command in a subprocess."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from astrai_serve import LLM, SamplingParams
from astrai_serve.engine import LLMEngine

ENGINE = dict(num_pages=128, page_size=8, device="cpu")
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


def stream(engine: LLMEngine, rid: str, prompt, params):
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_text_and_chat_prompts(llm):
    tok = llm.tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet?"}]
    res = llm.generate(["To be, or not to be", chat], LONG)
    assert res[0].prompt_tokens == len(tok.encode("To be, or not to be"))
    assert res[1].prompt_tokens == len(tok.apply_chat_template(chat, add_generation_prompt=True))
    for r in res:
        assert r.finish_reason == "length" and r.completion_tokens == 40
        assert r.text == tok.decode(r.token_ids)
    with pytest.raises(ValueError, match="role"):
        llm.generate([[{"role": "wizard", "content": "hi"}]], LONG)


def test_streamed_deltas_add_up_and_stop_strings_cut(llm):
    engine = llm.engine
    outs = stream(engine, "free", "KING. What say you?", LONG)
    full = outs[-1].text
    assert "".join(o.new_text for o in outs) == full and full
    assert sum(len(o.new_token_ids) for o in outs) == 40 and outs[-1].finished
    # Stop on a piece of the text generated at the end: the text is cut before its first occurrence.
    stop = full[len(full) // 2:len(full) // 2 + 4]
    expected = full[:full.find(stop)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=["@@never@@", stop])
    outs = stream(engine, "stopped", "KING. What say you?", params)
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == expected
    assert "".join(o.new_text for o in outs) == expected           # held-back text never leaked the stop
    assert final.completion_tokens < 40


def test_min_tokens_defers_stop_strings_and_eos(llm):
    prompt = "KING. What say you?"
    full = llm.generate(prompt, LONG)[0]
    stop = full.text[:2]                        # a stop string in the first token's text
    early = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert early.finish_reason == "stop" and early.completion_tokens < 20
    late = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop],
                                               min_tokens=20))[0]
    assert late.completion_tokens >= 20 and late.token_ids == full.token_ids[:late.completion_tokens]
    assert late.text.startswith(stop) and full.text.startswith(late.text)
    # the tokenizer's eos, forced by a bias: held back until min_tokens, then taken
    eos = llm.tokenizer.eos_id
    forced = SamplingParams(max_tokens=40, temperature=0.0, logit_bias={eos: 100})
    assert llm.generate(prompt, forced)[0].token_ids == [eos]
    held = llm.generate(prompt, dataclasses.replace(forced, min_tokens=7))[0]
    assert held.finish_reason == "stop" and len(held.token_ids) == 8 and held.token_ids.index(eos) == 7
    assert not set(held.token_ids[:7]) & set(llm.tokenizer.stop_ids)


def test_cached_prefix_reported_for_text_prompts(llm, tiny_model_dir):
    prefix = "HAMLET. " + "The rest is silence, and the play goes on. " * 6
    llm.generate(prefix + "Horatio", LONG)
    second = llm.generate(prefix + "Ophelia", LONG)[0]
    assert second.cached_tokens >= 32 and second.cached_tokens % 8 == 0
    plain = LLM(tiny_model_dir, **ENGINE, enable_prefix_cache=False)
    again = plain.generate(prefix + "Ophelia", LONG)[0]
    assert again.cached_tokens == 0 and again.token_ids == second.token_ids


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "astrai_train.cli", "generate", *args],
                          capture_output=True, text=True, timeout=120)


def test_generate_command(tiny_model_dir):
    done = run_cli("--model", str(tiny_model_dir), "--prompt", "To be", "--prompt", "Good night",
                   "--max-tokens", "5", "--ignore-eos", "--json", "--num-pages", "32", "--page-size", "8")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "Good night"]
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 5 for r in rows)
    bad = run_cli("--model", str(tiny_model_dir), "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature=-1.0" in bad.stderr
    bad = run_cli("--model", str(tiny_model_dir), "--prompt", "x", "--max-tokens", "4", "--min-tokens", "5")
    assert bad.returncode == 2 and "min_tokens=5" in bad.stderr
    missing = run_cli("--model", str(tiny_model_dir / "nope"), "--prompt", "x")
    assert missing.returncode == 2 and "no such model directory" in missing.stderr


def test_detokenize_false_gives_the_same_tokens_and_no_text(llm):
    with_text = llm.generate(["KING. What say you?"], LONG)[0]
    ids_only = llm.generate(["KING. What say you?"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                                    detokenize=False))[0]
    assert ids_only.token_ids == with_text.token_ids and with_text.text and ids_only.text == ""


def test_unstreamed_request_gives_one_output_holding_everything(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    streamed = stream(engine, "every-step", "KING. What say you?", params)
    engine.add_request("final-only", "KING. What say you?", params, stream=False)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 1 and outs[0].finished and len(streamed) == 12
    assert outs[0].new_token_ids == outs[0].token_ids == streamed[-1].token_ids
    assert outs[0].new_text == outs[0].text == streamed[-1].text
    assert [lp[0] for lp in outs[0].logprobs] == outs[0].token_ids


def test_unstreamed_text_is_decoded_once_when_the_sample_finishes(llm, monkeypatch):
    """stream=False without stop strings: no per-step detokenization, one batched decode at the
    end, and the same text as the streamed request, also when a stop token ends it early (the
    stop token is not text)."""
    from astrai_serve.engine import outputs

    engine = llm.engine
    free = stream(engine, "probe", "KING. What say you?", LONG)[-1]
    stop_id = free.token_ids[5]
    calls = []
    real = outputs.push_many
    monkeypatch.setattr(outputs, "push_many", lambda detoks, ids: calls.append(len(detoks)) or real(detoks, ids))
    for params in (LONG, SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_id])):
        streamed = stream(engine, "s", "KING. What say you?", params)[-1]
        calls.clear()
        engine.add_request("u", "KING. What say you?", params, stream=False)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert calls == [1], calls      # one push, of the whole completion, at the finish
        assert outs[0].token_ids == streamed.token_ids and outs[0].text == streamed.text
        assert outs[0].finish_reason == streamed.finish_reason
    assert streamed.finish_reason == "stop" and streamed.token_ids[-1] == stop_id
