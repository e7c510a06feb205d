"""ModelConfig: the shape of a decoder-only Transformer, saved as `config.json` in a model directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
MODEL_TYPE = "astrai"


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the offending field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096            # tokens in the embedding / LM head
    dim: int = 256                    # residual stream width
    n_layers: int = 4                 # decoder blocks
    n_heads: int = 4                  # query heads
    n_kv_heads: int = 2               # key/value heads (GQA); n_heads must be a multiple
    head_dim: int | None = None       # per-head width; None means dim // n_heads
    dim_ffn: int = 768                # SwiGLU hidden width (MoE: dense layers; experts too unless moe_dim_ffn)
    norm_eps: float = 1e-6            # RMSNorm epsilon
    rope_theta: float = 10000.0       # RoPE base
    rope_type: str = "default"        # RoPE frequency scaling: "default", "linear", "llama3" (Llama 3.1+) or "yarn"
    rope_factor: float = 1.0          # linear/llama3/yarn: how many times the pretraining context is stretched
    rope_original_max_len: int | None = None  # llama3/yarn: the pretraining context being stretched; None: max_len
    rope_low_freq_factor: float = 1.0   # llama3: wavelengths above original/low_freq_factor are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept; between, blended
    rope_beta_fast: float = 32.0      # yarn: dims turning more often than this over the original context are kept
    rope_beta_slow: float = 1.0       # yarn: dims turning less often than this are divided by rope_factor
    rope_truncate: bool = True        # yarn: round the blend range outwards to whole dims (HF's `truncate`)
    rope_attention_factor: float | None = None  # yarn: multiplier on cos/sin; None: 0.1 * ln(rope_factor) + 1
    max_len: int = 2048               # longest sequence (RoPE table size, serving context)
    tie_weight: bool = True           # LM head shares the embedding matrix
    use_qk_norm: bool = False         # RMSNorm on each query/key head before RoPE (Qwen3)
    use_gated_attention: bool = False  # sigmoid gate on the attention output, per channel
    qkv_bias: bool = False            # q/k/v projections have a bias, the output projection none (Qwen2)
    attention: str = "gqa"            # "gqa" or "mla" (multi-head latent attention)
    kv_lora_rank: int = 0             # MLA: width of the compressed KV latent (what the cache stores)
    qk_nope_head_dim: int = 0         # MLA: per-head query/key channels without RoPE
    qk_rope_head_dim: int = 0         # MLA: per-head query/key channels with RoPE (key part shared by heads)
    v_head_dim: int = 0               # MLA: per-head value width
    n_experts: int = 0                # MoE: routed SwiGLU experts per sparse layer; 0: a dense model
    n_experts_per_token: int = 2      # MoE: experts each token goes to (top-k of the router's softmax over all experts)
    moe_dim_ffn: int | None = None    # MoE: each expert's hidden width; None: dim_ffn
    moe_norm_topk: bool = True        # MoE: rescale the top-k probabilities to sum 1 (Qwen3-MoE's norm_topk_prob)
    moe_dense_layers: tuple[int, ...] = ()  # MoE: layers with one dense SwiGLU of dim_ffn (HF's mlp_only_layers)
    init_std: float = 0.02            # normal init std; output projections are scaled by 1/sqrt(2*n_layers)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"invalid model config: {field}={getattr(self, field)!r}: {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "dim_ffn", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.attention not in ("gqa", "mla"):
            raise bad("attention", 'must be "gqa" or "mla"')
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be > 0")
        self._check_rope(bad)
        self._check_moe(bad)
        if self.qkv_bias and self.attention != "gqa":
            raise bad("qkv_bias", 'is only supported with attention="gqa"')
        if self.attention == "gqa":
            if self.n_heads % self.n_kv_heads:
                raise bad("n_kv_heads", f"n_heads={self.n_heads} must be divisible by n_kv_heads")
            if self.head_dim is None and self.dim % self.n_heads:
                raise bad("dim", f"must be divisible by n_heads={self.n_heads} when head_dim is not given")
            if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
                raise bad("head_dim", "must be a positive even integer (RoPE rotates pairs)")
            if self.head_dim is None and (self.dim // self.n_heads) % 2:
                raise bad("dim", "dim // n_heads must be even (RoPE rotates pairs)")
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise bad(name, 'must be > 0 when attention="mla"')
            if self.qk_rope_head_dim % 2:
                raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
            if self.use_qk_norm:
                raise bad("use_qk_norm", 'is not supported with attention="mla" (MLA normalises its latent)')

    def _check_rope(self, bad) -> None:
        # Which fields each rope_type reads; a field it ignores must keep its default, so a config
        # never carries a setting that silently does nothing.
        uses = {"default": (), "linear": ("rope_factor",),
                "llama3": ("rope_factor", "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor"),
                "yarn": ("rope_factor", "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
                         "rope_truncate", "rope_attention_factor")}
        if self.rope_type not in uses:
            why = ("its frequencies depend on the current sequence length, which a paged KV cache of "
                   "rotated keys cannot follow; " if self.rope_type == "dynamic" else "")
            raise bad("rope_type", why + "must be one of " + ", ".join(map(repr, uses)))
        for name in _ROPE_FIELDS:
            default = _ROPE_DEFAULTS[name]
            if name not in uses[self.rope_type] and getattr(self, name) != default:
                raise bad(name, f"has no effect with rope_type={self.rope_type!r} (leave it at {default!r})")
        if not self.rope_factor > 0:
            raise bad("rope_factor", "must be > 0")
        if self.rope_original_max_len is not None and (not isinstance(self.rope_original_max_len, int)
                                                       or self.rope_original_max_len <= 0):
            raise bad("rope_original_max_len", "must be a positive integer or null")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise bad("rope_high_freq_factor", f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} (> 0)")
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            raise bad("rope_attention_factor", "must be > 0 or null")

    def _check_moe(self, bad) -> None:
        # JSON and YAML give a list; the frozen config keeps a tuple (hashable, compares equal).
        if isinstance(self.moe_dense_layers, list):
            object.__setattr__(self, "moe_dense_layers", tuple(self.moe_dense_layers))
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise bad("n_experts", "must be an integer >= 0 (0: a dense model)")
        if self.n_experts == 0:   # dense: the MoE fields would silently do nothing
            for name in _MOE_FIELDS:
                if getattr(self, name) != _MOE_DEFAULTS[name]:
                    raise bad(name, f"has no effect with n_experts=0 (leave it at {_MOE_DEFAULTS[name]!r})")
            return
        k = self.n_experts_per_token
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_experts:
            raise bad("n_experts_per_token", f"must be an integer in 1..n_experts={self.n_experts}")
        if self.moe_dim_ffn is not None and (not isinstance(self.moe_dim_ffn, int) or self.moe_dim_ffn <= 0):
            raise bad("moe_dim_ffn", "must be a positive integer or null")
        if not isinstance(self.moe_norm_topk, bool):
            raise bad("moe_norm_topk", "must be true or false")
        dense = self.moe_dense_layers
        if not isinstance(dense, tuple) or any(not isinstance(i, int) or isinstance(i, bool)
                                               or not 0 <= i < self.n_layers for i in dense):
            raise bad("moe_dense_layers", f"must be a list of layer indices in 0..{self.n_layers - 1}")
        if list(dense) != sorted(set(dense)):
            raise bad("moe_dense_layers", "must be increasing, without repeats")
        if len(dense) == self.n_layers:
            raise bad("moe_dense_layers", "names every layer: that is a dense model (set n_experts=0)")

    @property
    def resolved_moe_dim_ffn(self) -> int:
        return self.moe_dim_ffn if self.moe_dim_ffn is not None else self.dim_ffn

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` routes its tokens to experts (else its MLP is one dense SwiGLU)."""
        return self.n_experts > 0 and layer not in self.moe_dense_layers

    @property
    def resolved_head_dim(self) -> int:
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

    @property
    def rope_scaling(self) -> dict[str, Any]:
        """layers.rope_tables' keyword arguments for this config's frequency scaling."""
        return dict(rope_type=self.rope_type, factor=self.rope_factor,
                    original_max_len=self.rope_original_max_len or self.max_len,
                    low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                    beta_fast=self.rope_beta_fast, beta_slow=self.rope_beta_slow, truncate=self.rope_truncate,
                    attention_factor=self.rope_attention_factor)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        data = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        import yaml

        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(available)}")
        data = yaml.safe_load(path.read_text()) or {}
        data.update(overrides)
        return cls.from_dict(data, source=str(path))


_ROPE_FIELDS = ("rope_factor", "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_attention_factor")
_ROPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _ROPE_FIELDS}
_MOE_FIELDS = ("n_experts_per_token", "moe_dim_ffn", "moe_norm_topk", "moe_dense_layers")
_MOE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _MOE_FIELDS}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
