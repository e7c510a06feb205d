"""The fields of a config dataclass, read from its source file for `astrai_train.docgen`.

Parsed, not imported: importing the data module would pull in Lightning (seconds), and the
source is where each field's one-line `# comment` lives anyway. Defaults are evaluated when they
are constants, containers, arithmetic or module constants (`1 << 20`, `CHUNK_CHARS`, also those
imported from a sibling module), so the page shows the value a user gets.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import operator
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MISSING_COMMENT = "(no comment in the source)"


@dataclass(frozen=True)
class FieldDoc:
    name: str                # field name
    type: str                # annotation as written in the source
    default: str | None      # the default as JSON spells it (or its source text); None: required
    expression: str | None   # the source of a computed default (`256 << 20`), else None
    comment: str             # the field's one-line comment (or docstring), or MISSING_COMMENT
    section: str | None      # "module:Class" of a nested dataclass (a recipe section), else None


@functools.cache
def _module(module: str) -> tuple[ast.Module, dict[int, str]]:
    """A module's syntax tree and its comments by line number."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        raise FileNotFoundError(f"docgen: no source file {path} for module {module}")
    source = path.read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return ast.parse(source), comments


@functools.cache
def _constants(module: str) -> dict[str, Any]:
    """Module-level constants, and those it imports from sibling modules (`from .x import NAME`)."""
    tree, _ = _module(module)
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            sibling = _constants(module.rsplit(".", 1)[0] + "." + node.module)
            values.update({a.asname or a.name: sibling[a.name] for a in node.names if a.name in sibling})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                values[node.targets[0].id] = evaluate(node.value, values)
    return values


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.LShift: operator.lshift,
              ast.RShift: operator.rshift, ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(node: ast.expr, names: dict[str, Any]) -> Any:
    """Constants, containers, arithmetic, known names and empty dict()/list(); ValueError otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return [evaluate(e, names) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {evaluate(k, names): evaluate(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](evaluate(node.left, names), evaluate(node.right, names))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](evaluate(node.operand, names))
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("dict", "list", "tuple") \
            and not node.args and not node.keywords:
        return {} if node.func.id == "dict" else []
    raise ValueError(f"cannot evaluate {ast.unparse(node)}")


def _class(module: str, name: str) -> ast.ClassDef:
    tree, _ = _module(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        raise ValueError(f"docgen: class {name} not found in {module}")
    if node.bases:  # inherited fields would be invisible to this reader
        raise ValueError(f"docgen: {module}.{name} has base classes; only plain dataclasses can be read")
    return node


def _is_dataclass(module: str, name: str) -> bool:
    tree, _ = _module(module)
    return any(isinstance(n, ast.ClassDef) and n.name == name and
               any("dataclass" in ast.unparse(d) for d in n.decorator_list) for n in tree.body)


def _comment(body: list[ast.stmt], i: int, comments: dict[int, str]) -> str:
    """The trailing `# comment` on the field's lines, else a string statement right after it."""
    node = body[i]
    comment = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments), "")
    after = body[i + 1] if i + 1 < len(body) else None
    if not comment and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
            and isinstance(after.value.value, str):
        comment = after.value.value.strip().splitlines()[0]
    return comment


def field_docs(path: str) -> list[FieldDoc]:
    """One FieldDoc per init field of the dataclass at "module:Class", in declaration order."""
    module, _, name = path.partition(":")
    body = _class(module, name).body
    comments, names = _module(module)[1], _constants(module)
    docs = []
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name) \
                or ast.unparse(node.annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        value, section = node.value, None
        if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
            keywords = {k.arg: k.value for k in value.keywords}
            if isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False:
                continue
            factory = keywords.get("default_factory")
            if isinstance(factory, ast.Name) and _is_dataclass(module, factory.id):
                section = f"{module}:{factory.id}"
            value = factory.body if isinstance(factory, ast.Lambda) else (
                ast.Call(factory, [], []) if factory is not None else keywords.get("default"))
        default, expression = _default(value, names) if section is None else (None, None)
        comment = _comment(body, i, comments) or (f"the `{node.target.id}:` section" if section else MISSING_COMMENT)
        docs.append(FieldDoc(node.target.id, ast.unparse(node.annotation), default, expression, comment, section))
    return docs


def _default(node: ast.expr | None, names: dict[str, Any]) -> tuple[str | None, str | None]:
    if node is None:
        return None, None
    try:
        value = evaluate(node, names)
    except ValueError:
        return ast.unparse(node), None
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except TypeError:
        shown = repr(value)
    try:
        ast.literal_eval(node)
        return shown, None
    except ValueError:
        return shown, None if isinstance(node, ast.Call) else ast.unparse(node)
