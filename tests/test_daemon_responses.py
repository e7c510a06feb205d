"""OpenAI's Responses API (`POST /v1/responses`) through a real `astrai serve` process and the real
`openai` client: whole and streamed responses (the SDK's event types, in order), instructions,
max_output_tokens, function tools and a function_call_output round trip, text.format json_schema,
and the refusals (stored responses, reasoning, unknown fields). The model is tool_support.py's
tiny one, trained in seconds to call get_weather, so the calls are the model's own output."""
from __future__ import annotations

import json
import re

import openai
import pytest

from tool_support import SERVED_NAME, client, daemon, http, spec_validator  # noqa: F401 (fixtures)
from tool_support import ANSWER, ASK, ASK_TWO, CALL_ID, PARIS_ARGS, ROUND_TRIP, TOOLS

pytestmark = pytest.mark.timeout(180)
MODEL = SERVED_NAME
# Responses' function tools are flat: {type, name, description, parameters}
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
GREEDY = dict(model=MODEL, temperature=0)


def _chat_text(client, messages, **kwargs) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs
                                          ).choices[0].message.content


def test_text_response_matches_chat(client):
    resp = client.responses.create(input="Hello there", max_output_tokens=24, **GREEDY)
    assert resp.object == "response" and re.fullmatch(r"resp_[0-9a-f]{32}", resp.id) and resp.model == MODEL
    assert resp.output_text == _chat_text(client, [{"role": "user", "content": "Hello there"}],
                                          max_completion_tokens=24)
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    u = resp.usage
    assert u.input_tokens > 3 and 1 <= u.output_tokens <= 24 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    assert resp.status in ("completed", "incomplete") and resp.max_output_tokens == 24 and resp.temperature == 0
    assert resp.tool_choice == "auto" and resp.tools == [] and resp.text.format.type == "text"
    # input as message items with text parts: the same prompt
    items = client.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                                         {"type": "input_text", "text": "there"}]}],
                                    max_output_tokens=24, **GREEDY)
    assert items.output_text == resp.output_text and items.usage.input_tokens == u.input_tokens


def test_instructions_reach_the_template(client, http):
    system = "You are terse."
    resp = client.responses.create(input="Hello there", instructions=system, max_output_tokens=16, **GREEDY)
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}]
    assert resp.output_text == _chat_text(client, chat, max_completion_tokens=16)
    assert resp.usage.input_tokens == http.post("/tokenize", json={"messages": chat, "add_generation_prompt": True}
                                                ).json()["count"]
    assert resp.instructions == system
    # a developer message is the same system message
    dev = client.responses.create(input=[{"role": "developer", "content": system},
                                         {"role": "user", "content": "Hello there"}], max_output_tokens=16, **GREEDY)
    assert dev.output_text == resp.output_text


def test_max_output_tokens_makes_it_incomplete(client):
    resp = client.responses.create(input="Tell me a story", max_output_tokens=5, extra_body={"ignore_eos": True},
                                   **GREEDY)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 5 and resp.output[0].status == "incomplete"
    events = list(client.responses.create(input="Tell me a story", max_output_tokens=5, stream=True,
                                          extra_body={"ignore_eos": True}, **GREEDY))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text


def test_stream_events_and_text(client):
    kwargs = dict(input="Tell me a story", max_output_tokens=20, **GREEDY)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response." + whole.status]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text and events[-4].text == text and events[-3].part.text == text
    assert events[0].response.status == "in_progress" and events[-1].response.output_text == text
    assert events[-1].response.id == events[0].response.id and events[-1].response.usage.output_tokens > 0
    # the SDK's stream helper
    with client.responses.stream(input="Hello there", max_output_tokens=24, **GREEDY) as stream:
        got = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert got == final.output_text == client.responses.create(input="Hello there", max_output_tokens=24,
                                                               **GREEDY).output_text


def _calls(resp) -> list[tuple[str, dict]]:
    return [(i.name, json.loads(i.arguments)) for i in resp.output if i.type == "function_call"]


