"""astrai_serve: continuous-batching engine, paged KV cache, gRPC core and OpenAI REST facade.

One folder per process or layer, each importing only the ones below it:

    cli/      `astrai serve | gateway | generate`: wiring only           (the process the user starts)
    facade/   the OpenAI REST facade, a gRPC client of the core            (its own process)
    core/     the gRPC core and its glue to the engine                     (the `astrai serve` process)
    engine/   scheduler, KV cache, model runner, sampler, `LLM`            (the engine process, or in-process)
    kernels/  attention, sampling, GEMV, K/V store, MoE: torch + Triton    (called by the engine)
    proto/    the gRPC contract: generated stubs and shared constants      (both ends of the wire)

auth.py (the API key, both protocols) and child_process.py (how processes are started) are shared
by every process. tests/test_layout.py fails on an import cycle or an import against these layers.

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
