"""The serving engine: scheduler (CPU) + paged KV cache with a radix prefix cache + model runner
+ sampler, behind `LLMEngine` (step-wise, for the daemon) and `LLM` (offline batch generation).

Names are resolved lazily so importing one submodule (say, the scheduler) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EngineConfig": "config", "LLM": "llm", "CompletionOutput": "llm", "GenerationResult": "llm",
    "EngineStats": "llm_engine", "LLMEngine": "llm_engine", "RequestOutput": "outputs",
    "SamplingParams": "sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
