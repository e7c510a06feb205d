"""Anthropic's Messages API (`POST /v1/messages`) through a real `astrai serve` process with the
real `anthropic` client: whole and streamed messages, the system prompt, stop_sequences,
max_tokens, tool use and a tool_result round trip (the tiny model of tool_support.py calls
get_weather for its prompts), x-api-key auth and Anthropic-shaped errors naming the bad field."""
from __future__ import annotations

import re

import anthropic
import httpx
import openai
import pytest

from daemon_support import start_serve
from tool_support import ANSWER, ASK, ASK_TWO, CALL_ID, WEATHER, train_tool_model

pytestmark = pytest.mark.timeout(180)
MODEL = "tiny-messages"
KEY = "sk-messages-test"
TOOL = {"name": WEATHER["function"]["name"], "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"]}
ROUND_TRIP = [
    {"role": "user", "content": ASK[0]["content"]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": CALL_ID, "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": CALL_ID,
                                  "content": [{"type": "text", "text": "sunny, 24 C"}]}]},
]
# The anthropic SDK 2.x has no temperature argument any more; the API field still works
GREEDY = dict(model=MODEL, max_tokens=40, extra_body={"temperature": 0})
TOOL_GREEDY = {**GREEDY, "max_tokens": 120}   # a whole <tool_call> block fits


@pytest.fixture(scope="module")
def daemon(tokenizer_dir, tmp_path_factory):
    model = train_tool_model(tokenizer_dir, tmp_path_factory.mktemp("tool_model"))
    proc = start_serve(model, tmp_path_factory.mktemp("logs") / "serve.log", "--served-model-name", MODEL,
                       "--api-key", KEY)
    yield proc
    assert proc.terminate() == 0, proc.stderr()


@pytest.fixture(scope="module")
def client(daemon):
    return anthropic.Anthropic(base_url=daemon.ready["http"], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.ready["http"], timeout=60, headers={"x-api-key": KEY}) as c:
        yield c


def _text(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_plain_message_whole_and_streamed(client):
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.messages.create(messages=messages, **GREEDY)
    assert re.fullmatch(r"msg_[0-9a-f]{24}", whole.id) and whole.type == "message" and whole.role == "assistant"
    assert whole.model == MODEL and whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 40
    with client.messages.stream(messages=messages, **GREEDY) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == _text(final) == _text(whole) != ""
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_raw_stream_events_in_order(http):
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Hello there"}]}
    with http.stream("POST", "/v1/messages", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == \
        ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}


def test_system_prompt_reaches_the_template(client, daemon):
    system, user = "You are a terse assistant.", "Hello there"
    reply = client.messages.create(system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                                   messages=[{"role": "user", "content": user}], **GREEDY)
    chat = openai.OpenAI(base_url=daemon.ready["http"] + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert _text(reply) == chat.choices[0].message.content
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    plain = client.messages.create(messages=[{"role": "user", "content": user}], **GREEDY)
    assert plain.usage.input_tokens < reply.usage.input_tokens


def test_stop_sequences_and_max_tokens(client):
    whole = client.messages.create(messages=ROUND_TRIP, tools=[TOOL], **GREEDY)
    assert _text(whole) == ANSWER and whole.stop_reason == "end_turn" and whole.stop_sequence is None
    stopped = client.messages.create(messages=ROUND_TRIP, tools=[TOOL], stop_sequences=["nothing", "sunny"],
                                     **GREEDY)
    assert _text(stopped) == "It is " and stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "sunny"
    with client.messages.stream(messages=ROUND_TRIP, tools=[TOOL], stop_sequences=["sunny"], **GREEDY) as stream:
        final = stream.get_final_message()
    assert _text(final) == "It is " and final.stop_reason == "stop_sequence" and final.stop_sequence == "sunny"
    short = client.messages.create(messages=ROUND_TRIP, tools=[TOOL], **{**GREEDY, "max_tokens": 2})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    assert ANSWER.startswith(_text(short))


def test_tool_use_whole_and_streamed(client):
    ask = [{"role": "user", "content": ASK[0]["content"]}]
    reply = client.messages.create(messages=ask, tools=[TOOL], **TOOL_GREEDY)
    assert reply.stop_reason == "tool_use"
    [block] = reply.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    assert re.fullmatch(r"toolu_[0-9a-f]{24}", block.id)
    with client.messages.stream(messages=[{"role": "user", "content": ASK[0]["content"]}], tools=[TOOL],
                                **TOOL_GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert partial.replace(" ", "") == '{"city":"Paris"}'
    # tool_choice "none": the call stays text
    plain = client.messages.create(messages=[{"role": "user", "content": ASK[0]["content"]}], tools=[TOOL],
                                   tool_choice={"type": "none"}, **TOOL_GREEDY)
    assert plain.stop_reason == "end_turn" and _text(plain).startswith("<tool_call>")


def test_tool_choice_tool_forces_a_call(client):
    # tool_choice "tool" is chat's named function: the engine constrains the output to that call
    reply = client.messages.create(messages=[{"role": "user", "content": "Hello there"}], tools=[TOOL],
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True}, **TOOL_GREEDY)
    assert [b.type for b in reply.content] == ["tool_use"] and reply.content[0].name == "get_weather"
    assert isinstance(reply.content[0].input.get("city"), str) and reply.stop_reason == "tool_use"


def test_text_then_two_tool_uses_whole_and_streamed(client):
    messages = [{"role": "user", "content": ASK_TWO[0]["content"]}]
    whole = client.messages.create(messages=messages, tools=[TOOL], thinking={"type": "disabled"}, **TOOL_GREEDY)
    with client.messages.stream(messages=messages, tools=[TOOL], **TOOL_GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    for message in (whole, final):
        assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
        assert message.content[0].text == "Let me check." and message.stop_reason == "tool_use"
        assert [b.input for b in message.content[1:]] == [{"city": "Paris"}, {"city": "Rome"}]
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1, 2]


def test_tool_result_round_trip(client):
    reply = client.messages.create(messages=ROUND_TRIP, tools=[TOOL], **GREEDY)
    assert reply.content[0].type == "text" and reply.content[0].text == ANSWER
    string_result = [*ROUND_TRIP[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": CALL_ID, "content": "sunny, 24 C"}]}]
    assert _text(client.messages.create(messages=string_result, tools=[TOOL], **GREEDY)) == ANSWER


def test_x_api_key_auth(daemon, http):
    base = daemon.ready["http"]
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"x-api-key": "wrong"}):
        r = httpx.post(base + "/v1/messages", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(base + "/v1/messages", json=body, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base, api_key="nope", max_retries=0).messages.create(
            messages=body["messages"], model=MODEL, max_tokens=2)


@pytest.mark.parametrize("change, field", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"stop_sequences": "x"}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "",
                                                                             "media_type": "image/png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0].tool_use_id"),
])
def test_bad_input_is_a_400_naming_the_field(http, change, field):
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]


def test_unknown_model_and_bad_json(http):
    body = {"model": "other", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
