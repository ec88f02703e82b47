"""jaxleak's modules import one another one way: no cycle, function-level imports included.

The graph is read from the source with :mod:`ast` (every ``import``
statement anywhere in a module, also inside functions), so a cycle hidden
behind a deferred import is found as well as one that fails at import time.
"""

from __future__ import annotations

import ast
import os

import jaxleak

PACKAGE = "jaxleak"
ROOT = os.path.dirname(os.path.abspath(jaxleak.__file__))


def _module_names(root: str) -> dict[str, str]:
    """``{dotted module name: file path}`` of every module under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, os.path.dirname(root)).replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                name = rel if f == "__init__.py" else f"{rel}.{f[:-3]}"
                out[name] = os.path.join(folder, f)
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``importer``)."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: str, modules: set[str]) -> set[str]:
    """The jaxleak modules that module ``name`` imports, anywhere in its source.

    ``from jaxleak import io`` counts as importing ``jaxleak.io`` (a
    submodule) and ``from jaxleak.task import Task`` as importing
    ``jaxleak.task``. Importing the package itself (``from jaxleak import
    __version__``) is not an edge: the package's ``__init__`` re-exports the
    public API and every module is inside it.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != PACKAGE and target != name:
                found.add(target)
    return found


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the jaxleak modules, the package ``__init__`` left out."""
    names = _module_names(root)
    modules = set(names)
    return {name: imports_of(name, path, modules) for name, path in names.items() if name != PACKAGE}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _write(folder, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_no_import_cycle_among_jaxleak_modules():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)  # the walk saw the package's modules
    cycles = find_cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
              for c in cycles]
    assert not cycles, "import cycles among jaxleak modules:\n" + "\n".join(detail)


def test_walk_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    _write(pkg, "__init__.py", "from jaxleak import a\n__version__ = '0'\n")
    _write(pkg, "a.py", "from jaxleak import b\n")
    _write(pkg, "b.py", "import numpy\n\ndef f():\n    from jaxleak.c import thing\n    return thing\n")
    _write(pkg, "c.py", "from . import a as _a\nfrom jaxleak import __version__\n")
    _write(pkg, "d.py", "import jaxleak.a\n")
    graph = import_graph(str(pkg))
    assert graph == {"jaxleak.a": {"jaxleak.b"}, "jaxleak.b": {"jaxleak.c"}, "jaxleak.c": {"jaxleak.a"},
                     "jaxleak.d": {"jaxleak.a"}}
    assert find_cycles(graph) == [["jaxleak.a", "jaxleak.b", "jaxleak.c"]]


def test_no_cycle_in_a_one_way_graph():
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": set(), "w": {"x", "z"}}) == []
