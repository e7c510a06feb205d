"""Output constraints and tools from request to engine, without a server: OpenAI's
response_format, vLLM's structured_outputs and guided_* and tool_choice, through the REST facade's
parse_request into the GenerateRequest, then through the core's checks into the engine's
SamplingParams.structured; and chats with tools rendered by the core with the model's template."""
from __future__ import annotations

import json

import pytest

from astrai_serve.core.request_checks import InvalidRequest, RequestChecker, resolve_tool_call_parser
from astrai_serve.facade.errors import ApiError
from astrai_serve.facade.protocol import parse_request
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import tool_call_schema

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**body) -> pb.GenerateRequest:
    return parse_request("chat", {"messages": USER, **body}, "tiny", 1024, "hermes").requests[0]


def completion(**body) -> pb.GenerateRequest:
    return parse_request("completion", {"prompt": "hi", **body}, "tiny", 1024, "hermes").requests[0]


# (body fields, the StructuredOutput field set, its value)
MAPPING = [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}},
     "json_schema", SCHEMA),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "any"}}}, "json_object", True),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema", SCHEMA),
    ({"structured_outputs": {"regex": r"\d{3}-\d{4}"}}, "regex", r"\d{3}-\d{4}"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
    ({"structured_outputs": {"grammar": 'start: "a"+'}}, "grammar", 'start: "a"+'),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
    ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
    ({"guided_regex": "[ab]+"}, "regex", "[ab]+"),
    ({"guided_choice": ["red", "blue"]}, "choice", ["red", "blue"]),
    ({"guided_grammar": 'start: "x"'}, "grammar", 'start: "x"'),
]


def _value(s: pb.StructuredOutput):
    kind = s.WhichOneof("constraint")
    value = getattr(s, kind)
    return kind, json.loads(value) if kind == "json_schema" else list(value.choices) if kind == "choice" else value


@pytest.mark.parametrize("body,kind,value", MAPPING, ids=[f"{next(iter(b))}-{k}" for b, k, _ in MAPPING])
def test_constraints_map_onto_the_request_on_both_endpoints(body, kind, value):
    for request in (chat(**body), completion(**body)):
        assert _value(request.params.structured) == (kind, value)


def test_no_constraint_leaves_the_output_free():
    for body in ({}, {"response_format": {"type": "text"}}, {"structured_outputs": {}}):
        assert not chat(**body).params.HasField("structured")


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
])
def test_conflicting_or_invalid_constraints_name_the_field(body, param):
    with pytest.raises(ApiError) as info:
        chat(**body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_tool_fields_map_onto_the_request():
    request = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                   parallel_tool_calls=False)
    tools = request.messages.tools
    assert [(t.name, t.description) for t in tools] == [("get_weather", "Weather in a city."), ("get_time", "")]
    assert json.loads(tools[0].parameters) == WEATHER["function"]["parameters"] and tools[1].parameters == ""
    assert (request.tool_choice.mode, request.tool_choice.function_name) == ("function", "get_time")
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assert chat(tools=[WEATHER]).tool_choice.mode == "auto"    # OpenAI's default with tools
    assert chat().tool_choice.mode == "none" and not chat().messages.tools
    parsed = parse_request("chat", {"messages": USER, "tools": [WEATHER]}, "tiny", 1024, "hermes")
    assert parsed.tool_parser == "hermes"
    parsed = parse_request("chat", {"messages": USER, "tools": [WEATHER], "tool_choice": "none"}, "tiny", 1024, "")
    assert parsed.tool_parser == ""   # "none" parses nothing, so it needs no parser either


def test_tool_messages_map_onto_the_request():
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "rain"}]}]
    request = parse_request("chat", {"messages": messages}, "tiny", 1024, "").requests[0]
    assistant, tool = request.messages.messages[1:]
    assert assistant.content == "" and [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == \
           [("call_1", "get_weather", '{"city": "Oslo"}')]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "rain")


def test_vllm_extras_map_onto_the_request():
    parsed = parse_request("chat", {"messages": USER, "request_id": "abc-1", "priority": 0,
                                    "include_stop_str_in_output": True, "skip_special_tokens": False,
                                    "chat_template_kwargs": {"enable_thinking": False},
                                    "add_generation_prompt": False}, "tiny", 1024)
    request = parsed.requests[0]
    assert parsed.id == request.request_id == "chatcmpl-abc-1"   # as vLLM prefixes it
    assert request.params.include_stop_str_in_output and not request.params.skip_special_tokens
    assert json.loads(request.messages.chat_template_kwargs) == {"enable_thinking": False}
    assert request.HasField("add_generation_prompt") and not request.add_generation_prompt
    request = parse_request("chat", {"messages": USER + [{"role": "assistant", "content": "Once"}],
                                     "continue_final_message": True}, "tiny", 1024).requests[0]
    assert request.messages.continue_final_message and not request.HasField("add_generation_prompt")
    assert parse_request("completion", {"prompt": "x", "request_id": "r"}, "tiny", 1024).id == "cmpl-r"


# ---- the core: GenerateRequest -> SamplingParams.structured, and the chat template ----------
@pytest.fixture(scope="module")
def checker(tokenizer_dir):
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)   # astrai's default template: tools in the Hermes format
    return RequestChecker(tok, 1024, tok.vocab_size, resolve_tool_call_parser("auto", tok))


def _structured(checker, request: pb.GenerateRequest):
    ids, field = checker.prompt_ids(request)
    return checker.sampling_params(request.params, len(ids), field, request).structured


def test_the_default_template_gets_the_hermes_parser(checker, tokenizer_dir):
    assert checker.tool_call_parser == "hermes"
    assert resolve_tool_call_parser("none", checker.tokenizer) == ""
    with pytest.raises(ValueError, match="--tool-call-parser"):
        resolve_tool_call_parser("mistral", checker.tokenizer)


