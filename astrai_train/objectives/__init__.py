"""One LightningModule per objective over a shared base, and the run that drives them.

Modules are imported lazily so `astrai train --help` and the pure loss functions do not pay for
Lightning's import.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULE_FILES = {"seq": ("seq", "SeqModule"), "sft": ("sft", "SFTModule"),
                 "dpo": ("dpo", "DPOModule"), "grpo": ("grpo", "GRPOModule")}


class _Modules(dict):
    """objective name -> LightningModule class, imported on first use."""

    def __missing__(self, name: str) -> Any:
        if name not in _MODULE_FILES:
            raise KeyError(f"unknown objective {name!r}; choose one of {', '.join(_MODULE_FILES)}")
        file, cls = _MODULE_FILES[name]
        value = getattr(importlib.import_module(f"{__name__}.{file}"), cls)
        self[name] = value
        return value


MODULES: dict[str, Any] = _Modules()

__all__ = ["MODULES"]
