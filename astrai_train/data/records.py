"""One input record -> the token arrays of one example, per objective.

Accepted JSONL shapes (TRL's):
    sft   {"messages": [{"role", "content"}, ...]}
    dpo   {"prompt": str | messages, "chosen": str | assistant messages, "rejected": same}
          ({"messages": ...} may stand in for "prompt")
    grpo  {"prompt": str | messages, "answer": str | number}   ("messages" may stand in for "prompt")
Other keys are ignored (TRL datasets often carry extra columns).

Every problem raises `RecordError` with a reason; the caller prefixes `file:line`.
"""
from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[Message]) -> tuple[list[int], list[int]]: ...
    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> Any: ...


class RecordError(ValueError):
    """A record that cannot become an example; the message says why."""


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{field!r} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"{field}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"{field}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{field}[{i}] ({role}) content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt(rec: dict[str, Any]) -> list[Message]:
    if "prompt" in rec:
        value = rec["prompt"]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        msgs = _messages(value, "prompt")
    elif "messages" in rec:
        msgs = _messages(rec["messages"], "messages")
    else:
        raise RecordError("missing 'prompt' (or 'messages')")
    if msgs[-1]["role"] == "assistant":
        raise RecordError("the prompt's last message is from the assistant; it must end with a user or system turn")
    return msgs


def _completion(rec: dict[str, Any], field: str) -> list[Message]:
    if field not in rec:
        raise RecordError(f"missing {field!r}")
    value = rec[field]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, field)
    bad = [m["role"] for m in msgs if m["role"] != "assistant"]
    if bad:
        raise RecordError(f"{field!r} must hold only assistant messages, found role {bad[0]!r}")
    return msgs


def _completion_arrays(tok: ChatTokenizer, prompt_ids: list[int], msgs: list[Message]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tok.encode_chat(msgs)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise RecordError("the chat template renders prompt+completion with a different prefix than the "
                          "prompt alone, so the completion cannot be masked")
    mask = np.asarray(mask, np.uint8)
    mask[:n] = 0  # earlier assistant turns in the prompt are context, not the preferred completion
    return np.asarray(ids, np.int64), mask


def encode_record(objective: str, rec: Any, tok: ChatTokenizer) -> dict[str, np.ndarray]:
    """The arrays of one example, keyed as in OBJECTIVE_KEYS[objective]."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
    if objective == "sft":
        if "messages" not in rec:
            raise RecordError("missing 'messages'")
        msgs = _messages(rec["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise RecordError("no assistant message: nothing to learn from")
        ids, mask = tok.encode_chat(msgs)
        return {"sequence": np.asarray(ids, np.int64), "loss_mask": np.asarray(mask, np.uint8)}
    if objective == "dpo":
        prompt = _prompt(rec)
        chosen, rejected = _completion(rec, "chosen"), _completion(rec, "rejected")
        prompt_ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        c_ids, c_mask = _completion_arrays(tok, prompt_ids, prompt + chosen)
        r_ids, r_mask = _completion_arrays(tok, prompt_ids, prompt + rejected)
        return {"prompt": np.asarray(prompt_ids, np.int64), "chosen": c_ids, "chosen_mask": c_mask,
                "rejected": r_ids, "rejected_mask": r_mask}
    if objective == "grpo":
        prompt = _prompt(rec)
        if "answer" not in rec:
            raise RecordError("missing 'answer'")
        answer = rec["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise RecordError(f"'answer' must be a string or a number, got {type(answer).__name__}")
        prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return {"prompt": np.asarray(prompt_ids, np.int64),
                "answer": np.frombuffer(str(answer).encode("utf-8"), np.uint8)}
    raise ValueError(f"objective {objective!r} has no JSONL records; expected sft, dpo or grpo")


def parse_line(line: str) -> Any:
    """A JSONL line -> the decoded value, or RecordError naming the JSON problem."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON ({e.msg} at column {e.colno})") from None
