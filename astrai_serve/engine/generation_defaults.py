"""The model's own sampling defaults: `generation_config.json` fills what a request leaves unset.

Model publishers tune sampling per model (Qwen3: temperature 0.6, top_p 0.95, top_k 20; Llama
3.1: 0.6 / 0.9) and ship it in `generation_config.json`. vLLM applies those values to every
request that does not set the field itself (`--generation-config auto`, its default), so a user
moving over expects the same answers; `--generation-config vllm` there (here: `none`) goes back
to the API's own defaults (OpenAI: temperature 1, top_p 1), and a folder path reads the file
from elsewhere.

Only sampling fields are taken, renamed to ours: temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens as the default max_tokens. `do_sample` is ignored, as vLLM
ignores it (transformers would decode greedily under `do_sample: false`). Everything else in the
file (eos ids: the tokenizer reads those; beam settings ...) is ignored here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
CHOICES = ("auto", "none")   # or a directory holding generation_config.json


def generation_defaults(model_dir: str | Path, choice: str = "auto") -> dict[str, Any]:
    """{SamplingParams field: default} from `choice`: "auto" the model directory's file, "none"
    nothing, else a directory (or the file itself). A missing file in the model directory is
    no defaults; a named one that is missing or not JSON is a ValueError naming it."""
    if choice == "none":
        return {}
    if choice == "auto":
        path = Path(model_dir) / FILE
        if not path.is_file():
            return {}
    else:
        path = Path(choice)
        path = path / FILE if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--generation-config {choice!r}: no {FILE} there (choose auto, none or a directory)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    out = {ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None}
    for name, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
    if "top_k" in out:
        out["top_k"] = int(out["top_k"])
    if "max_tokens" in out:
        out["max_tokens"] = int(out["max_tokens"])
    return out
