"""No import cycles in ``aigc_ext``: the graph of which module imports which is acyclic.

The graph is built with ``ast`` from the source of every module of the package. An import
statement naming an ``aigc_ext`` module is an edge; ``from pkg import name`` is an edge to the
module ``pkg.name`` when there is one, else to ``pkg``; relative imports are resolved. The
implicit import of a module's parent packages is not an edge (every module would otherwise close
a cycle with its package's ``__init__``), and neither is an import by name at run time
(``importlib.import_module``, which the plugin manager uses for the default plugins). The
compiled extension ``aigc_ext._C`` is a module without imports.

Two graphs are checked: the module-level imports (what runs at import time), which must be
acyclic without exception; and every import, inside functions and under ``if TYPE_CHECKING:``
too (a lazy import still means the two modules need each other), which must be acyclic as well
(:data:`KNOWN_LAZY_CYCLES` is where an accepted exception would be listed: there is none).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "aigc_ext"
EXTENSIONS = ("aigc_ext._C",)  # compiled modules: no source, no imports
# Function-level cycles that are accepted, as the (module, module) edges that close them.
KNOWN_LAZY_CYCLES: set[tuple[str, str]] = set()


def _modules(package: Path) -> dict[str, Path | None]:
    """Module name -> source file (None for a compiled extension)."""
    modules: dict[str, Path | None] = dict.fromkeys(EXTENSIONS)
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _nearest(name: str, modules: dict) -> str | None:
    """``name`` if it is a module, else the closest package above it that is."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _module_level(tree: ast.Module):
    """The nodes of a module's top level, into ``if``/``try``/``with`` blocks but not into
    function or class bodies (class bodies run at import, but hold no imports here)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def import_graph(package: Path = PACKAGE, *, module_level: bool = False) -> dict[str, set[str]]:
    """Module -> the ``aigc_ext`` modules it imports (see the module docstring); with
    ``module_level``, only the imports that run when the module is imported."""
    modules = _modules(package)
    top = package.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        if path is None:
            continue
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree) if module_level else ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == top]
                targets = [_nearest(t, modules) for t in targets]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                if base.split(".")[0] != top:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else _nearest(base, modules))
            graph[name].update(t for t in targets if t is not None and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_only_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_the_graph_sees_module_level_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "aigc_ext"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from aigc_ext import a\n")
    (pkg / "a.py").write_text("def f():\n    from aigc_ext.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom . import c\nimport aigc_ext.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from aigc_ext.a import f\nfrom aigc_ext import _C\n")
    graph = import_graph(pkg)
    assert graph["aigc_ext"] == {"aigc_ext.a"}
    assert graph["aigc_ext.a"] == {"aigc_ext.sub.b"}
    assert graph["aigc_ext.sub.b"] == {"aigc_ext.a", "aigc_ext.sub.c"}
    assert graph["aigc_ext.sub.c"] == {"aigc_ext.a", "aigc_ext._C"}
    assert find_cycle(graph) == ["aigc_ext.a", "aigc_ext.sub.b", "aigc_ext.a"]
    at_import = import_graph(pkg, module_level=True)
    assert at_import["aigc_ext.a"] == set()  # the import inside f runs only when f does
    assert at_import["aigc_ext.sub.b"] == graph["aigc_ext.sub.b"]
    assert find_cycle(at_import) is None


def test_aigc_ext_has_no_import_cycle_at_import_time():
    graph = import_graph(module_level=True)
    assert "aigc_ext.dispatch" in graph["aigc_ext.api"]  # the graph has the package's edges
    assert "aigc_ext.plugins" not in graph["aigc_ext.dispatch"]  # a lazy import: not here
    cycle = find_cycle(graph)
    if cycle is not None:
        pytest.fail("import cycle at import time: " + " -> ".join(cycle))


def test_aigc_ext_has_no_import_cycle_counting_lazy_imports():
    graph = import_graph()
    assert {"aigc_ext.dispatch", "aigc_ext.plugins", "aigc_ext.cli"} <= set(graph)
    assert "aigc_ext.plugins" in graph["aigc_ext.dispatch"]  # the lazy import is an edge here
    for source, target in KNOWN_LAZY_CYCLES:
        assert target in graph[source], f"{source} -> {target} is gone: drop it from the list"
        graph[source].discard(target)
    cycle = find_cycle(graph)
    if cycle is not None:
        pytest.fail("import cycle: " + " -> ".join(cycle))
