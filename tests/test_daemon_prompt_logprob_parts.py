"""A long prompt's log-probs leave the core in parts (a few thousand positions per message, so a
32k-token prompt with 20 alternatives stays under gRPC's message limit), and the REST facade joins
them. The core and facade run in-process around a real engine, the part size made tiny (3), so an
11-token prompt takes four messages; the same requests at the default size give the reference."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest

from daemon_support import InProcessStack, proto_stubs

pytestmark = pytest.mark.timeout(120)
PART = 3
PROMPT = list(range(20, 31))   # 11 tokens: parts of 3, 3, 3 and 2


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """(servicer, gRPC stubs, stub, facade URL) over one engine on a thread."""
    from astrai_serve.engine.llm_engine import LLMEngine
    from astrai_serve.core.engine_loop import EngineLoop

    pb2, pb2_grpc = proto_stubs(tmp_path_factory.mktemp("stubs"))
    engine_loop = EngineLoop(LLMEngine(tiny_model_dir, num_pages=128))
    engine_loop.start()
    stack = InProcessStack(engine_loop, prompt_logprobs_per_message=PART)
    try:
        with grpc.insecure_channel(stack.grpc_target) as channel:
            yield stack.core.servicer, pb2, pb2_grpc.GenerationServiceStub(channel), stack.url
    finally:
        stack.stop()
        engine_loop.stop(5)


def _at_default_size(servicer, run):
    """run() with the core's prompt log-probs in one message (read between calls, so safe to set)."""
    servicer.prompt_logprobs_per_message = 4096
    try:
        return run()
    finally:
        servicer.prompt_logprobs_per_message = PART


def _prompt_logprobs(lps) -> list[tuple]:
    return [(lp.token_id, lp.token, lp.logprob if lp.HasField("logprob") else None,
             [(t.token_id, t.logprob) for t in lp.top_logprobs]) for lp in lps]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_grpc_prompt_logprobs_come_in_parts_before_the_first_token(stack, max_tokens):
    servicer, pb2, stub, _ = stack
    params = pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=2, n=2)
    request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT), params=params, echo_prompt=True)
    split = list(stub.Generate(request, timeout=60))
    whole = _at_default_size(servicer, lambda: list(stub.Generate(request, timeout=60)))
    for index in (0, 1):
        mine = [m for m in split if m.index == index]
        ref = [m for m in whole if m.index == index]
        assert [len(m.prompt_logprobs) for m in mine[:4]] == [3, 3, 3, 2] and not any(m.prompt_logprobs for m in mine[4:])
        assert [len(m.prompt_logprobs) for m in ref][0] == 11
        for part in mine[:3]:   # parts carry nothing else
            assert not (part.token_ids or part.text or part.logprobs or part.finish_reason or part.prompt_text
                        or part.HasField("usage")) and part.request_id == mine[3].request_id
        first = mine[3]   # the last part rides with the first tokens (or the finish), with the echo
        assert (list(first.token_ids) if max_tokens else first.finish_reason) and first.prompt_text == ref[0].prompt_text
        joined = [lp for m in mine for lp in m.prompt_logprobs]
        assert [lp.token_id for lp in joined] == PROMPT
        assert _prompt_logprobs(joined) == _prompt_logprobs(ref[0].prompt_logprobs)
        assert [t for m in mine for t in m.token_ids] == [t for m in ref for t in m.token_ids]
    assert split[-1].usage == whole[-1].usage


def test_rest_echo_is_the_same_whatever_the_part_size(stack):
    servicer, _, _, url = stack
    requests = [{"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2},
                {"prompt": ["To be, or not to be, that is", "Friends, Romans, countrymen"], "n": 2, "max_tokens": 3, "echo": True,
                 "logprobs": 1, "temperature": 0, "ignore_eos": True}]
    with httpx.Client(base_url=url, timeout=60) as http:
        def post(body):
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"]

        for body in requests:
            split = post(body)
            _assert_same(split, _at_default_size(servicer, lambda: post(body)))
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            _assert_same(_joined(lines[:-1]), split)
    prompt, scored = split[0]["text"], split[0]["logprobs"]   # "To be, ...": its prompt's tokens, then 3 generated
    assert prompt.startswith("To be, or not to be, that is") and scored["token_logprobs"][0] is None
    assert "".join(scored["tokens"]) == prompt and len(scored["tokens"]) > 3 + PART


def _joined(lines: list[str]) -> list[dict]:
    """Streamed completion chunks -> whole choices: text and logprobs concatenated per index."""
    choices: dict[int, dict] = {}
    for line in lines:
        for c in json.loads(line)["choices"]:
            mine = choices.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None,
                                                   "logprobs": {k: [] for k in LEGACY}})
            mine["text"] += c["text"]
            mine["finish_reason"] = c["finish_reason"] or mine["finish_reason"]
            for k in LEGACY:
                mine["logprobs"][k] += c["logprobs"][k]
    return [choices[i] for i in sorted(choices)]


LEGACY = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _assert_same(got: list[dict], want: list[dict]) -> None:
    """Equal choices; log-probs to float tolerance (two runs may batch the prompts differently)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["index"], g["text"], g["finish_reason"]) == (w["index"], w["text"], w["finish_reason"])
        gl, wl = g["logprobs"], w["logprobs"]
        assert (gl["tokens"], gl["text_offset"]) == (wl["tokens"], wl["text_offset"])
        assert [x is None for x in gl["token_logprobs"]] == [x is None for x in wl["token_logprobs"]]
        assert [x for x in gl["token_logprobs"] if x is not None] == pytest.approx(
            [x for x in wl["token_logprobs"] if x is not None], abs=1e-5)
        for gt, wt in zip(gl["top_logprobs"], wl["top_logprobs"]):
            assert (gt is None and wt is None) or (list(gt) == list(wt)
                                                    and list(gt.values()) == pytest.approx(list(wt.values()), abs=1e-5))
