"""Tool calling and structured output through a real `astrai serve` process with real clients:
the `openai` package (create, streams, the `stream` helper), LangChain's bind_tools, raw HTTP and
gRPC stubs compiled from the .proto. The model is tiny and trained in seconds (tool_support.py)
to call get_weather for its prompts, so the tool calls are the model's own output.

The constrained cases (tool_choice required or named, response_format) are enforced by the
engine's grammar-constrained decoding: every such output must parse and validate."""
from __future__ import annotations

import json
import re

import grpc
import pytest

from daemon_support import proto_stubs
from tool_support import SERVED_NAME, client, daemon, http, spec_validator  # noqa: F401 (fixtures)
from tool_support import ANSWER, ASK, ASK_TWO, ROUND_TRIP, TIME, TOOLS, WEATHER

pytestmark = pytest.mark.timeout(180)
MODEL = SERVED_NAME


GREEDY = dict(model=MODEL, temperature=0, max_tokens=120)


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_tools_are_rendered_into_the_prompt(http):
    with_tools = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()
    plain = http.post("/tokenize", json={"messages": ASK}).json()
    text = http.post("/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in text
    assert "<tool_call>" in text and text.endswith("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                                                   "<|im_start|>assistant\n")
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json()["prompt"] == \
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert with_tools["count"] > plain["count"]


def test_the_model_calls_a_tool(client, http):
    reply = client.chat.completions.create(messages=ASK, tools=TOOLS, **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _calls(choice.message) == [("get_weather", {"city": "Paris"})]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    # "none" (as vLLM): the tools stay in the prompt, nothing is parsed
    plain = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="none", **GREEDY)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content.startswith('<tool_call>\n{"name": "get_weather"')
    assert plain.usage.prompt_tokens == reply.usage.prompt_tokens == \
        http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["count"]


def test_streamed_calls_reassemble_as_the_whole_response(client):
    whole = client.chat.completions.create(messages=ASK_TWO, tools=TOOLS, **GREEDY).choices[0]
    assert whole.message.content == "Let me check." and whole.finish_reason == "tool_calls"
    assert _calls(whole.message) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    chunks = list(client.chat.completions.create(messages=ASK_TWO, tools=TOOLS, stream=True, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or ()]
    firsts = [t for t in calls if t.id]
    assert [(t.index, t.function.name, t.function.arguments) for t in firsts] == [(0, "get_weather", ""),
                                                                                  (1, "get_weather", "")]
    assert len(calls) > 6 and all(t.function.name is None for t in calls if not t.id)   # fragments follow
    args = ["".join(t.function.arguments for t in calls if t.index == i) for i in (0, 1)]
    assert args == [c.function.arguments for c in whole.message.tool_calls]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the SDK's own stream helper accumulates the same message
    with client.chat.completions.stream(messages=ASK_TWO, tools=TOOLS, **GREEDY) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion().choices[0]
    assert {"tool_calls.function.arguments.delta", "tool_calls.function.arguments.done"} <= kinds
    assert final.message.content == "Let me check." and _calls(final.message) == _calls(whole.message)


def test_a_tool_round_trip_conversation(client):
    """An agent loop: the model calls, the tool's result goes back as a tool message, the model answers."""
    messages = list(ASK)
    reply = client.chat.completions.create(messages=messages, tools=TOOLS, **GREEDY).choices[0].message
    messages.append(reply.model_dump(exclude_none=True))          # content null, tool_calls
    assert messages[-1]["role"] == "assistant" and "content" not in messages[-1]
    messages.append({"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": ROUND_TRIP[-1]["content"]})
    answer = client.chat.completions.create(messages=messages, tools=TOOLS, **GREEDY).choices[0]
    assert answer.message.content == ANSWER and answer.message.tool_calls is None and answer.finish_reason == "stop"


def test_vllm_extras_are_honoured(client, http):
    base = dict(messages=ROUND_TRIP, tools=TOOLS, **GREEDY)
    cut = client.chat.completions.create(stop=["sunny"], **base).choices[0]
    kept = client.chat.completions.create(stop=["sunny"], extra_body={"include_stop_str_in_output": True}, **base)
    assert cut.message.content == "It is " and kept.choices[0].message.content == "It is sunny"
    assert cut.finish_reason == kept.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(stop=["sunny"], stream=True, extra_body={"include_stop_str_in_output": True},
                                              **base)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "It is sunny"
    # request_id becomes the response's id; priority 0 is the only one there is
    reply = client.chat.completions.create(extra_body={"request_id": "trace-42", "priority": 0}, **base)
    assert reply.id == "chatcmpl-trace-42"
    # continue_final_message: the prompt ends inside the assistant's words, the model goes on from there
    prefill = ROUND_TRIP + [{"role": "assistant", "content": "It is"}]
    more = client.chat.completions.create(messages=prefill, tools=TOOLS, model=MODEL, temperature=0, max_tokens=20,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert more.choices[0].message.content == ANSWER.removeprefix("It is")
    ids = http.post("/tokenize", json={"messages": prefill, "tools": TOOLS, "continue_final_message": True}).json()
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"].endswith("assistant\nIt is")
    assert ids["count"] == more.usage.prompt_tokens
    # add_generation_prompt false and chat_template_kwargs reach the template
    bare = client.chat.completions.create(messages=ASK, model=MODEL, max_tokens=1,
                                          extra_body={"add_generation_prompt": False,
                                                      "chat_template_kwargs": {"enable_thinking": False}})
    assert bare.usage.prompt_tokens == http.post("/tokenize", json={"messages": ASK, "add_generation_prompt": False}
                                                 ).json()["count"]


def test_langchain_bind_tools(daemon):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=daemon.ready["http"] + "/v1", api_key="none", model=MODEL,
                                      temperature=0, max_tokens=120, max_retries=0, timeout=60)
    message = llm.bind_tools([WEATHER]).invoke(ASK[0]["content"])
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert message.tool_calls[0]["id"].startswith("call_") and message.response_metadata["finish_reason"] == "tool_calls"
    chunks = list(llm.bind_tools([WEATHER]).stream(ASK[0]["content"]))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"})]


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK = {"model": MODEL, "messages": ASK, "max_tokens": 2}
CALLS = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
NAMED = {"type": "function", "function": {"name": "get_time"}}
BAD = [  # (id, path, body, param)
    ("tools not a list", CHAT, {**OK, "tools": {"a": 1}}, "tools"),
    ("tool without a function", CHAT, {**OK, "tools": [{"type": "function"}]}, "tools[0].function"),
    ("tool without a name", CHAT, {**OK, "tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name"),
    ("tool name with a space", CHAT, {**OK, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name"),
    ("tool name too long", CHAT, {**OK, "tools": [{"type": "function", "function": {"name": "f" * 65}}]},
     "tools[0].function.name"),
    ("tool defined twice", CHAT, {**OK, "tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ("custom tool", CHAT, {**OK, "tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ("parameters not JSON Schema", CHAT, {**OK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]},
     "tools[0].function.parameters"),
    ("parameters not an object", CHAT, {**OK, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     "tools[0].function.parameters"),
    ("tool_choice names an unknown function", CHAT, {**OK, "tools": TOOLS, "tool_choice": NAMED}, "tool_choice"),
    ("tool_choice required without tools", CHAT, {**OK, "tool_choice": "required"}, "tool_choice"),
    ("tool_choice unknown string", CHAT, {**OK, "tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool_choice allowed_tools", CHAT, {**OK, "tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ("parallel_tool_calls not a boolean", CHAT, {**OK, "tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("tool message without tool_call_id", CHAT, {**OK, "messages": ASK + [{"role": "tool", "content": "x"}]},
     "messages[1].tool_call_id"),
    ("tool message without content", CHAT, {**OK, "messages": ASK + [{"role": "tool", "tool_call_id": "c1"}]},
     "messages[1].content"),
    ("tool_calls not a list", CHAT, {**OK, "messages": ASK + [{"role": "assistant", "tool_calls": "x"}]},
     "messages[1].tool_calls"),
    ("tool call arguments not JSON", CHAT, {**OK, "messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{city: Oslo"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("tool call without a name", CHAT, {**OK, "messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"arguments": "{}"}}]}]}, "messages[1].tool_calls[0].function.name"),
    ("response_format unknown type", CHAT, {**OK, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("response_format schema not JSON Schema", CHAT, {**OK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "required": "a"}}}}, "response_format.json_schema.schema"),
    ("response_format without a name", CHAT, {**OK, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "object"}}}}, "response_format.json_schema.name"),
    ("guided_regex that does not compile", COMP, {"prompt": "a", "guided_regex": "[a-"}, "guided_regex"),
    ("guided_json not JSON", COMP, {"prompt": "a", "guided_json": "{"}, "guided_json"),
    ("guided_choice not a list", CHAT, {**OK, "guided_choice": "yes"}, "guided_choice"),
    ("guided_grammar empty", CHAT, {**OK, "guided_grammar": " "}, "guided_grammar"),
    ("structured_outputs two kinds", CHAT, {**OK, "structured_outputs": {"regex": "a", "json_object": True}},
     "structured_outputs.json_object"),
    ("structured_outputs unknown key", COMP, {"prompt": "a", "structured_outputs": {"ebnf": "x"}},
     "structured_outputs.ebnf"),
    ("two constraints", COMP, {"prompt": "a", "guided_choice": ["a"], "response_format": {"type": "json_object"}},
     "guided_choice"),
    ("constraint with tool_choice required", CHAT, {**OK, "tools": TOOLS, "tool_choice": "required",
                                                    "guided_regex": "a"}, "tool_choice"),
    ("chat_template_kwargs not an object", CHAT, {**OK, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ("chat_template_kwargs setting messages", CHAT, {**OK, "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs"),
    ("continue_final_message with add_generation_prompt", CHAT,
     {**OK, "continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ("continue_final_message on an empty last message", CHAT,
     {**OK, "messages": ASK + [{"role": "assistant", "content": ""}], "continue_final_message": True},
     "continue_final_message"),
    ("add_generation_prompt not a boolean", CHAT, {**OK, "add_generation_prompt": 1}, "add_generation_prompt"),
    ("include_stop_str_in_output not a boolean", COMP, {"prompt": "a", "include_stop_str_in_output": "y"},
     "include_stop_str_in_output"),
    ("request_id empty", CHAT, {**OK, "request_id": ""}, "request_id"),
    ("request_id not a string", COMP, {"prompt": "a", "request_id": 7}, "request_id"),
    ("priority not 0", CHAT, {**OK, "priority": 5}, "priority"),
    ("priority not an integer", CHAT, {**OK, "priority": "high"}, "priority"),
    ("tools on completions", COMP, {"prompt": "a", "tools": TOOLS}, "tools"),
    ("unknown vLLM field", CHAT, {**OK, "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ("tokenize: tools with a prompt", "/tokenize", {"prompt": "a", "tools": TOOLS}, "tools"),
    ("tokenize: bad tool", "/tokenize", {"messages": ASK, "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_naming_the_field(http, case):
    _, path, body, param = case
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    good = http.post(CHAT, json={**OK, "tools": TOOLS})
    assert good.status_code == 200, good.text


def test_grpc_clients_set_the_same_constraints(daemon, tmp_path):
    pb2, pb2_grpc = proto_stubs(tmp_path)
    with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
        stub = pb2_grpc.GenerationServiceStub(channel)
        assert stub.ModelInfo(pb2.ModelInfoRequest(), timeout=30).tool_call_parser == "hermes"
        chat = pb2.ChatMessages(messages=[pb2.ChatMessage(role="user", content=ASK[0]["content"])],
                                tools=[pb2.Tool(name="get_weather", description=WEATHER["function"]["description"],
                                                parameters=json.dumps(WEATHER["function"]["parameters"]))])
        params = pb2.SamplingParams(max_tokens=120, temperature=0)
        out = list(stub.Generate(pb2.GenerateRequest(messages=chat, params=params), timeout=60))
        assert "".join(m.text for m in out) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
                                               '</tool_call>'   # gRPC clients get the model's own text
        ok = [pb2.StructuredOutput(json_schema=json.dumps({"type": "object"})), pb2.StructuredOutput(json_object=True),
              pb2.StructuredOutput(regex="[ab]+"), pb2.StructuredOutput(choice=pb2.ChoiceList(choices=["yes", "no"])),
              pb2.StructuredOutput(grammar='start: "a"+')]
        for structured in ok:
            params = pb2.SamplingParams(max_tokens=4, structured=structured)
            assert list(stub.Generate(pb2.GenerateRequest(text="Hello", params=params), timeout=60))[-1].finish_reason
        required = pb2.GenerateRequest(messages=chat, params=pb2.SamplingParams(max_tokens=60),
                                       tool_choice=pb2.ToolChoice(mode="required"))
        assert list(stub.Generate(required, timeout=60))[-1].finish_reason
        bad = [(pb2.GenerateRequest(text="a", params=pb2.SamplingParams(structured=pb2.StructuredOutput(
                    json_schema='{"type": "objekt"}'))), "structured.json_schema"),
               (pb2.GenerateRequest(text="a", params=pb2.SamplingParams(structured=pb2.StructuredOutput(
                   regex="(a"))), "structured.regex"),
               (pb2.GenerateRequest(text="a", params=pb2.SamplingParams(structured=pb2.StructuredOutput(
                   choice=pb2.ChoiceList()))), "structured.choice"),
               (pb2.GenerateRequest(text="a", tool_choice=pb2.ToolChoice(mode="required")), "tool_choice"),
               (pb2.GenerateRequest(messages=chat, tool_choice=pb2.ToolChoice(mode="function", function_name="nope")),
                "tool_choice"),
               (pb2.GenerateRequest(messages=pb2.ChatMessages(messages=[pb2.ChatMessage(role="tool", content="x")])),
                "messages[0].tool_call_id"),
               (pb2.GenerateRequest(messages=pb2.ChatMessages(messages=chat.messages, tools=[pb2.Tool(name="a b")])),
                "tools[0].function.name"),
               (pb2.GenerateRequest(messages=pb2.ChatMessages(messages=chat.messages, tools=[pb2.Tool(
                   name="f", parameters='{"type": 1}')])), "tools[0].function.parameters")]
        for request, param in bad:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert ("astrai-error-param", param) in info.value.trailing_metadata(), info.value.details()
        reply = stub.Tokenize(pb2.TokenizeRequest(messages=chat, add_generation_prompt=True), timeout=30)
        assert reply.count > 100


# ---- enforced by the engine (grammar-constrained decoding) --------------------------------
QUESTIONS = ["Hello there", "What time is it in Oslo?", "Tell me a story", "什么天气"]
# Bounded parameters: at temperature 1 a free string could outrun max_tokens, and a cut call cannot parse.
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
        "additionalProperties": False}
BOUNDED = [{"type": "function", "function": {**t["function"], "parameters": CITY}} for t in (WEATHER, TIME)]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_required_and_named_tool_choice_always_parse(client, tool_choice):
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED}
    for seed, question in enumerate(QUESTIONS * 2):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                               tools=BOUNDED, tool_choice=tool_choice, temperature=1.0,
                                               seed=seed, max_tokens=200, parallel_tool_calls=False)
        choice = reply.choices[0]
        assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop"), choice
        assert len(choice.message.tool_calls) == 1, choice
        for name, arguments in _calls(choice.message):
            assert name in schemas and (tool_choice == "required" or name == "get_time")
            jsonschema.validate(arguments, schemas[name])


def test_json_schema_regex_and_choice_outputs_validate(client):
    """At temperature 1 over seeds. Bounded schemas: a sample cut off by max_tokens could not parse."""
    import jsonschema
    from pydantic import BaseModel, Field

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "days"], "additionalProperties": False}
    objects = 0
    for seed in range(6):
        base = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[seed % 4]}], temperature=1.0,
                    seed=seed, max_tokens=300)
        reply = client.chat.completions.create(
            response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}},
            **base).choices[0]
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.message.content), schema)
        free = client.chat.completions.create(response_format={"type": "json_object"}, **base).choices[0]
        if free.finish_reason == "stop":   # any object may be longer than max_tokens
            assert isinstance(json.loads(free.message.content), dict)
            objects += 1
        text = client.completions.create(model=MODEL, prompt="Code:", seed=seed, temperature=1.0, max_tokens=20,
                                         extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}).choices[0].text
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", text)
        picked = client.chat.completions.create(extra_body={"guided_choice": ["yes", "no"]}, **base)
        assert picked.choices[0].message.content in ("yes", "no")
    assert objects > 0

    class Trip(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=0, le=99)

    parsed = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Trip, max_tokens=300)
    assert isinstance(parsed.choices[0].message.parsed, Trip)


def test_langchain_structured_output(daemon):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=daemon.ready["http"] + "/v1", api_key="none", model=MODEL,
                                      max_tokens=200, max_retries=0, timeout=60)
    message = llm.bind_tools(BOUNDED[1:], tool_choice="required").invoke("Hello there")
    assert [c["name"] for c in message.tool_calls] == ["get_time"]


def test_chat_and_completions_bodies_validate_against_the_openai_spec(http, spec_validator):
    """Whole responses (with log-probs and a tool call) against the official schemas: no null
    where the spec types a string, the chat logprobs object whole. Stream chunks are not checked
    this way: the spec's chunk schema refuses the nulls OpenAI's own streams send
    (finish_reason and logprobs on every chunk but the last), which the SDK tests cover."""
    chat = {"model": MODEL, "temperature": 0, "max_tokens": 60, "logprobs": True, "top_logprobs": 2}
    for messages, extra in (([{"role": "user", "content": "Hello"}], {}), (ASK, {"tools": TOOLS})):
        whole = http.post("/v1/chat/completions", json={**chat, "messages": messages, **extra}).json()
        spec_validator(whole, "CreateChatCompletionResponse")
        assert "system_fingerprint" not in whole and whole["choices"][0]["logprobs"]["refusal"] is None
    text = {"model": MODEL, "temperature": 0, "max_tokens": 6, "prompt": "To be", "logprobs": 2}
    spec_validator(http.post("/v1/completions", json=text).json(), "CreateCompletionResponse")
    chunks = _sse(http, "/v1/completions", {**text, "stream": True, "stream_options": {"include_usage": True}})
    assert chunks and all("usage" not in c for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] > 0


def _sse(http, path, body):
    with http.stream("POST", path, json=body) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    return [json.loads(line[len("data: "):]) for line in lines]
