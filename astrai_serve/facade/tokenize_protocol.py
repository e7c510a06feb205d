"""vLLM's /tokenize and /detokenize bodies -> the core's Tokenize / Detokenize requests.

The facade has no tokenizer: both go to the core over gRPC. As in vLLM:

- POST /tokenize {"prompt": str} or {"messages": [...], "add_generation_prompt"?: bool (default
  true), "continue_final_message"?, "tools"?, "chat_template_kwargs"?} (rendered as
  /v1/chat/completions renders them, so a client can see the prompt a chat makes), each with
  "add_special_tokens"? (default true for a prompt, false for messages, whose chat template
  writes its special tokens itself) -> {"count", "max_model_len", "tokens"};
- POST /detokenize {"tokens": [int, ...]} -> {"prompt": str} (special tokens kept).

`model` may be omitted, as on the other endpoints. Bad input is a 400 in OpenAI's error shape
naming the field; unknown fields too, rather than being ignored.
"""
from __future__ import annotations

from typing import Any

from astrai_serve.facade import chat as chat_input
from astrai_serve.facade.errors import ApiError, bad as _bad, get_bool as _get_bool, type_name as _type_name
from astrai_serve.facade.protocol import check_model
from astrai_serve.proto import generate_pb2 as pb

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "tools", *chat_input.TEMPLATE_FIELDS}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _object(body: Any, allowed: set[str], model_name: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}")
    check_model(body, model_name)
    return body


def parse_tokenize(body: Any, model_name: str) -> pb.TokenizeRequest:
    body = _object(body, TOKENIZE_FIELDS, model_name)
    request = pb.TokenizeRequest()
    if ("prompt" in body) == ("messages" in body):
        raise _bad("prompt", "send exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise _bad("prompt", f"'prompt' must be a string, got {_type_name(prompt)}")
        for name in ("tools", *chat_input.TEMPLATE_FIELDS):
            if name in body:
                raise _bad(name, f"'{name}' applies to 'messages' only")
        request.text = prompt
    else:
        chat = chat_input.messages(body)
        chat.tools.extend(chat_input.tools(body))
        generation = chat_input.template_options(body, chat)
        request.messages.CopyFrom(chat)
        request.add_generation_prompt = not chat.continue_final_message if generation is None else generation
    special = _get_bool(body, "add_special_tokens")
    if special is not None:
        request.add_special_tokens = special
    return request


def parse_detokenize(body: Any, model_name: str, vocab_size: int) -> pb.DetokenizeRequest:
    """Ids are checked against the vocabulary here too, so the error names `tokens` (the core's
    would name its own field, token_ids)."""
    body = _object(body, DETOKENIZE_FIELDS, model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise _bad("tokens", f"'tokens' must be an array of token ids, got {_type_name(tokens)}")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise _bad("tokens", f"'tokens'[{i}] is {t!r}: token ids must be integers in [0, {vocab_size})")
    return pb.DetokenizeRequest(token_ids=tokens)