def test_function_tools(client):
    resp = client.responses.create(input=ASK[0]["content"], tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY)
    assert resp.status == "completed" and [i.type for i in resp.output] == ["function_call"]
    call = resp.output[0]
    assert _calls(resp) == [("get_weather", {"city": "Paris"})]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.call_id) and call.id.startswith("fc_") and call.status == "completed"
    assert resp.output_text == "" and resp.tools[0].name == "get_weather"
    # text then two calls, streamed: the same items
    two = client.responses.create(input=ASK_TWO, tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY)
    assert [i.type for i in two.output] == ["message", "function_call", "function_call"]
    assert two.output_text == "Let me check."
    assert _calls(two) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    events = list(client.responses.create(input=ASK_TWO, tools=FLAT_TOOLS, max_output_tokens=120, stream=True,
                                          **GREEDY))
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call", "function_call"]
    args = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            args[e.output_index] = args.get(e.output_index, "") + e.delta
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.output_index, e.arguments) for e in done] == sorted(args.items())
    assert [e.arguments for e in done] == [i.arguments for i in two.output[1:]]
    final = events[-1].response
    assert final.output_text == "Let me check." and _calls(final) == _calls(two)
    with client.responses.stream(input=ASK_TWO, tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY) as stream:
        for _ in stream:
            pass
        assert _calls(stream.get_final_response()) == _calls(two)
    # tool_choice "none": the tools stay in the prompt, nothing is parsed
    plain = client.responses.create(input=ASK, tools=FLAT_TOOLS, tool_choice="none", max_output_tokens=120, **GREEDY)
    assert plain.output_text.startswith('<tool_call>\n{"name": "get_weather"')


def test_function_call_output_round_trip(client):
    first = client.responses.create(input=ASK, tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY)
    call = first.output[0]
    items = ASK + [call.model_dump(exclude_none=True),
                   {"type": "function_call_output", "call_id": call.call_id, "output": ROUND_TRIP[-1]["content"]}]
    answer = client.responses.create(input=items, tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY)
    assert answer.output_text == ANSWER and [i.type for i in answer.output] == ["message"]
    # the same conversation spelled with the lesson's own call id
    again = client.responses.create(input=ASK + [
        {"type": "function_call", "call_id": CALL_ID, "name": "get_weather", "arguments": PARIS_ARGS},
        {"type": "function_call_output", "call_id": CALL_ID, "output": ROUND_TRIP[-1]["content"]}],
        tools=FLAT_TOOLS, max_output_tokens=120, **GREEDY)
    assert again.output_text == ANSWER


def test_text_format_json_schema(client):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}}
    for seed in range(2):
        resp = client.responses.create(model=MODEL, input="Tell me a story", text=fmt, temperature=1.0,
                                       max_output_tokens=200, extra_body={"seed": seed})
        assert resp.status == "completed", resp
        jsonschema.validate(json.loads(resp.output_text), schema)
        assert resp.text.format.type == "json_schema"
    obj = client.responses.create(input="Hello there", text={"format": {"type": "json_object"}}, max_output_tokens=200,
                                  **GREEDY)
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


@pytest.mark.parametrize("body, param, words", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "stored responses"),
    ({"store": True}, "store", "stored responses"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"temperature": 9}, "temperature", "temperature"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "stored responses"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]", "text"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "function"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name", "tools[0].name"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "text.format.type"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": FLAT_TOOLS}, "tool_choice", "nope"),
    ({"input": None}, "input", "required"),
])
def test_bad_requests(http, body, param, words):
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error", error


def test_sdk_raises_on_refusals(client):
    with pytest.raises(openai.BadRequestError, match="stored responses"):
        client.responses.create(input="hi", previous_response_id="resp_abc", model=MODEL)
    ok = client.responses.create(input="hi", store=False, metadata={"k": "v"}, max_output_tokens=4, **GREEDY)
    assert ok.metadata == {"k": "v"}


def test_bodies_validate_against_the_openai_spec(http, spec_validator):
    for body in ({"input": "Hello there", "max_output_tokens": 8},
                 {"input": ASK_TWO, "tools": FLAT_TOOLS, "max_output_tokens": 120},
                 {"input": "Tell me a story", "max_output_tokens": 3, "ignore_eos": True}):
        body = {"model": MODEL, "temperature": 0, **body}
        spec_validator(http.post("/v1/responses", json=body).json(), "Response")
        with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line]
        events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
        assert [line[len("event: "):] for line in lines if line.startswith("event: ")] == [e["type"] for e in events]
        for event in events:
            spec_validator(event, "ResponseStreamEvent")
