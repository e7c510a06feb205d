"""Hugging Face interop, the translation: HF config.json and weight names <-> ours, for
Qwen3ForCausalLM and LlamaForCausalLM. Pure functions of dicts; reading and writing directories
is io.py's (import) and hf_export.py's (export).

Our parameter names are HF's minus the `model.` prefix, so the mapping is mostly a prefix.
Qwen3 is GQA + QK-norm; without QK-norm the same weights are a Llama model. Gated attention and
MLA have no stock `transformers` architecture and are refused.
"""
from __future__ import annotations

from typing import Any

import torch

from .config import ConfigError, ModelConfig

def _rope_theta(data: dict[str, Any]) -> float:
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", data.get("rope_theta", 10000.0)))


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = data.get("model_type")
    if model_type not in ("qwen3", "llama"):
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          "(astrai loads its own directories and Qwen3/Llama ones)")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise ConfigError(f"{source}: attention_bias/mlp_bias=true is not supported")
    if data.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={data['hidden_act']!r} is not supported (SwiGLU uses silu)")
    n_heads = data["num_attention_heads"]
    return ModelConfig(
        vocab_size=data["vocab_size"], dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=data.get("num_key_value_heads") or n_heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // n_heads,
        dim_ffn=data["intermediate_size"], norm_eps=data.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(data), max_len=data.get("max_position_embeddings", 2048),
        tie_weight=bool(data.get("tie_word_embeddings", model_type == "qwen3")),
        use_qk_norm=model_type == "qwen3", init_std=data.get("initializer_range", 0.02),
    )


def state_dict_from_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        if key.startswith("model."):
            out[key[len("model."):]] = tensor
        elif key == "lm_head.weight":
            if not config.tie_weight:
                out[key] = tensor
        else:
            out[key] = tensor
    return out


def hf_config(config: ModelConfig, special: dict[str, int | None]) -> dict[str, Any]:
    if config.attention == "mla":
        raise ConfigError("attention='mla' cannot be exported to Hugging Face: no stock transformers "
                          "architecture has this MLA variant")
    if config.use_gated_attention:
        raise ConfigError("use_gated_attention=true cannot be exported to Hugging Face: neither Qwen3 "
                          "nor Llama has an attention output gate")
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if config.use_qk_norm else ("LlamaForCausalLM", "llama")
    data = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.dim,
        "intermediate_size": config.dim_ffn, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_weight, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": config.init_std, "use_cache": True, "torch_dtype": "float32",
        **{k: v for k, v in special.items() if v is not None},
    }
    if model_type == "qwen3":
        data.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    else:
        data.update(mlp_bias=False, pretraining_tp=1)
    return data
