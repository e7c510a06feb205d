"""Startup: where compiled kernels persist between starts, and how long a start took.

A GPU engine's start is mostly compilation: Triton JIT-compiles the attention, KV-store and
sampling kernels, torch.compile traces and fuses the captured forward (compile_decode), and
Inductor autotunes its kernels. All three keep on-disk caches, but Inductor's default lives
under /tmp (`/tmp/torchinductor_$USER`), which many hosts and every fresh container empty, so
each start there was a cold one. `use_compile_cache` points both caches under one directory
(default `~/.cache/astrai`, or `$XDG_CACHE_HOME/astrai`) before anything compiles, so the
second start of the same model reuses the first one's work.

Variables the user set (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) win: they are only filled
in where unset. A process that already compiled something has them set (Inductor writes its
choice back to the environment), so the engine never moves a cache mid-process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("astrai.serve.engine")

CACHE_VARS = {"inductor": "TORCHINDUCTOR_CACHE_DIR", "triton": "TRITON_CACHE_DIR"}


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astrai"


@dataclass(frozen=True)
class CompileCache:
    dirs: dict[str, str]   # cache name -> directory in use
    warm: bool             # every cache held files before this start

    def describe(self) -> str:
        return f"{'warm' if self.warm else 'cold'} compile cache ({', '.join(f'{k} {v}' for k, v in self.dirs.items())})"


def use_compile_cache(root: str | Path | None = None) -> CompileCache:
    """Point Inductor's and Triton's caches under `root` (default_cache_root()) where the
    environment does not already name them; report whether they already held compiled work."""
    root = Path(root).expanduser() if root is not None else default_cache_root()
    dirs = {}
    for name, var in CACHE_VARS.items():
        path = os.environ.setdefault(var, str(root / name))
        Path(path).mkdir(parents=True, exist_ok=True)
        dirs[name] = path
    warm = all(any(Path(p).iterdir()) for p in dirs.values())
    return CompileCache(dirs, warm)


@dataclass
class StartupTimes:
    """Seconds of each part of an engine's start (printed once it is ready, and in bench/serve.py)."""
    load_s: float = 0.0        # weights from disk onto the device (0 for an engine over a live model)
    kv_cache_s: float = 0.0    # sizing and allocating the KV cache
    graphs_s: float = 0.0      # compiling and capturing the decode graphs (0 without graphs)
    total_s: float = 0.0       # from the constructor's call to a ready engine
    cache: CompileCache | None = None   # the compile cache used (None: nothing compiles, e.g. a CPU)

    def describe(self) -> str:
        cache = f"; {self.cache.describe()}" if self.cache is not None else ""
        return (f"engine ready in {self.total_s:.1f} s (weights {self.load_s:.1f} s, KV cache {self.kv_cache_s:.1f} s, "
                f"compile + CUDA graphs {self.graphs_s:.1f} s){cache}")
