"""Hugging Face interop, the translation: HF config.json and weight names <-> ours. Pure functions
of dicts; reading and writing directories is io.py's (import) and hf_export.py's (export).

Our parameter names are HF's minus the `model.` prefix, so the mapping is mostly a prefix. The
families are options of one Transformer: Llama is GQA + SwiGLU + RoPE (with the `linear`,
`llama3` or `yarn` frequency scaling); Qwen3 adds QK-norm; Qwen2 adds a bias on q/k/v; Mistral
without a sliding window is Llama; Mixtral is Llama with top-k routed experts (moe.py) in every
layer, Qwen3-MoE is Qwen3 with them in the layers its `decoder_sparse_step` / `mlp_only_layers`
pick. Expert weights: transformers 5 holds them as 3-D `experts.gate_up_proj` / `down_proj`
(as we do), but its `save_pretrained` (5.25) writes one tensor per expert and projection
(Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral
`block_sparse_moe.experts.{e}.w{1,3,2}.weight`); the importer reads either, the exporter writes
the per-expert names (what 4.x, 5.x and vLLM read). A config is read as `transformers` reads it
(its class defaults fill missing keys), and any key that would change the math in a way we do
not reproduce is refused with a ConfigError naming it. docs/models.md lists what is supported.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .layers import yarn_mscale

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")  # what config_from_hf loads
ROPE_TYPES = ("default", "linear", "llama3", "yarn")              # HF rope types we reproduce exactly

# transformers' config-class defaults for the keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048),
    "mistral": dict(num_key_value_heads=8, head_dim=None, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, max_position_embeddings=32768),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768),
    # Qwen3MoeConfig has no head_dim field: the attention falls back to hidden_size // heads
    "qwen3_moe": dict(num_key_value_heads=4, head_dim=None, max_position_embeddings=32768, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1),
    "mixtral": dict(num_key_value_heads=8, head_dim=None, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
}
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
# Keys of other MoE families that a config of these types must not carry (we have no shared expert).
_SHARED_EXPERT_KEYS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")
# Keys each rope type reads beside rope_type/type/rope_theta/partial_rotary_factor.
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                       "beta_slow", "mscale", "mscale_all_dim", "truncate")}


def _refuse(source: str, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{source}: {field}={value!r} is not supported: {why}")


def _rope(data: dict[str, Any], max_pos: int, source: str) -> dict[str, Any]:
    """ModelConfig's rope fields (and max_len) from HF's rope_scaling / rope_parameters."""
    # transformers: a `rope_scaling` dict wins over `rope_parameters`; rope_theta comes from the
    # dict, else the top level.
    field = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    params = dict(data.get(field) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise _refuse(source, field, params, "RoPE parameters per layer type are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise _refuse(source, "partial_rotary_factor", partial, "RoPE rotates the whole head")
    if rope_type == "dynamic":
        raise _refuse(source, f"{field}.rope_type", rope_type,
                      "dynamic NTK recomputes the frequencies of the whole sequence whenever it grows past "
                      "max_position_embeddings, so a key's rotation would depend on how long its sequence "
                      "later became; a paged KV cache of rotated keys (and a prefix cache shared across "
                      "lengths) cannot reproduce that. Up to max_position_embeddings it is plain RoPE: "
                      "remove the rope scaling entry to serve it at that length")
    if rope_type not in ROPE_TYPES:
        raise _refuse(source, f"{field}.rope_type", rope_type, f"supported rope types: {', '.join(ROPE_TYPES)}")
    # A scaled type with a key it does not read is some variant we do not know (e.g. mrope_section);
    # plain RoPE reads nothing but rope_theta, in transformers as here, so its extras are moot.
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *_ROPE_KEYS[rope_type]}
    extra = sorted(k for k, v in params.items() if k not in known and v is not None)
    if extra and rope_type != "default":
        raise _refuse(source, f"{field}.{extra[0]}", params[extra[0]], f"not a parameter of rope_type {rope_type!r}")

    def need(key: str) -> Any:
        if params.get(key) is None:
            raise ConfigError(f"{source}: {field}.{key} is required for rope_type {rope_type!r}")
        return params[key]

    out: dict[str, Any] = dict(rope_theta=theta, rope_type=rope_type, max_len=max_pos)
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 style), then the
    # dict's, then max_position_embeddings.
    original = data.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or max_pos
    if rope_type == "linear":
        out.update(rope_factor=float(need("factor")))
    elif rope_type == "llama3":
        out.update(rope_factor=float(need("factor")), rope_original_max_len=int(original),
                   rope_low_freq_factor=float(need("low_freq_factor")),
                   rope_high_freq_factor=float(need("high_freq_factor")))
    elif rope_type == "yarn":
        factor = params.get("factor")
        factor = float(max_pos / original if factor is None else factor)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else yarn_mscale(factor))
        # YaRN's point is the stretched context: serve original * factor when the config's
        # max_position_embeddings still names the original (as Qwen2.5's instructions do).
        out.update(rope_factor=factor, rope_original_max_len=int(original),
                   rope_beta_fast=float(params.get("beta_fast") or 32),
                   rope_beta_slow=float(params.get("beta_slow") or 1),
                   rope_truncate=bool(params.get("truncate", True)), rope_attention_factor=float(attention_factor),
                   max_len=max(max_pos, int(original * factor)))
    return out


def _check_attention_layout(data: dict[str, Any], model_type: str, source: str) -> None:
    """Refuse sliding windows and biases we do not reproduce; only keys the HF class reads."""
    if model_type == "mistral":
        window = data.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
        if window is not None:
            raise _refuse(source, "sliding_window", window, "sliding-window attention is not implemented yet "
                          "(a Mistral config with sliding_window null loads as Llama)")
    if model_type == "mixtral" and data.get("sliding_window") is not None:
        raise _refuse(source, "sliding_window", data["sliding_window"], "sliding-window attention is not "
                      "implemented yet (Mixtral's default, sliding_window null, loads)")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if data.get("use_sliding_window"):
            raise _refuse(source, "use_sliding_window", data["use_sliding_window"],
                          "sliding-window attention is not implemented yet")
        layer_types = data.get("layer_types") or []
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise _refuse(source, "layer_types", other[0], "only full_attention layers are supported")
    if model_type in ("llama", "qwen3", "qwen3_moe") and data.get("attention_bias"):
        raise _refuse(source, "attention_bias", data["attention_bias"],
                      f"{model_type} puts a bias on q/k/v and o_proj; astrai has q/k/v biases only (Qwen2's)")
    if model_type == "llama" and data.get("mlp_bias"):
        raise _refuse(source, "mlp_bias", data["mlp_bias"], "the SwiGLU MLP has no biases")


def _num_experts(data: dict[str, Any], model_type: str, source: str) -> int:
    """Qwen's own configs say `num_experts`, transformers 5 writes `num_local_experts` (its
    attribute_map makes them one field): either, not two different values."""
    given = {k: data[k] for k in ("num_experts", "num_local_experts") if data.get(k) is not None}
    if len(set(given.values())) > 1:
        raise _refuse(source, "num_experts", given["num_experts"], f"num_local_experts={given['num_local_experts']} "
                      "says otherwise")
    value = next(iter(given.values()), _DEFAULTS[model_type].get("num_experts", _DEFAULTS[model_type].get(
        "num_local_experts")))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _refuse(source, "num_experts", value, "must be an integer >= 0")
    return value


def _moe(data: dict[str, Any], model_type: str, n_layers: int, source: str) -> dict[str, Any]:
    """ModelConfig's MoE fields for a Mixtral / Qwen3-MoE config ({} when no layer is sparse)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    defaults = _DEFAULTS[model_type]
    for key in _SHARED_EXPERT_KEYS:
        if data.get(key):
            raise _refuse(source, key, data[key], "shared experts (Qwen2-MoE / DeepSeek style) are not "
                          "implemented: every token goes to its routed top-k experts only")
    if data.get("router_jitter_noise"):
        raise _refuse(source, "router_jitter_noise", data["router_jitter_noise"], "the training-time noise on "
                      "the router input is not implemented (it changes nothing at inference: set it to 0)")
    n_experts = _num_experts(data, model_type, source)
    top_k = data.get("num_experts_per_tok", defaults["num_experts_per_tok"])
    if model_type == "mixtral":
        sparse, hidden, normalize = list(range(n_layers)), None, True   # Mixtral always renormalises
    else:
        step = data.get("decoder_sparse_step", defaults["decoder_sparse_step"])
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise _refuse(source, "decoder_sparse_step", step, "must be a positive integer")
        dense = set(data.get("mlp_only_layers") or [])
        # transformers' rule: sparse unless listed in mlp_only_layers, every step-th layer
        sparse = [i for i in range(n_layers) if i not in dense and n_experts > 0 and (i + 1) % step == 0]
        hidden = data.get("moe_intermediate_size", defaults["moe_intermediate_size"])
        normalize = bool(data.get("norm_topk_prob", defaults["norm_topk_prob"]))
    if not sparse:
        return {}       # no layer routes: a dense model
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_experts:
        raise _refuse(source, "num_experts_per_tok", top_k, f"must be an integer in 1..{n_experts} (the experts)")
    return dict(n_experts=n_experts, n_experts_per_token=top_k, moe_dim_ffn=hidden, moe_norm_topk=normalize,
                moe_dense_layers=tuple(i for i in range(n_layers) if i not in sparse))


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (astrai loads its own "
                          f"directories and these Hugging Face ones: {', '.join(SUPPORTED_MODEL_TYPES)})")
    defaults = _DEFAULTS[model_type]
    if data.get("quantization_config"):
        method = (data["quantization_config"] or {}).get("quant_method", "?")
        raise _refuse(source, "quantization_config.quant_method", method, "load an unquantized checkpoint")
    if data.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", data["hidden_act"], "SwiGLU uses silu")
    if data.get("attention_dropout"):
        raise _refuse(source, "attention_dropout", data["attention_dropout"], "attention has no dropout")
    _check_attention_layout(data, model_type, source)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if data.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: {missing[0]} is missing")
    n_heads = data["num_attention_heads"]
    head_dim = data.get("head_dim", defaults["head_dim"]) or data["hidden_size"] // n_heads
    max_pos = data.get("max_position_embeddings", defaults["max_position_embeddings"])
    if "rope_theta" in defaults:   # the config class's default_theta (Mixtral: 1e6) when none is given
        data = {"rope_theta": defaults["rope_theta"], **data}
    return ModelConfig(
        vocab_size=data["vocab_size"], dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=data.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
        head_dim=head_dim, dim_ffn=data["intermediate_size"],
        norm_eps=data.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6)),
        tie_weight=bool(data.get("tie_word_embeddings", False)),
        use_qk_norm=model_type in ("qwen3", "qwen3_moe"), qkv_bias=model_type == "qwen2",
        init_std=data.get("initializer_range", 0.02), **_rope(data, max_pos, source),
        **_moe(data, model_type, data["num_hidden_layers"], source),
    )


