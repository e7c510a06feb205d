"""Command-line flags for every EngineConfig field, derived from the dataclass itself.

Each field `foo_bar: int = 3  # why` becomes `--foo-bar` with the field's comment as its help,
so a new engine setting reaches `astrai serve` and `astrai generate` without touching this
file. Flags default to None: only the ones given become overrides passed to LLMEngine.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import types
import typing
from typing import Any

# Where the engine keeps its config; the first that imports wins.
_CONFIG_MODULES = ("astrai_serve.engine.config", "astrai_serve.engine.engine_config", "astrai_serve.engine.llm_engine")


def engine_config_class() -> type | None:
    for name in _CONFIG_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        cls = getattr(module, "EngineConfig", None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls
    return None


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", re.M)
    return {m.group(1): m.group(2).strip() for m in pattern.finditer(source)}


def _scalar_type(annotation: Any) -> type | None:
    """int/float/str/bool from an annotation such as `int`, `int | None`, `Optional[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, str, bool) else None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    cls = engine_config_class()
    if cls is None:
        return
    group = parser.add_argument_group("engine", "engine settings (defaults: the engine's own)")
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        kind = _scalar_type(hints.get(field.name))
        if kind is None or not field.init:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        # None means "the engine decides" (the comment says how), so say so rather than print None.
        shown = "auto" if default is None else default
        help_text = f"{comments.get(field.name, field.name)} (default: {shown})".replace("%", "%%")
        dest = f"engine_{field.name}"
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is typing.Literal else None
            group.add_argument(flag, dest=dest, type=kind, default=None, choices=choices,
                               metavar=None if choices else field.name.upper(), help=help_text)


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave, as LLMEngine keyword overrides."""
    prefix = "engine_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
