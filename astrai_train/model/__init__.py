"""The model: config, Transformer (GQA/MLA), KV-cache backends, generation and HF interop.

Pure PyTorch: imports neither Lightning nor astrai_serve.
"""
from .attention import kv_layout
from .backend import AttentionBackend, KVLayout
from .config import ConfigError, ModelConfig, presets
from .fusion import fuse_projections
from .generate import generate
from .inference_ops import TORCH_OPS, InferenceOps
from .kv_cache import ContiguousKVCache
from .transformer import Transformer

__all__ = ["AttentionBackend", "ConfigError", "ContiguousKVCache", "KVLayout", "ModelConfig",
           "InferenceOps", "TORCH_OPS", "Transformer", "fuse_projections", "generate", "kv_layout", "presets"]
