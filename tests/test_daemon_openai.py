"""The REST facade through the official `openai` client and raw HTTP, against a real
`astrai serve` process started with an API key: completions, chat, streaming, n=2, stop strings,
usage, logprobs, batched prompts, models, health, metrics, the API key, and a table of bad requests."""
from __future__ import annotations

import json
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
import openai
import pytest

from daemon_support import proto_stubs, start_serve

pytestmark = pytest.mark.timeout(120)
KEY = "test-key-123"
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    proc = start_serve(tiny_model_dir, tmp_path_factory.mktemp("logs") / "serve.log",
                       "--served-model-name", MODEL, "--api-key", KEY)
    yield proc
    assert proc.terminate() == 0, proc.stderr()


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=daemon.ready["http"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.ready["http"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


USER = [{"role": "user", "content": "What say you, Horatio?"}]


def test_chat_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    # The same greedy request again: same text, and its prompt now comes from the prefix cache.
    again = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_stream_matches_whole_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=USER, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_n2_seed_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="Friends, Romans, countrymen", max_tokens=6, n=2,
                                      temperature=1.0, seed=11, logprobs=2, extra_body={"ignore_eos": True})
    assert reply.object == "text_completion" and sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 12
    for c in reply.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
        assert all(len(top) <= 3 for top in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
        # the chosen token is always there: with its own log-prob, or (an id of the same text among
        # the alternatives, as the byte tokens' "\ufffd" often are) that alternative's, no lower
        assert all(top[t] >= x for t, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    same = client.completions.create(model=MODEL, prompt="Friends, Romans, countrymen", max_tokens=6, n=2,
                                     temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.text for c in same.choices] == [c.text for c in reply.choices]


def test_completions_default_max_tokens_and_token_prompt(client, http):
    reply = client.completions.create(model=MODEL, prompt="Alas", extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"  # OpenAI's default
    ids = http.post("/v1/completions", json={"prompt": [[11, 12, 13]], "max_tokens": 2}).json()
    assert ids["usage"]["prompt_tokens"] == 3


BATCH = dict(model=MODEL, max_tokens=4, n=2, temperature=0, extra_body={"ignore_eos": True})


def _texts_by_index(reply) -> list[str]:
    assert sorted(c.index for c in reply.choices) == list(range(len(reply.choices)))
    return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]


@pytest.mark.parametrize("prompts", [["To be", "or not"], [[11, 12, 13], [14, 15, 16, 17]]], ids=["text", "ids"])
def test_completions_batch_matches_single_prompts(client, prompts):
    singles = [client.completions.create(prompt=p, **BATCH) for p in prompts]
    batch = client.completions.create(prompt=prompts, **BATCH)
    # Prompt i's sample j is choice i * n + j, as OpenAI and vLLM number them.
    assert _texts_by_index(batch) == _texts_by_index(singles[0]) + _texts_by_index(singles[1])
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 16
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + 16


def test_completions_batch_stream(client, http):
    prompts = ["To be", "or not"]
    whole = client.completions.create(prompt=prompts, **BATCH)
    chunks = list(client.completions.create(prompt=prompts, **BATCH, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [""] * 4
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == _texts_by_index(whole)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage == usage[0] and chunks[-1].choices == []
    assert usage[0].completion_tokens == 16 and usage[0].prompt_tokens == whole.usage.prompt_tokens
    with http.stream("POST", COMP, json={"prompt": prompts, "max_tokens": 2, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def _gauge(http, name: str) -> float:
    line = next(line for line in http.get("/metrics").text.splitlines() if line.startswith(f"{name}{{"))
    return float(line.split()[-1])


def _assert_engine_idle(http, tokens_before: float, most: int) -> None:
    """Nothing is left running or waiting in the engine, and fewer than `most` tokens were generated
    since tokens_before (a leaked request would run to its max_tokens)."""
    for _ in range(100):
        if _gauge(http, "astrai_num_requests_running") == _gauge(http, "astrai_num_requests_waiting") == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("requests of the batch still run in the engine")
    assert _gauge(http, "astrai_generation_tokens_total") - tokens_before < most


def test_rejected_batch_cancels_its_other_prompts(http):
    tokens_before = _gauge(http, "astrai_generation_tokens_total")
    r = http.post(COMP, json={"prompt": ["hi", "there", "word " * 3000, "you"], "max_tokens": 400,
                              "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[2]", r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["message"].startswith("prompt[2]: ")
    _assert_engine_idle(http, tokens_before, 3 * 400)
    good = http.post(COMP, json={"prompt": ["hi", "there"], "max_tokens": 2})
    assert good.status_code == 200 and len(good.json()["choices"]) == 2


def test_batch_stream_disconnect_cancels_every_prompt(http):
    tokens_before = _gauge(http, "astrai_generation_tokens_total")
    body = {"prompt": ["hi", "there", "you"], "max_tokens": 400, "n": 2, "stream": True, "ignore_eos": True}
    with http.stream("POST", COMP, json=body) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    _assert_engine_idle(http, tokens_before, 6 * 400)


def test_stop_string_finishes_with_stop(client):
    base = dict(model=MODEL, prompt="O Romeo, Romeo", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[3:6]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    cut = client.completions.create(**base, stop=[stop, "zzzz-never"])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)
    streamed = list(client.completions.create(**base, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == reply.choices[0].message.content


def test_logit_bias_forces_a_token_on_both_endpoints(client, tiny_model_dir):
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_model_dir)
    token = tok.encode(" night")[-1]
    bias = {str(token): 100}
    comp = client.completions.create(model=MODEL, prompt="Good", max_tokens=3, temperature=0, logit_bias=bias,
                                     logprobs=1, extra_body={"ignore_eos": True})
    assert comp.choices[0].logprobs.tokens == [tok.decode([token])] * 3
    assert comp.choices[0].text == tok.decode([token] * 3) and comp.usage.completion_tokens == 3
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0.8, seed=1,
                                          logit_bias=bias, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tok.decode([token] * 3)
    with pytest.raises(openai.BadRequestError) as info:   # the offending key and value are named
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, logit_bias={"7": -101})
    assert info.value.body["param"] == "logit_bias" and "-101" in info.value.message and "7" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Good", max_tokens=3, logit_bias={"1.5": 1})
    assert info.value.body["param"] == "logit_bias" and "'1.5'" in info.value.message


def test_min_tokens_holds_back_eos_on_both_endpoints(client, tiny_model_dir):
    from astrai_train.tokenizer import Tokenizer

    eos = Tokenizer.from_pretrained(tiny_model_dir).eos_id
    bias = {str(eos): 100}                      # eos forced: without min_tokens, nothing is generated
    comp = client.completions.create(model=MODEL, prompt="Good", max_tokens=10, temperature=0, logit_bias=bias)
    assert comp.choices[0].finish_reason == "stop" and comp.usage.completion_tokens == 1
    comp = client.completions.create(model=MODEL, prompt="Good", max_tokens=10, temperature=0, logit_bias=bias,
                                     extra_body={"min_tokens": 4})
    assert comp.choices[0].finish_reason == "stop" and comp.usage.completion_tokens == 5 and comp.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0.7, seed=2,
                                          logit_bias=bias, extra_body={"min_tokens": 6})
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == 7
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, extra_body={"min_tokens": 5})
    assert info.value.body["param"] == "min_tokens" and "5" in info.value.message and "3" in info.value.message


def test_tokenize_and_detokenize(client, http, daemon):
    prompt = "Good night, sweet prince"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"count", "max_model_len", "tokens"} and got["max_model_len"] == 512
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert got["count"] == len(got["tokens"]) == comp.usage.prompt_tokens
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": prompt}
    chat = http.post("/tokenize", json={"messages": USER}).json()   # with the generation prompt, as chat runs
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    bare = http.post("/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][:bare["count"]] and bare["count"] < chat["count"]
    for path, body, param in [("/detokenize", {"tokens": [1, 99999999]}, "tokens"),
                              ("/detokenize", {"tokens": [1, -2]}, "tokens"),
                              ("/detokenize", {"tokens": "1 2"}, "tokens"),
                              ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "god", "content": "x"}]}, "messages[0].role"),
                              ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
                              ("/tokenize", {"prompt": "a", "frobnicate": 1}, "frobnicate")]:
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert "99999999" in http.post("/detokenize", json={"tokens": [99999999]}).json()["error"]["message"]
    assert http.post("/tokenize", json={"model": "gpt-9", "prompt": "a"}).status_code == 404
    assert httpx.post(daemon.ready["http"] + "/tokenize", json={"prompt": "a"}).status_code == 401


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The served model and tokenizer, in this process: the reference for the scores."""
    from astrai_train.model import Transformer
    from astrai_train.tokenizer import Tokenizer

    return Transformer.from_pretrained(tiny_model_dir).eval(), Tokenizer.from_pretrained(tiny_model_dir)


# (context, continuation) pairs, as lm-evaluation-harness's loglikelihood requests send them
SCORED = [([11, 12, 13, 14], [15, 16]), ([20, 21, 22], [23, 24, 25]), ([30, 31], [32])]


def test_echo_logprobs_scores_prompts_as_lm_eval_reads_them(client, tiny):
    import torch

    model, tok = tiny
    prompts = [ctx + cont for ctx, cont in SCORED]
    # lm-eval's local-completions loglikelihood request (max_tokens 0; older versions send 1)
    for max_tokens in (0, 1):
        reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=max_tokens, echo=True,
                                          logprobs=1, temperature=0, seed=1234)
        choices = sorted(reply.choices, key=lambda c: c.index)
        assert [c.index for c in choices] == [0, 1, 2]
        assert reply.usage.completion_tokens == 3 * max_tokens
        for c, prompt, (ctx, cont) in zip(choices, prompts, SCORED):
            lp = c.logprobs
            assert c.finish_reason == "length"
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + max_tokens
            assert lp.tokens[:len(prompt)] == [tok.decode([t], skip_special_tokens=False) for t in prompt]
            assert c.text.startswith(tok.decode(prompt, skip_special_tokens=False))
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
            with torch.no_grad():
                ref = model(torch.tensor([prompt]))[0, :-1].float().log_softmax(-1)
            want = [ref[j, prompt[j + 1]].item() for j in range(len(prompt) - 1)]
            assert lp.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=1e-4)
            # what lm-eval computes: the continuation's log-likelihood, and whether greedy would produce it
            scores = lp.token_logprobs[len(ctx):len(prompt)]
            assert sum(scores) == pytest.approx(sum(want[len(ctx) - 1:]), abs=1e-4)
            greedy = all(s == max(top.values()) for s, top in zip(scores, lp.top_logprobs[len(ctx):len(prompt)]))
            assert greedy == all(int(ref[j].argmax()) == prompt[j + 1] for j in range(len(ctx) - 1, len(prompt) - 1))
            # the most likely token, and the prompt's own where that is another (logprobs + 1 at most)
            assert all(len(top) == (1 if s == max(top.values()) else 2)
                       for s, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    # a string prompt: the echo is the prompt as sent
    reply = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=0, echo=True, logprobs=2)
    c = reply.choices[0]
    assert c.text == "To be, or not" and "".join(c.logprobs.tokens) == "To be, or not"
    assert c.logprobs.token_logprobs[0] is None and all(len(t) in (2, 3) for t in c.logprobs.top_logprobs[1:])


def test_completion_top_logprobs_hold_the_chosen_token(client, tiny):
    """OpenAI's rule for completions: top_logprobs has the `logprobs` most likely tokens and, when it
    is not one of them, the token actually there (up to logprobs + 1 entries), for the prompt's
    tokens (echo) and the generated ones. logit_bias forces a token the model does not rank first
    (the log-probs stay the model's), so both cases occur; chat's lists stay as asked."""
    import torch

    model, tok = tiny
    prompt, forced = [20, 21, 22, 23, 24, 25], tok.encode(" night")[-1]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1,
                                      temperature=0.8, seed=3, logit_bias={str(forced): 100},
                                      extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    ids = prompt + [forced] * 4
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
    not_first = 0
    for j in range(1, len(ids)):
        best = int(ref[j - 1].argmax())
        want = {tok.decode([best], skip_special_tokens=False): ref[j - 1, best].item()}
        if best != ids[j]:
            want.setdefault(lp.tokens[j], ref[j - 1, ids[j]].item())
            not_first += 1
        got = lp.top_logprobs[j]
        assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4), j
        if best == ids[j] or len(want) == 2:   # else an alternative of the same text holds the key
            assert got[lp.tokens[j]] == lp.token_logprobs[j]
    assert lp.top_logprobs[0] is None
    assert not_first >= 2 and any(ids[j] != int(ref[j - 1].argmax()) for j in range(len(prompt), len(ids)))
    # sampled at temperature 1 on a random model: the chosen token is rarely the most likely one
    sampled = client.completions.create(model=MODEL, prompt="Good", max_tokens=8, logprobs=1, temperature=1.0,
                                        seed=7, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert sum(len(top) == 2 for top in sampled.top_logprobs) >= 2
    for t, x, top in zip(sampled.tokens, sampled.token_logprobs, sampled.top_logprobs):
        assert len(top) <= 2 and (top[t] == x if len(top) == 2 else top[t] >= x)
    # streamed, the same entries
    chunks = list(client.completions.create(model=MODEL, prompt="Good", max_tokens=8, logprobs=1, temperature=1.0,
                                            seed=7, stream=True, extra_body={"ignore_eos": True}))
    assert [top for c in chunks for top in c.choices[0].logprobs.top_logprobs] == sampled.top_logprobs
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, logprobs=True, top_logprobs=1,
                                          temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert all(len(t.top_logprobs) == 1 for t in chat.choices[0].logprobs.content)


def test_echo_without_logprobs_and_streamed(client):
    base = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(prompt=["To be", "or not"], n=2, **base)
    echoed = client.completions.create(prompt=["To be", "or not"], n=2, echo=True, **base)
    expect = [("To be", "or not")[c.index // 2] + c.text for c in sorted(plain.choices, key=lambda c: c.index)]
    assert _texts_by_index(echoed) == expect and all(c.logprobs is None for c in echoed.choices)
    ids = client.completions.create(prompt=[11, 12, 13], echo=True, **base)
    assert ids.choices[0].text.endswith(client.completions.create(prompt=[11, 12, 13], **base).choices[0].text)
    # Streamed: each choice's first chunk starts with its prompt (and its scored tokens), as vLLM sends it.
    whole = client.completions.create(prompt=["To be", "or not"], n=2, echo=True, logprobs=1, **base)
    chunks = list(client.completions.create(prompt=["To be", "or not"], n=2, echo=True, logprobs=1, stream=True,
                                            **base))
    texts, tokens, firsts = [""] * 4, [[] for _ in range(4)], {}
    for chunk in chunks:
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
    assert texts == _texts_by_index(whole) == expect
    for i, c in firsts.items():
        assert c.text.startswith(("To be", "or not")[i // 2]) and c.logprobs.token_logprobs[0] is None
    assert tokens == [c.logprobs.tokens for c in sorted(whole.choices, key=lambda c: c.index)]


def test_models_health_metrics(client, http, daemon):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 512
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ping").json() == {"status": "ok"} and http.post("/ping").status_code == 200
    import importlib.metadata

    assert http.get("/version").json() == {"version": importlib.metadata.version("astrai")}
    client.completions.create(model=MODEL, prompt="To be", max_tokens=3, temperature=0)
    stats = http.get("/stats").json()
    pages = stats["kv_pages"]
    assert pages["total"] == pages["in_use"] + pages["cached"] + pages["free"] and pages["in_use"] == 0
    assert stats["tokens"]["generation_total"] >= 3 and stats["generation_tokens_per_s"] > 0
    assert 0 <= stats["prefix_cache_hit_rate"] <= 1 and stats["requests"] == {"running": 0, "waiting": 0}
    assert http.get("/stats").json()["generation_tokens_per_s"] == 0     # the rate since the previous call
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("astrai_kv_pages_total", "astrai_kv_pages_in_use", "astrai_prefix_cache_hit_tokens_total",
                 "astrai_num_requests_running", "astrai_num_requests_waiting"):
        assert f"# TYPE {name} " in text and f'{name}{{model_name="{MODEL}"}} ' in text
    for name in ("astrai_time_to_first_token_seconds", "astrai_time_per_output_token_seconds"):
        assert f"# TYPE {name} histogram" in text
        count = next(line for line in text.splitlines() if line.startswith(f"{name}_count"))
        assert int(count.split()[-1]) > 0, "earlier requests must have been observed"
        inf = next(line for line in text.splitlines() if line.startswith(f'{name}_bucket') and 'le="+Inf"' in line)
        assert inf.split()[-1] == count.split()[-1]


def test_wrong_api_key_refused_on_both_protocols(daemon, tmp_path):
    base = daemon.ready["http"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(base + "/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(base + "/health").status_code == 200  # probes need no key
    pb2, pb2_grpc = proto_stubs(tmp_path)
    with grpc.insecure_channel(daemon.ready["grpc"]) as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        request = pb2.GenerateRequest(text="hi", params=pb2.SamplingParams(max_tokens=2))
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, metadata=metadata, timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfo(pb2.ModelInfoRequest(), metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = list(stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30))
        assert good[-1].finish_reason and good[-1].usage.completion_tokens >= 1
        # Health stays open for probes.
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}
BAD = [  # (id, path, body (dict -> JSON, bytes -> raw), status, param)
    ("invalid json", CHAT, b'{"messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("nested too deeply", CHAT, b"[" * 100000 + b"]" * 100000, 400, None),
    ("not utf-8", CHAT, b'{"messages": "\xff\xfe"}', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages not a list", CHAT, {"messages": "hi"}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "god", "content": "x"}]}, 400, "messages[0].role"),
    ("content wrong type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages[0].content[0]"),
    ("missing prompt", COMP, {"model": MODEL}, 400, "prompt"),
    ("prompt wrong type", COMP, {"prompt": 12}, 400, "prompt"),
    ("batch mixing strings and ids", COMP, {"prompt": ["a", [1, 2]]}, 400, "prompt"),
    ("batch with an empty prompt", COMP, {"prompt": ["a", "b", ""]}, 400, "prompt[2]"),
    ("batch with an empty id list", COMP, {"prompt": [[1, 2], []]}, 400, "prompt[1]"),
    ("batch with a bad element", COMP, {"prompt": [[1, 2], [3, "x"]]}, 400, "prompt[1]"),
    ("batch over the cap", COMP, {"prompt": ["a"] * 129}, 400, "prompt"),
    ("batch times n over the cap", COMP, {"prompt": ["a"] * 9, "n": 128}, 400, "n"),
    ("batch prompt longer than the context", COMP, {"prompt": ["hi", "word " * 3000]}, 400, "prompt[1]"),
    ("max_tokens string", CHAT, {**OK_CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens negative", CHAT, {**OK_CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens absurd", COMP, {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("temperature too high", CHAT, {**OK_CHAT, "temperature": 7}, 400, "temperature"),
    ("temperature bool", CHAT, {**OK_CHAT, "temperature": True}, 400, "temperature"),
    ("top_p zero", CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    ("n zero", CHAT, {**OK_CHAT, "n": 0}, 400, "n"),
    ("n absurd", CHAT, {**OK_CHAT, "n": 100000}, 400, "n"),
    ("presence_penalty", CHAT, {**OK_CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty", CHAT, {**OK_CHAT, "frequency_penalty": -9}, 400, "frequency_penalty"),
    ("stop wrong type", CHAT, {**OK_CHAT, "stop": 5}, 400, "stop"),
    ("seed negative", CHAT, {**OK_CHAT, "seed": -1}, 400, "seed"),
    ("top_logprobs without logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("completion logprobs too many", COMP, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("echo not a boolean", COMP, {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("echo on chat", CHAT, {**OK_CHAT, "echo": True}, 400, "echo"),
    ("max_tokens zero on chat", CHAT, {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative with echo", COMP, {"prompt": "hi", "echo": True, "max_tokens": -1}, 400, "max_tokens"),
    ("stream_options without stream", CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("unrecognized argument", CHAT, {**OK_CHAT, "frobnicate": 1}, 400, "frobnicate"),
    ("tool without a function", CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ("logit_bias not an object", CHAT, {**OK_CHAT, "logit_bias": [[5, 1]]}, 400, "logit_bias"),
    ("logit_bias key not an id", COMP, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias negative key", CHAT, {**OK_CHAT, "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ("logit_bias id beyond vocabulary", CHAT, {**OK_CHAT, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("logit_bias bias 101", COMP, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias bias string", CHAT, {**OK_CHAT, "logit_bias": {"5": "high"}}, 400, "logit_bias"),
    ("min_tokens negative", CHAT, {**OK_CHAT, "min_tokens": -1}, 400, "min_tokens"),
    ("min_tokens string", COMP, {"prompt": "hi", "min_tokens": "5"}, 400, "min_tokens"),
    ("min_tokens above the default max_tokens", COMP, {"prompt": "hi", "min_tokens": 17}, 400, "min_tokens"),
    ("logit_bias too many", CHAT, {**OK_CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("token id outside vocabulary", COMP, {"prompt": [1, 2, 99999999]}, 400, "prompt"),
    ("prompt longer than the context", COMP, {"prompt": "word " * 3000}, 400, "prompt"),
    ("prompt + max_tokens beyond context", COMP, {"prompt": "word " * 100, "max_tokens": 500}, 400, "prompt"),
    ("unknown model", CHAT, {**OK_CHAT, "model": "gpt-9"}, 404, "model"),
    ("unknown model stream", CHAT, {**OK_CHAT, "model": "gpt-9", "stream": True}, 404, "model"),
    ("oversized body", COMP, {"prompt": "x" * (5 * 1024 * 1024)}, 413, None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_openai_errors_and_server_stays_up(http, case):
    _, path, body, status, param = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if "context" in case[0]:
        assert error["code"] == "context_length_exceeded"
    good = http.post(CHAT, json=OK_CHAT)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_oversized_chunked_body_is_413(http):
    def chunks():
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    r = http.post(COMP, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert http.get("/health").status_code == 200
