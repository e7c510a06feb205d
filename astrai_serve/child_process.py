"""How `astrai serve` starts its helper processes (the REST facade, the engine): this interpreter
running this checkout's code, as a fresh process, never a fork (a fork would copy the engine's
CUDA state, which CUDA does not allow, and the asyncio and gRPC threads of the daemon).
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

# The directory holding astrai_serve: the child must import the same code as this process.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def python_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, with astrai's code first on the child's path."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def freeze_startup_heap() -> None:
    """Move everything alive now (torch, the model, the engine, the servers) out of the garbage
    collector's sight: it lives as long as the process, and a full collection walking it paused
    an engine step for ~300 ms mid-serving (H200, W4's arrivals; docs/benchmarks.md).
    Called once a serving process has started, as vLLM does."""
    gc.collect()
    gc.freeze()