# One expert's projection as save_pretrained writes it (Mixtral: w1 gate, w3 up, w2 down).
_HF_EXPERT = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                        r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_OURS_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def state_dict_from_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names for HF's weights. Per-expert tensors are stacked into the 3-D ones and taken out
    of `state` as they are, so host memory peaks at the weights plus one layer's experts (not
    twice the experts: 60 GB of them in Qwen3-30B-A3B)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}   # layer -> (expert, projection) -> weight
    for key in list(state):
        if key == "lm_head.weight":
            if not config.tie_weight:
                out[key] = state[key]
            continue
        name = key[len("model."):] if key.startswith("model.") else key
        match = _HF_EXPERT.fullmatch(name) if config.n_experts else None
        if match:
            experts.setdefault(int(match[1]), {})[int(match[2]), _PROJ[match[3]]] = state.pop(key)
            continue
        out[name.replace(".block_sparse_moe.", ".mlp.")] = state[key]   # Mixtral's module name in 4.x
    for layer in sorted(experts):
        parts = experts.pop(layer)
        missing = [(e, p) for e in range(config.n_experts) for p in ("gate", "up", "down") if (e, p) not in parts]
        if missing:
            e, proj = missing[0]
            raise ValueError(f"layer {layer} has per-expert weights but none for expert {e}'s {proj} projection "
                             f"(config.json says {config.n_experts} experts)")
        extra = sorted({e for e, _ in parts if e >= config.n_experts})
        if extra:
            raise ValueError(f"layer {layer} has weights for expert {extra[0]}, but config.json says "
                             f"{config.n_experts} experts")
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(         # [E, 2I, D]
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(config.n_experts)])
        out[f"layers.{layer}.mlp.experts.down_proj"] = torch.stack(            # [E, D, I]
            [parts[e, "down"] for e in range(config.n_experts)])
        del parts
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights under the names the exported class's save_pretrained writes: `model.` prefixed,
    the experts split into one tensor per expert and projection."""
    _, model_type = hf_architecture(config)
    block, names = (("block_sparse_moe", ("w1", "w3", "w2")) if model_type == "mixtral"
                    else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "lm_head.weight":
            out[key] = tensor
            continue
        match = _OURS_EXPERTS.fullmatch(key)
        if match:
            prefix = f"model.layers.{match[1]}.{block}.experts"
            parts = dict(zip(names[:2], tensor.chunk(2, dim=1))) if match[2] == "gate_up_proj" else {names[2]: tensor}
            for proj, weights in parts.items():
                for e in range(weights.shape[0]):
                    out[f"{prefix}.{e}.{proj}.weight"] = weights[e]
            continue
        if model_type == "mixtral":
            key = key.replace(".mlp.gate.", f".{block}.gate.")
        out[f"model.{key}"] = tensor
    return out


def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """(transformers class, model_type) that computes what `config` computes; ConfigError if none."""
    if config.attention == "mla":
        raise ConfigError("attention='mla' cannot be exported to Hugging Face: no stock transformers "
                          "architecture has this MLA variant")
    if config.use_gated_attention:
        raise ConfigError("use_gated_attention=true cannot be exported to Hugging Face: no stock "
                          "transformers architecture has an attention output gate")
    if config.qkv_bias and config.use_qk_norm:
        raise ConfigError("qkv_bias=true with use_qk_norm=true cannot be exported to Hugging Face: Qwen3's "
                          "attention_bias also biases o_proj, and Qwen2 has no QK-norm")
    if config.n_experts:
        if config.qkv_bias:
            raise ConfigError("qkv_bias=true with n_experts>0 cannot be exported to Hugging Face: neither "
                              "Qwen3MoeForCausalLM nor MixtralForCausalLM has q/k/v biases")
        if config.use_qk_norm:
            return "Qwen3MoeForCausalLM", "qwen3_moe"
        if not config.moe_norm_topk:
            raise ConfigError("moe_norm_topk=false without use_qk_norm cannot be exported to Hugging Face: "
                              "MixtralForCausalLM always renormalises the top-k weights (Qwen3-MoE, which need "
                              "not, has QK-norm)")
        if config.moe_dense_layers:
            raise ConfigError(f"moe_dense_layers={list(config.moe_dense_layers)} without use_qk_norm cannot be "
                              "exported to Hugging Face: MixtralForCausalLM has experts in every layer")
        return "MixtralForCausalLM", "mixtral"
    if config.qkv_bias:
        return "Qwen2ForCausalLM", "qwen2"
    return ("Qwen3ForCausalLM", "qwen3") if config.use_qk_norm else ("LlamaForCausalLM", "llama")


def _hf_rope(config: ModelConfig) -> dict[str, Any]:
    """HF's rope_parameters for our rope fields, every derived value written out explicitly."""
    c = config
    original = c.rope_original_max_len or c.max_len
    extra: dict[str, Any] = {
        "default": {},
        "linear": dict(factor=c.rope_factor),
        "llama3": dict(factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                       high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=original),
        "yarn": dict(factor=c.rope_factor, original_max_position_embeddings=original,
                     beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, truncate=c.rope_truncate,
                     attention_factor=float(c.rope_attention_factor if c.rope_attention_factor is not None
                                            else yarn_mscale(c.rope_factor))),
    }[c.rope_type]
    return {"rope_type": c.rope_type, **extra}


