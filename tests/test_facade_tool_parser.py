"""The Hermes tool-call parser on crafted text: whole responses, and the same text streamed in
pieces split at every character boundary (the reassembled content and arguments equal the whole
response's), then the REST facade's chunks for it as the openai SDK accumulates them."""
from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from astrai_serve.facade.protocol import parse_request
from astrai_serve.facade.responses import Assembler
from astrai_serve.facade.tool_parser import Arguments, CallStart, Content, HermesToolParser, parse_whole
from astrai_serve.proto import generate_pb2 as pb


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


NESTED = '{"city": "Paris", "days": [1, 2.5e3, {"a": "}]{\\"", "b": null}], "ok": true, "note": "</tool_call>"}'
# (text, content, [(name, arguments)])
CASES = [
    ("It is sunny.", "It is sunny.", []),
    ("plain, with a tag-like < and <tool and a trailing newline\n",
     "plain, with a tag-like < and <tool and a trailing newline\n", []),
    (call("get_weather", '{"city": "Paris"}'), None, [("get_weather", '{"city": "Paris"}')]),
    ("Let me check.\n" + call("get_weather", NESTED) + "\n" + call("get_time", "{}") + "\n",
     "Let me check.", [("get_weather", NESTED), ("get_time", "{}")]),
    ('<tool_call>{"arguments": {"x": [1]}, "name": "late_name"}</tool_call>', None, [("late_name", '{"x": [1]}')]),
    ('<tool_call>\n{"name": "no_args"}\n</tool_call>', None, [("no_args", "{}")]),
    ('<tool_call>{"name": "unclosed", "arguments": {"a": 1}}', None, [("unclosed", '{"a": 1}')]),
    ('Before <tool_call>not json</tool_call> after', "Before <tool_call>not json</tool_call> after", []),
    ('{"name": "bare"} with no tags', '{"name": "bare"} with no tags', []),
    ('<tool_call>\n{"name": "uni", "arguments": {"s": "明月 \\u00e9 🌕"}}\n</tool_call>', None,
     [("uni", '{"s": "明月 \\u00e9 🌕"}')]),
]


def _streamed(pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], list]:
    parser = HermesToolParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content)) or None
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index not in calls and e.id.startswith("call_")
            calls[e.index] = [e.name, ""]
        elif isinstance(e, Arguments):
            calls[e.index][1] += e.text   # never before its CallStart
    return content, [tuple(calls[i]) for i in sorted(calls)], events


@pytest.mark.parametrize("text,content,calls", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_whole_response(text, content, calls):
    got_content, got_calls = parse_whole(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize("text,content,calls", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_streamed_at_every_split_equals_whole(text, content, calls):
    assert _streamed([text])[:2] == (content, calls)
    assert _streamed(list(text))[:2] == (content, calls)          # one character at a time
    for cut in range(1, len(text)):                                # two pieces, cut anywhere
        assert _streamed([text[:cut], text[cut:]])[:2] == (content, calls), cut


def test_arguments_stream_as_they_are_written():
    text = call("get_weather", '{"city": "Paris"}')
    head = text[:text.index("Par")]
    parser = HermesToolParser()
    events = parser.feed(head)
    # the name went out as soon as it was complete, the arguments so far right behind it
    assert [type(e) for e in events] == [CallStart, Arguments] and events[0].name == "get_weather"
    assert events[1].text == '{"city": "'
    assert [e.text for e in parser.feed("Paris")] == ["Paris"]
    assert [e.text for e in parser.feed('"}') if isinstance(e, Arguments)] == ['"}']
    assert parser.feed("}\n</tool_call>") == [] and parser.finish() == [] and parser.called


def test_tag_prefixes_are_held_back_only_while_they_may_be_a_tag():
    parser = HermesToolParser()
    assert parser.feed("Hi <tool") == [Content("Hi")]
    assert parser.feed("box>") == [Content(" <toolbox>")]
    assert parser.feed("  ") == [] and parser.finish() == [Content("  ")]   # no call: whitespace kept


def _assemble(body: dict, texts: list[str], finish: str = "stop") -> tuple[dict, list[dict]]:
    """The facade's whole response and its stream for a chat whose sample writes `texts`."""
    responses = [pb.GenerateResponse(index=0, text=t, token_ids=[1]) for t in texts]
    responses[-1].finish_reason = finish
    responses[-1].usage.prompt_tokens, responses[-1].usage.completion_tokens = 5, len(texts)
    whole = Assembler(parse_request("chat", body, "tiny", 1024, "hermes"), "tiny")
    for r in responses:
        whole.add(r)
    streamed = Assembler(parse_request("chat", {**body, "stream": True}, "tiny", 1024, "hermes"), "tiny")
    chunks = [c for r in responses for c in streamed.chunks(r)]
    return whole.result(), chunks


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]
BODY = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}


def test_the_openai_sdk_reassembles_the_stream_into_the_whole_response():
    text = "Let me check.\n" + call("get_weather", NESTED) + "\n" + call("get_time", '{"tz": "CET"}')
    for pieces in ([text], list(text), [text[:40], text[40:97], text[97:]]):
        whole, chunks = _assemble(BODY, pieces)
        state = ChatCompletionStreamState(input_tools=TOOLS)
        for chunk in chunks:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
        final = state.get_final_completion().choices[0]
        message = whole["choices"][0]["message"]
        assert message["content"] == final.message.content == "Let me check."
        # (the ids are each response's own)
        assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert all(c.id.startswith("call_") and c.type == "function" for c in final.message.tool_calls)
        assert [c.function.arguments for c in final.message.tool_calls] == [NESTED, '{"tz": "CET"}']
        assert final.finish_reason == whole["choices"][0]["finish_reason"] == "tool_calls"
        first = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
        assert first[0]["id"].startswith("call_") and first[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert all(set(d) == {"index", "function"} for d in first[1:] if "id" not in d)


def test_finish_reasons_and_tool_choice_none():
    text = call("get_weather", '{"city": "Paris"}')
    whole, chunks = _assemble(BODY, [text])
    assert whole["choices"][0]["finish_reason"] == "tool_calls" and whole["choices"][0]["message"]["content"] is None
    # cut off by max_tokens: still "length", and the whole call still counts
    whole, _ = _assemble(BODY, [text], finish="length")
    assert whole["choices"][0]["finish_reason"] == "length" and len(whole["choices"][0]["message"]["tool_calls"]) == 1
    # a named function: OpenAI keeps finish_reason "stop"
    named = {**BODY, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole, chunks = _assemble(named, [text])
    assert whole["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # tool_choice "none": nothing is parsed, the text is the content
    whole, chunks = _assemble({**BODY, "tool_choice": "none"}, [text])
    message = whole["choices"][0]["message"]
    assert message["content"] == text and "tool_calls" not in message and whole["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    # no call in the text: a plain answer, finish "stop"
    whole, _ = _assemble(BODY, ["Just words."])
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Just words.", "refusal": None}
    assert whole["choices"][0]["finish_reason"] == "stop"
