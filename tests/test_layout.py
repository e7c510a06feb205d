"""The package layout holds: no import cycles, and every layer imports only what its folder's
docstring allows (astrai_serve/__init__.py draws the layers).

Imports are read from the source with `ast`, module-level and function-level alike (a lazy import
that closes a cycle is still a cycle, only a later one); `if TYPE_CHECKING:` blocks are skipped."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("astrai_train", "astrai_serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` statement reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names this module imports (for `from X import Y`, both X and X.Y: the caller keeps
    whichever is a module of ours)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports. Importing a package's submodule does not count
    as importing the package's __init__ (that edge would put every re-exporting package in a
    cycle with its own submodules); naming the package itself does."""
    files = {p: _module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = set(files.values())
    graph: dict[str, set[str]] = {}
    for path, module in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            # `from a.b import c`: a.b.c if that is a module of ours, else the module a.b.
            if name in modules:
                edges.add(name)
        # `from a.b import c` where c is a module: drop the edge to a.b unless something else
        # of a.b was imported from it.
        for name in list(edges):
            parent = name.rpartition(".")[0]
            if parent in edges and not _names_non_module_from(tree, parent, modules, module,
                                                              path.name == "__init__.py"):
                edges.discard(parent)
        edges.discard(module)
        graph[module] = edges
    return graph


def _names_non_module_from(tree, parent: str, modules: set[str], module: str, is_package: bool) -> bool:
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
            if base == parent and any(f"{base}.{a.name}" not in modules for a in node.names):
                return True
        elif isinstance(node, ast.Import) and any(a.name == parent for a in node.names):
            return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    return {n.split(".")[0] for n in _imported_names(tree, module, path.name == "__init__.py")}


# (layer, what it must not import: modules of ours by prefix, or top-level third-party packages)
FORBIDDEN = [
    ("astrai_train.model", ("lightning", "astrai_serve", "astrai_train.objectives", "astrai_train.data")),
    ("astrai_train.tokenizer", ("lightning", "torch", "astrai_serve", "astrai_train.model", "astrai_train.objectives")),
    ("astrai_train.data", ("astrai_serve", "astrai_train.objectives")),
    ("astrai_train.adapters", ("lightning", "astrai_serve", "astrai_train.objectives", "astrai_train.data",
                               "astrai_train.tokenizer")),
    ("astrai_serve.kernels", ("astrai_serve.engine", "astrai_serve.core", "astrai_serve.facade", "astrai_serve.cli",
                              "lightning")),
    ("astrai_serve.engine", ("astrai_serve.core", "astrai_serve.facade", "astrai_serve.cli", "lightning",
                             "astrai_train.objectives", "astrai_train.data")),
    ("astrai_serve.core", ("astrai_serve.facade", "astrai_serve.cli", "lightning")),
    ("astrai_serve.facade", ("torch", "astrai_serve.engine", "astrai_serve.kernels", "astrai_serve.core",
                             "astrai_serve.cli", "astrai_train", "lightning")),
    ("astrai_serve.proto", ("astrai_serve.engine", "astrai_serve.kernels", "astrai_serve.core",
                            "astrai_serve.facade", "astrai_serve.cli", "astrai_train", "torch")),
]


@pytest.mark.parametrize("layer,forbidden", FORBIDDEN, ids=[layer for layer, _ in FORBIDDEN])
def test_layer_imports_only_what_it_may(layer, forbidden):
    graph = import_graph()
    folder = ROOT / Path(*layer.split("."))
    assert folder.is_dir(), f"{layer} is not a folder any more: update this test and the layer docstrings"
    bad = []
    for path in sorted(folder.rglob("*.py")):
        module = _module_name(path)
        ours = graph[module]
        theirs = _third_party(path)
        for rule in forbidden:
            hits = [m for m in ours if m == rule or m.startswith(rule + ".")]
            if "." not in rule and rule not in PACKAGES and rule in theirs:
                hits.append(rule)
            bad += [f"{module} imports {h}" for h in hits]
    assert not bad, f"{layer} may not import {forbidden}:\n" + "\n".join(bad)


def test_only_commands_import_the_command_packages():
    # The CLI packages are wiring: the libraries below never reach up into them. docgen documents
    # every command's flags, so it reads the parsers.
    graph = import_graph()
    commands = (["astrai_train", "cli"], ["astrai_serve", "cli"])
    bad = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
           if target.split(".")[:2] in commands and module.split(".")[:2] not in commands
           and module != "astrai_train.docgen"]
    assert not bad, "\n".join(bad)


def test_every_folder_says_what_runs_there():
    for pkg in PACKAGES:
        for init in sorted((ROOT / pkg).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc.split()) >= 8, f"{init.relative_to(ROOT)} needs a docstring saying what runs there"


# A repository path written out in prose or code: `astrai_serve/core/server.py`, `bench/serve.py`.
_PATH = re.compile(r"(?<![\w/.])((?:astrai_serve|astrai_train|tests|bench|docs|configs|protos|data)/[\w./-]*\w\.(?:py|md|json|yaml|proto|sh|png|txt))\b")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    keep = (".py", ".md", ".proto", ".sh", ".toml", ".yaml", ".txt", "Makefile", ".pyi")
    return [ROOT / f for f in out if f.endswith(keep) and (ROOT / f).is_file() and not f.startswith("data/")]


def test_every_repository_path_the_code_and_docs_name_exists():
    missing = []
    for path in _tracked_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for named in _PATH.findall(line):
                stem = Path(named).stem
                if any(c in named for c in "*{<") or stem.isupper():  # a pattern or a placeholder (RECIPE.yaml)
                    continue
                if not (ROOT / named).exists() and not (path.parent / named).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{n} names {named}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