def hf_config(config: ModelConfig, special: dict[str, int | None]) -> dict[str, Any]:
    arch, model_type = hf_architecture(config)
    rope = _hf_rope(config)
    data = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.dim,
        "intermediate_size": config.dim_ffn, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        # transformers 4.x reads rope_scaling (5.x prefers it too when set): the same dict
        "rope_scaling": rope if config.rope_type != "default" else None,
        "tie_word_embeddings": config.tie_weight, "attention_dropout": 0.0,
        "initializer_range": config.init_std, "use_cache": True, "torch_dtype": "float32",
        **{k: v for k, v in special.items() if v is not None},
    }
    if model_type in ("qwen2", "qwen3"):
        data.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    if model_type in ("qwen3", "qwen3_moe"):
        data.update(attention_bias=False)
    if model_type == "qwen3_moe":
        data.update(use_sliding_window=False, sliding_window=None, num_experts=config.n_experts,
                    num_experts_per_tok=config.n_experts_per_token, moe_intermediate_size=config.resolved_moe_dim_ffn,
                    norm_topk_prob=config.moe_norm_topk, decoder_sparse_step=1,
                    mlp_only_layers=list(config.moe_dense_layers), output_router_logits=False)
    if model_type == "mixtral":   # every layer sparse: intermediate_size is the experts' width
        data.update(intermediate_size=config.resolved_moe_dim_ffn, sliding_window=None,
                    num_local_experts=config.n_experts, num_experts_per_tok=config.n_experts_per_token,
                    router_jitter_noise=0.0, output_router_logits=False)
    if model_type == "llama":
        data.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return data
