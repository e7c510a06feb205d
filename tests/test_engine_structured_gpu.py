"""Structured output on a real GPU, with the engine's fast path on (CUDA graphs, async scheduling,
overlapped steps). Run with `pytest -m gpu`.

- constrained requests (JSON Schema, regex, choice, tool calls) mixed with free ones: every output
  that finished with "stop" validates, with decode steps replayed as graphs and launched ahead
  (their sampling deferred until the matchers have the previous ids);
- the same seeded requests give the same tokens with async scheduling on and off, and the steps
  make no host sync but the sampled ids' event (`torch.cuda.set_sync_debug_mode("error")`): the
  masks are filled on the host and reach the device in one non-blocking copy.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from astrai_serve.engine import LLMEngine, SamplingParams
from astrai_serve.engine.structured_spec import StructuredOutput

pytestmark = pytest.mark.gpu

PROMPT = "KING. Say what you will:"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "status"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
                         "status": {"enum": ["open", "closed", None]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 99}}}
REGEX = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}"
CHOICES = ("yes", "no", "maybe so")
CALL = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": "get_weather"},
                       "arguments": {"type": "object", "additionalProperties": False, "required": ["city"],
                                     "properties": {"city": {"type": "string", "maxLength": 10}}}}}


def requests():
    """(id, params, check of a "stop" output's text) for a mixed batch."""
    out = []
    for s in range(12):
        out.append((f"json{s}", SamplingParams(max_tokens=96, seed=s, structured=StructuredOutput(json=json.dumps(SCHEMA))),
                    lambda t: jsonschema.validate(json.loads(t), SCHEMA)))
    for s in range(6):
        out.append((f"re{s}", SamplingParams(max_tokens=32, seed=s, structured=StructuredOutput(regex=REGEX)),
                    lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)))
        out.append((f"ch{s}", SamplingParams(max_tokens=16, seed=s, structured=StructuredOutput(choice=CHOICES)),
                    lambda t: t in CHOICES or pytest.fail(t)))
    for s in range(4):
        tools = StructuredOutput(tool_calls=(json.dumps(CALL),), parallel_tool_calls=False)
        out.append((f"tool{s}", SamplingParams(max_tokens=64, seed=s, structured=tools),
                    lambda t: jsonschema.validate(json.loads(t.split("\n")[1]), CALL)))
        out.append((f"free{s}", SamplingParams(max_tokens=40, seed=s, ignore_eos=True), None))
    return out


def drain(engine):
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def count_graph_steps(engine) -> list[bool]:
    seen: list[bool] = []
    uses = engine.runner.uses_graph
    engine.runner.uses_graph = lambda plan: seen.append(uses(plan)) or seen[-1]
    return seen


def test_constrained_outputs_validate_at_the_engine_defaults(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, device="cuda", num_pages=512, page_size=16, max_num_seqs=64,
                       structured_compile_wait_s=30.0)
    assert engine.runner.graphs is not None and engine._async and engine._overlap   # the defaults on CUDA
    used = count_graph_steps(engine)
    reqs = requests()
    for rid, params, _ in reqs:
        engine.add_request(rid, PROMPT, params)
    done = drain(engine)
    assert len(done) == len(reqs) and engine.stats().pages_in_use == 0
    stopped = 0
    for rid, params, check in reqs:
        out = done[rid]
        assert out.error is None and out.finish_reason in ("stop", "length")
        if check is None:
            assert out.completion_tokens == 40
        elif out.finish_reason == "stop":
            check(out.text)
            stopped += 1
    assert stopped >= len(reqs) // 2
    assert engine.num_async_steps > 10 and any(used)


def test_async_on_and_off_give_the_same_tokens_without_host_syncs(tiny_model_dir):
    outs = {}
    reqs = requests()
    for flag in (False, True):
        engine = LLMEngine(tiny_model_dir, device="cuda", dtype="float32", compile_decode=False, num_pages=512,
                           page_size=16, max_num_seqs=64, cuda_graph_max_batch=32, async_scheduling=flag,
                           structured_compile_wait_s=30.0)
        for rid, params, _ in reqs:                       # warm-up: grammars compile, kernels load, pools grow
            engine.add_request("warm-" + rid, PROMPT, params)
        drain(engine)
        torch.cuda.synchronize()
        for rid, params, _ in reqs:
            engine.add_request(rid, PROMPT, params)       # cache hits: nothing waits for a compile
        torch.cuda.set_sync_debug_mode("error")
        try:
            done = drain(engine)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs[flag] = {rid: o.token_ids for rid, o in done.items()}
        assert (engine.num_async_steps > 10) == flag and engine.stats().pages_in_use == 0
    assert outs[True] == outs[False] and len(outs[True]) == len(reqs)
