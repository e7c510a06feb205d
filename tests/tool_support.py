"""A tiny model that really calls tools: the conftest tokenizer (astrai's default chat template,
which renders tools in the Qwen / Hermes format) and a 2-layer model overfit in a few seconds on
a handful of conversations, so greedy decoding writes `<tool_call>` blocks for their prompts and
answers once the tool's result is in. Every other prompt gets what a near-random model writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS = [WEATHER]   # the tools the lessons are rendered with (one: a short prompt, a fast lesson)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TWO = [{"role": "user", "content": "Weather in Paris and Rome, please."}]
CALL_ID = "call_weather_paris"
PARIS_ARGS = '{"city": "Paris"}'
# ASK with the call made and its result back: the model then answers in words.
ROUND_TRIP = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 24 C"}]
ANSWER = "It is sunny in Paris."


def _call(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>' % city


# (messages, what the assistant writes) — the prompts the daemon tests send.
LESSONS = [
    (ASK, _call("Paris")),
    (ASK_TWO, "Let me check.\n" + _call("Paris") + "\n" + _call("Rome")),
    (ROUND_TRIP, ANSWER),
]


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what the core hands the chat template (arguments parsed, content text)."""
    out = []
    for m in messages:
        m = dict(m, content=m.get("content") or "")
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def train_tool_model(tokenizer_dir: Path, out: Path, steps: int = 200) -> Path:
    from astrai_train.model import ModelConfig, Transformer
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for messages, reply in LESSONS:
        prompt = tok.apply_chat_template(template_messages(messages), add_generation_prompt=True, tools=TOOLS)
        target = tok.encode(reply) + [tok.end_of_turn_id]
        rows.append((prompt, target))
    length = max(len(p) + len(t) for p, t in rows)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128,
                         max_len=1024, use_qk_norm=True, init_std=0.05)
    ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        seq = prompt + target
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(target)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 5e-3:   # ~70 steps, a few seconds: greedy decoding then repeats the lessons
                break
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- one daemon serving the trained tool model, for a test module --------------------------------
# Import the three fixtures into a test module (`from tool_support import client, daemon, http`).
SERVED_NAME = "tiny-tools"


@pytest.fixture(scope="module")
def daemon(tokenizer_dir, tmp_path_factory):
    from daemon_support import start_serve

    model = train_tool_model(tokenizer_dir, tmp_path_factory.mktemp("tool_model"))
    proc = start_serve(model, tmp_path_factory.mktemp("logs") / "serve.log", "--served-model-name", SERVED_NAME)
    yield proc
    assert proc.terminate() == 0, proc.stderr()


@pytest.fixture(scope="module")
def client(daemon):
    import openai

    return openai.OpenAI(base_url=daemon.ready["http"] + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(daemon):
    import httpx

    with httpx.Client(base_url=daemon.ready["http"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def spec_validator():
    """Validates a body against a schema of the official OpenAI OpenAPI specification."""
    import jsonschema
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    path = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.yaml"
    if not path.exists():
        pytest.skip(f"no OpenAI specification at {path}")
    spec = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    registry = Registry().with_resource("urn:openai", Resource(contents=spec, specification=DRAFT202012))

    events = {}   # event type -> the name of its schema among ResponseStreamEvent's
    for option in spec["components"]["schemas"]["ResponseStreamEvent"]["anyOf"]:
        name = option["$ref"].rsplit("/", 1)[1]
        for kind in spec["components"]["schemas"][name].get("properties", {}).get("type", {}).get("enum", ()):
            events[kind] = name

    def validate(body: dict, schema: str) -> None:
        if schema == "ResponseStreamEvent":
            schema = events[body["type"]]
        ref = {"$ref": f"urn:openai#/components/schemas/{schema}"}
        errors = [f"{list(e.absolute_path)}: {e.message:.300}"
                  for e in jsonschema.Draft202012Validator(ref, registry=registry).iter_errors(body)]
        assert not errors, f"{schema} {body.get('type', '')}: " + "\n".join(errors)
    return validate
