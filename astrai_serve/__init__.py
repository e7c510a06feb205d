"""astrai_serve: continuous-batching engine, paged KV cache, gRPC core and OpenAI REST facade.

`LLM` and `SamplingParams` are imported lazily, so the daemon's light modules (the REST facade,
the gRPC client) can import this package without pulling in torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from astrai_serve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'astrai_serve' has no attribute {name!r}")
