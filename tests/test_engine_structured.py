"""Structured output in the engine (astrai_serve/engine/structured/): a tiny random model with a real
tokenizer, sampled at temperature 1 over many seeds, must produce text that parses and validates
against its JSON Schema / regex / choice / Lark grammar / tool-call format whenever it finishes
with "stop"; unconstrained neighbours in the same batch are untouched; preemption, the prefix
cache, n > 1, async scheduling and (emulated) CUDA graphs keep the matchers right; grammars
compile once per schema, off the step loop; bad ones fail their own request only."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from astrai_serve import LLM, SamplingParams
from astrai_serve.engine import LLMEngine
from astrai_serve.engine.structured.bitmask import DeviceMask, apply_bitmask
from astrai_serve.engine.structured.vocab import token_bytes
from astrai_serve.engine.structured_spec import StructuredOutput

pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread

ENGINE = dict(num_pages=256, page_size=8, device="cpu", max_num_seqs=32, structured_compile_wait_s=30.0)
SEEDS = range(20)
PROMPT = "KING. Say what you will:"

SCHEMAS = {
    "small": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["id", "owner", "status"],
               "properties": {
                   "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                   "owner": {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
                             "properties": {"name": {"type": "string", "maxLength": 8},
                                            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                     "minItems": 1, "maxItems": 3}}},
                   "status": {"enum": ["open", "closed", None, 3]},
                   "ok": {"type": "boolean"}}},
    "array": {"type": "array", "minItems": 1, "maxItems": 3,
              "items": {"type": "object", "additionalProperties": False, "required": ["x"],
                        "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                       "y": {"type": ["string", "null"], "maxLength": 5}}}},
    "refs": {"$defs": {"pt": {"type": "object", "additionalProperties": False, "required": ["k", "n"],
                              "properties": {"k": {"const": "v"}, "n": {"type": "integer", "maximum": 99}}}},
             "anyOf": [{"$ref": "#/$defs/pt"}, {"type": "string", "pattern": "^[a-z]{2,4}$"}]},
}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["q"],
          "properties": {"q": {"type": "string", "maxLength": 10}, "limit": {"type": "integer", "maximum": 9}}}


def call_schema(name, params):
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": params}}


TOOLS = [call_schema("get_weather", WEATHER), call_schema("search", SEARCH)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


def spec(**kw):
    return StructuredOutput(**kw)


def sampled(llm, structured, seeds=SEEDS, max_tokens=80, prompt=PROMPT, **kw):
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, structured=structured, **kw)
              for s in seeds]
    return llm.generate([prompt] * len(params), params)


def stopped(results, at_least):
    done = [r for r in results if r.finish_reason == "stop"]
    assert len(done) >= at_least, [(r.finish_reason, r.text) for r in results]
    assert all(r.finish_reason in ("stop", "length") for r in results)
    return done


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(llm, name):
    schema = SCHEMAS[name]
    results = sampled(llm, spec(json=json.dumps(schema)))
    for r in stopped(results, at_least=15):
        jsonschema.validate(json.loads(r.text), schema)
        assert r.token_ids[-1] not in llm.tokenizer.stop_ids   # it ends on its closing character, no eos
    # a cut by max_tokens is "length", and the text then is a prefix (OpenAI's behaviour too)
    short = sampled(llm, spec(json=json.dumps(schema)), seeds=range(3), max_tokens=3)
    assert [r.finish_reason for r in short] == ["length"] * 3 and all(len(r.token_ids) == 3 for r in short)


def test_json_object_outputs_parse(llm):
    results = sampled(llm, spec(json_object=True), max_tokens=48)
    for r in stopped(results, at_least=3):
        assert isinstance(json.loads(r.text), dict)
    for r in results:   # cut or not, the text is a JSON object so far
        assert r.text.startswith("{")


def test_regex_choice_and_lark_grammar(llm):
    pattern = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}-[0-9]{2}"
    for r in stopped(sampled(llm, spec(regex=pattern), max_tokens=40), at_least=20):
        assert re.fullmatch(pattern, r.text), r.text
    choices = ("yes", "no", "maybe so", "明月")
    results = stopped(sampled(llm, spec(choice=choices), max_tokens=20), at_least=20)
    assert all(r.text in choices for r in results) and len({r.text for r in results}) > 1
    pairs = 'start: pair (";" pair)*\npair: KEY "=" VALUE\nKEY: /[a-z]{1,5}/\nVALUE: /[0-9]{1,3}/\n'
    for r in stopped(sampled(llm, spec(grammar=pairs), max_tokens=60), at_least=15):
        assert re.fullmatch(r"[a-z]{1,5}=[0-9]{1,3}(;[a-z]{1,5}=[0-9]{1,3})*", r.text), r.text
    nested = 'start: item\nitem: "x" | "(" item ("," item)* ")"\n'     # balanced: no regex says that
    for r in stopped(sampled(llm, spec(grammar=nested), max_tokens=60), at_least=8):
        depth = 0
        for ch in r.text:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0 and ch in "x(),"
        assert depth == 0 and r.text


def _calls(text):
    blocks = text.split("\n")
    assert len(blocks) % 3 == 0, text
    calls = []
    for i in range(0, len(blocks), 3):
        assert blocks[i] == "<tool_call>" and blocks[i + 2] == "</tool_call>", text
        calls.append(json.loads(blocks[i + 1]))
    return calls


def _valid_call(call):
    errors = 0
    for schema in TOOLS:
        try:
            jsonschema.validate(call, schema)
        except jsonschema.ValidationError:
            errors += 1
    return errors < len(TOOLS)


def test_tool_calls_single_and_parallel(llm):
    one = spec(tool_calls=tuple(json.dumps(t) for t in TOOLS), parallel_tool_calls=False)
    for r in stopped(sampled(llm, one, max_tokens=80), at_least=15):
        calls = _calls(r.text)
        assert len(calls) == 1 and _valid_call(calls[0]), r.text
    many = spec(tool_calls=tuple(json.dumps(t) for t in TOOLS))
    counts = []
    for r in stopped(sampled(llm, many, seeds=range(12), max_tokens=120), at_least=6):
        calls = _calls(r.text)
        assert calls and all(_valid_call(c) for c in calls), r.text
        counts.append(len(calls))
    assert max(counts) >= 1


def test_unconstrained_neighbours_are_untouched(llm):
    plain = ["HAMLET. To be", "Good night, sweet", "What is a man"]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [r.token_ids for r in llm.generate(plain, greedy)]
    schema = spec(json=json.dumps(SCHEMAS["nested"]))
    prompts = [plain[0], PROMPT, plain[1], PROMPT, plain[2]]
    params = [greedy, SamplingParams(max_tokens=60, seed=1, structured=schema), greedy,
              SamplingParams(max_tokens=60, temperature=0.0, structured=schema), greedy]
    mixed = llm.generate(prompts, params)
    assert [mixed[i].token_ids for i in (0, 2, 4)] == alone
    for r in (mixed[1], mixed[3]):
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), SCHEMAS["nested"])


def test_n_samples_each_follow_their_grammar(llm):
    schema = SCHEMAS["small"]
    res = llm.generate(PROMPT, SamplingParams(n=6, max_tokens=60, seed=3, structured=spec(json=json.dumps(schema))))[0]
    texts = [o.text for o in res.outputs if o.finish_reason == "stop"]
    assert len(texts) >= 4 and len(set(texts)) > 1
    for t in texts:
        jsonschema.validate(json.loads(t), schema)


def test_preemption_and_prefix_cache_keep_matchers_right(tiny_model_dir, llm):
    schema = SCHEMAS["nested"]
    structured = spec(json=json.dumps(schema))
    long_prompt = "HAMLET. " + "The rest is silence, and the play goes on. " * 5
    params = [SamplingParams(max_tokens=90, temperature=0.0 if s % 2 else 1.0, seed=s, structured=structured)
              for s in range(8)]
    roomy = llm.generate([long_prompt + str(s) for s in range(8)], params)
    tight = LLM(tiny_model_dir, **(ENGINE | dict(num_pages=40, max_num_seqs=8)))
    cramped = tight.generate([long_prompt + str(s) for s in range(8)], params)
    stats = tight.engine.stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hit_tokens_total > 0
    assert [r.token_ids for r in cramped] == [r.token_ids for r in roomy]   # preempted = recomputed, same tokens
    for r in stopped(cramped, at_least=6):
        jsonschema.validate(json.loads(r.text), schema)
    again = tight.generate(long_prompt + "0", params[0])[0]        # a prefix-cache hit, same grammar
    assert again.cached_tokens > 0 and again.token_ids == cramped[0].token_ids


def _drain(engine):
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id, o.index] = o
    return done


@pytest.mark.parametrize("graphs", [False, True])
def test_async_scheduling_gives_the_same_tokens(tiny_model_dir, graphs):
    """Async on: constrained decodes launched ahead run their forward at once and sample once the
    matchers have the previous ids (the _Deferred path); the tokens equal the synchronous run."""
    from test_engine_runner import with_emulated_graphs

    structured = spec(json=json.dumps(SCHEMAS["small"]))
    requests = [(f"c{s}", PROMPT, SamplingParams(max_tokens=50, seed=s, structured=structured)) for s in range(4)]
    requests += [(f"p{s}", "Good night, sweet", SamplingParams(max_tokens=30, seed=s, ignore_eos=True))
                 for s in range(3)]
    runs = []
    for flag in (True, False):
        engine = LLMEngine(tiny_model_dir, **ENGINE, overlap_steps=True, async_scheduling=flag)
        used = with_emulated_graphs(engine, max_batch=8) if graphs else None
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        runs.append((_drain(engine), engine.num_async_steps))
        assert engine.stats().pages_in_use == 0
        if graphs:
            assert any(engine.runner.graphs.padded_size(n) is not None for n in used)
    (on, steps_on), (off, steps_off) = runs
    assert steps_on > 0 and steps_off == 0
    assert {k: o.token_ids for k, o in on.items()} == {k: o.token_ids for k, o in off.items()}
    for (rid, _), o in on.items():
        if rid.startswith("c") and o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMAS["small"])


def test_the_grammar_cache_compiles_each_schema_once(llm):
    compiler = llm.engine._structured.compiler
    schema = {"type": "object", "required": ["q"], "additionalProperties": False,
              "properties": {"q": {"enum": ["once", "twice"]}}}
    before = compiler.num_compiled
    sampled(llm, spec(json=json.dumps(schema)), seeds=range(2))
    assert compiler.num_compiled == before + 1
    sampled(llm, spec(json=json.dumps(schema, indent=2)), seeds=range(2, 4))   # spacing does not split the cache
    assert compiler.num_compiled == before + 1
    sampled(llm, spec(regex="[ab]{3}"), seeds=range(2))
    assert compiler.num_compiled == before + 2


@pytest.mark.parametrize("field,value,message", [
    ("json", json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    ("json", json.dumps({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ("regex", "a(?=b)", "regex"),
    ("grammar", "start: foo\n", "foo"),
    ("tool_calls", (json.dumps({"type": "object", "properties": {"name": {"const": "f"}},
                                "required": ["name"], "not": {}}),), "not"),
])
def test_a_bad_grammar_fails_its_request_only(llm, field, value, message):
    engine = llm.engine
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=rf"invalid structured output {field}=.*{re.escape(message)}"):
        engine.add_request("bad", PROMPT, SamplingParams(max_tokens=8, structured=spec(**{field: value})))
    done = _drain(engine)
    assert list(done) == [("good", 0)] and done["good", 0].completion_tokens == 8
    with pytest.raises(ValueError, match=f"invalid structured output {field}="):   # LLM.generate too
        llm.generate(PROMPT, SamplingParams(max_tokens=8, structured=spec(**{field: value})))


def test_structured_needs_eos_and_a_tokenizer(llm):
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=spec(regex="a+"))
    from engine_support import model_of

    bare = LLMEngine.from_model(model_of("gqa"), None, num_pages=16, device="cpu")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.add_request("r", [1, 2, 3], SamplingParams(structured=spec(regex="a+")))


BIG = {"type": "object", "additionalProperties": False, "required": ["f0"],
       "properties": {f"f{i}": {"enum": [f"v{i}_{j}" for j in range(30)]} for i in range(300)}}


def test_a_compiling_grammar_waits_in_the_queue_without_stalling_others(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, **(ENGINE | dict(structured_compile_wait_s=0.0)))
    engine.add_request("slow", PROMPT, SamplingParams(max_tokens=40, seed=0, structured=spec(json=json.dumps(BIG))))
    engine.add_request("plain", PROMPT, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert engine.stats().num_waiting >= 1          # held while compiling (a 25 ms compile)
    first = engine.step()
    assert [o.request_id for o in first] == ["plain"]
    done = _drain(engine)
    assert done["plain", 0].completion_tokens == 4 and ("slow", 0) in done
    slow = done["slow", 0]
    assert slow.finish_reason in ("stop", "length") and slow.error is None
    if slow.finish_reason == "stop":
        jsonschema.validate(json.loads(slow.text), BIG)


def test_a_grammar_failing_after_admission_ends_that_request_with_its_error(tiny_model_dir):
    """A grammar that only the tokenizer can judge (it names a special token the vocabulary lacks),
    still compiling when add_request returned: its request ends, with the error, and no tokens."""
    engine = LLMEngine(tiny_model_dir, **(ENGINE | dict(structured_compile_wait_s=0.0)))
    bad = spec(grammar='start: "a" <|no_such_token|>\n')
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=8, n=2, structured=bad))
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    done = _drain(engine)
    for i in (0, 1):
        out = done["bad", i]
        assert out.finish_reason == "abort" and out.completion_tokens == 0
        assert "invalid structured output grammar=" in out.error and "no_such_token" in out.error
    assert done["good", 0].completion_tokens == 5 and done["good", 0].error is None
    assert engine.stats().pages_in_use == 0 and not engine.has_unfinished_requests()
    llm = LLM(tiny_model_dir, **(ENGINE | dict(structured_compile_wait_s=0.0)))
    with pytest.raises(ValueError, match="no_such_token"):      # LLM.generate raises it, as for a sync error
        llm.generate(PROMPT, SamplingParams(max_tokens=8, structured=bad))


def test_abort_a_held_request(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, **(ENGINE | dict(structured_compile_wait_s=0.0)))
    other = dict(BIG, required=["f1"])                  # a new key: compiles anew
    engine.add_request("held", PROMPT, SamplingParams(max_tokens=8, structured=spec(json=json.dumps(other))))
    engine.abort_request("held")
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    class SentencePieceLike:   # "▁" for spaces and <0xNN> byte fallback (Llama-2 style)
        def __init__(self):
            import tokenizers
            from tokenizers import decoders, models

            vocab = {"<unk>": 0, "<0x0A>": 1, "▁the": 2, "▁cat": 3, "é": 4}
            self.backend = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
            self.backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
            self.vocab_size = 5

    assert token_bytes(SentencePieceLike(), 7) == [b"<unk>", b"\n", b" the", b" cat", "é".encode(), b"", b""]


def test_token_bytes_of_the_byte_level_tokenizer(llm):
    tok = llm.tokenizer
    tb = token_bytes(tok)
    for text in ('{"a": [1, 2.5e-3, null]}', "用中文说 🌙\n\t", "<tool_call>\n"):
        assert b"".join(tb[i] for i in tok.encode(text)) == text.encode()


def test_apply_bitmask_masks_its_rows_only():
    logits = torch.randn(3, 70)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 0], bits[0, 2] = 0b101, 1 << 3          # tokens 0, 2 and 67
    out = apply_bitmask(logits, DeviceMask(torch.tensor([1]), bits))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    row = out[1]
    assert torch.isfinite(row).nonzero().flatten().tolist() == [0, 2, 67]
    assert torch.equal(row[[0, 2, 67]], logits[1, [0, 2, 67]]) and out.data_ptr() != logits.data_ptr()


def test_logprobs_under_a_grammar_are_over_its_tokens(llm):
    choices = ("yes", "no")
    res = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=5,
                                              structured=spec(choice=choices)))[0]
    logprobs = res.outputs[0].logprobs
    assert res.text in choices and len(logprobs) == len(res.token_ids)
    alternatives = [t for t, lp in logprobs[0][2] if lp > float("-inf")]
    assert alternatives and all(any(c.startswith(llm.tokenizer.decode([t])) for c in choices) for t in alternatives)
    # the distribution it was drawn from: the allowed tokens' probabilities add up to one
    assert float(torch.tensor([lp for _, lp in logprobs[0][2]]).exp().sum()) == pytest.approx(1, abs=1e-4)
