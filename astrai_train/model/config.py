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
    dim_ffn: int = 768                # SwiGLU hidden width
    norm_eps: float = 1e-6            # RMSNorm epsilon
    rope_theta: float = 10000.0       # RoPE base
    max_len: int = 2048               # longest sequence (RoPE table size, serving context)
    tie_weight: bool = True           # LM head shares the embedding matrix
    use_qk_norm: bool = False         # RMSNorm on each query/key head before RoPE (Qwen3)
    use_gated_attention: bool = False  # sigmoid gate on the attention output, per channel
    attention: str = "gqa"            # "gqa" or "mla" (multi-head latent attention)
    kv_lora_rank: int = 0             # MLA: width of the compressed KV latent (what the cache stores)
    qk_nope_head_dim: int = 0         # MLA: per-head query/key channels without RoPE
    qk_rope_head_dim: int = 0         # MLA: per-head query/key channels with RoPE (key part shared by heads)
    v_head_dim: int = 0               # MLA: per-head value width
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

    @property
    def resolved_head_dim(self) -> int:
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

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


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
