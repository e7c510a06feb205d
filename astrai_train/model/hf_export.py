"""`astrai export-hf`: an astrai model directory -> a directory `transformers` loads with no
custom code (Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM with q/k/v biases, LlamaForCausalLM
otherwise; with experts Qwen3MoeForCausalLM or MixtralForCausalLM; RoPE scaling carried over),
tokenizer files copied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .hf import hf_config, state_dict_from_hf, state_dict_to_hf
from .io import load_config, read_state_dict, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def _special_ids(src: Path) -> dict[str, int | None]:
    """bos/eos/pad ids from a tokenizer in `src`, if there is one."""
    if not (src / "tokenizer.json").is_file():
        return {}
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(src)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def export_hf(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `src` (an astrai model directory) as a transformers-loadable directory at `out`."""
    src, out = Path(src), Path(out)
    config, fmt = load_config(src)
    special = _special_ids(src)
    data = hf_config(config, special)  # refuses unexportable variants before writing anything
    state = read_state_dict(src)
    if fmt != "astrai":
        state = state_dict_from_hf(state, config)
    hf_state = {name: (tensor.to(dtype) if dtype else tensor).contiguous()
                for name, tensor in state_dict_to_hf(state, config).items()}
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        data["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    write_safetensors(hf_state, out, max_shard_bytes=4 << 30, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copy2(src / name, out / name)
    if not (src / "generation_config.json").is_file() and special:
        (out / "generation_config.json").write_text(json.dumps(_generation_config(src), indent=2) + "\n")
    return out


def _generation_config(src: Path) -> dict:
    """HF's generation_config.json for a model without one: every id astrai stops at (eos and the
    chat template's end-of-turn token), so `generate` there stops where astrai stops."""
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(src)
    stops = sorted(set(tok.stop_ids))
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
            "pad_token_id": tok.pad_id}