@pytest.mark.parametrize("body,fields", [
    ({"guided_json": SCHEMA}, {"json": json.dumps(SCHEMA)}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"structured_outputs": {"regex": "a+"}}, {"regex": "a+"}),
    ({"guided_choice": ["yes", "no"]}, {"choice": ("yes", "no")}),
    ({"guided_grammar": 'start: "x"'}, {"grammar": 'start: "x"'}),
])
def test_constraints_reach_the_engines_sampling_params(checker, body, fields):
    from astrai_serve.engine.structured_spec import StructuredOutput

    for request in (chat(**body), completion(**body)):
        assert _structured(checker, request) == StructuredOutput(**fields)


def test_tool_choice_required_and_named_constrain_to_tool_calls(checker):
    from astrai_serve.engine.structured_spec import StructuredOutput

    assert _structured(checker, chat(tools=[WEATHER, TIME])) is None                    # auto: free
    assert _structured(checker, chat(tools=[WEATHER], tool_choice="none")) is None
    schemas = (tool_call_schema("get_weather", WEATHER["function"]["parameters"]), tool_call_schema("get_time", None))
    assert schemas[1]["properties"]["arguments"] == {"type": "object"}
    required = _structured(checker, chat(tools=[WEATHER, TIME], tool_choice="required"))
    assert required == StructuredOutput(tool_calls=tuple(json.dumps(s) for s in schemas), parallel_tool_calls=True)
    named = _structured(checker, chat(tools=[WEATHER, TIME], parallel_tool_calls=False,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named == StructuredOutput(tool_calls=(json.dumps(schemas[0]),), parallel_tool_calls=False)


@pytest.mark.parametrize("edit,param", [
    (lambda r: r.params.structured.__setattr__("json_schema", '{"type": 5}'), "structured.json_schema"),
    (lambda r: r.params.structured.__setattr__("regex", "(("), "structured.regex"),
    (lambda r: r.params.structured.choice.choices.extend([""]), "structured.choice"),
    (lambda r: r.tool_choice.__setattr__("mode", "required"), "tool_choice"),           # no tools
    (lambda r: r.tool_choice.__setattr__("mode", "sometimes"), "tool_choice"),
])
def test_the_core_refuses_bad_constraints_from_grpc_clients(checker, edit, param):
    request = pb.GenerateRequest(text="hi")
    edit(request)
    with pytest.raises(InvalidRequest) as info:
        _structured(checker, request)
    assert info.value.param == param, str(info.value)


def test_tools_and_tool_messages_render_through_the_template(checker):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    request = parse_request("chat", {"messages": messages, "tools": [WEATHER]}, "tiny", 1024, "hermes").requests[0]
    text = checker.render_chat(request.messages, None, "messages", tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' \
           '<|im_end|>\n<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n' \
           '<|im_start|>assistant\n' in text and text.endswith("<|im_start|>assistant\n")
    # the ids Generate runs are this text's
    ids, _ = checker.prompt_ids(request)
    assert ids == checker.tokenizer.encode(text)


def test_template_options(checker):
    chat_ = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Tell a tale"),
                                      pb.ChatMessage(role="assistant", content="Once upon ")])
    assert checker.render_chat(chat_, False, "messages", tokenize=False).endswith("Once upon <|im_end|>\n")
    chat_.continue_final_message = True
    # as transformers: the text ends where the content does (its trailing space kept, as the template kept it)
    assert checker.render_chat(chat_, None, "messages", tokenize=False).endswith("<|im_start|>assistant\nOnce upon ")
    with pytest.raises(InvalidRequest) as info:
        checker.render_chat(chat_, True, "messages", tokenize=False)
    assert info.value.param == "continue_final_message"
    chat_.continue_final_message = False
    for kwargs in ('{"messages": []}', '{"_secret": 1}', "[1]", "{bad"):
        chat_.chat_template_kwargs = kwargs
        with pytest.raises(InvalidRequest) as info:
            checker.render_chat(chat_, True, "messages", tokenize=False)
        assert info.value.param == "chat_template_kwargs"


def test_a_template_without_tools_says_so_and_takes_its_kwargs(tokenizer_dir, tmp_path):
    from astrai_train.tokenizer import Tokenizer
    from tokenizer_support import QWEN3_STYLE

    out = Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "no_tools")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_STYLE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(out)
    checker = RequestChecker(tok, 1024, tok.vocab_size, resolve_tool_call_parser("auto", tok))
    assert checker.tool_call_parser == ""   # no <tool_call> in its template: no tool calling offered
    with pytest.raises(InvalidRequest) as info:
        checker.prompt_ids(chat(tools=[WEATHER], tool_choice="none"))
    assert info.value.param == "tools" and "does not render tools" in str(info.value)
    calls = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    request = parse_request("chat", {"messages": USER + calls}, "tiny", 1024, "").requests[0]
    with pytest.raises(InvalidRequest) as info:
        checker.prompt_ids(request)
    assert info.value.param == "messages[1].tool_calls"
    # chat_template_kwargs reach the template: Qwen3's enable_thinking=False closes an empty think block
    thinking = parse_request("chat", {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}},
                             "tiny", 1024, "").requests[0]
    assert checker.render_chat(thinking.messages, None, "messages", tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert checker.render_chat(chat().messages, None, "messages", tokenize=False).endswith("<|im_start|>assistant\n")
    # and tool calling itself: the facade refuses it before the core is asked
    with pytest.raises(ApiError) as err:
        parse_request("chat", {"messages": USER, "tools": [WEATHER]}, "tiny", 1024, checker.tool_call_parser)
    assert err.value.param == "tools" and "--tool-call-parser" in err.value.message
