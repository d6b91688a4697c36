"""The package's shape: no import cycles, no oversized modules, no oversized functions.

Read from the source with ``ast``, so nothing is imported and the checks take milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "sdd_search"

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Modules allowed above MAX_MODULE_LINES, with the reason and their own cap. Keep it short.
MODULE_LINES_ALLOWLIST: dict[str, int] = {}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under sdd_search/."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _absolute_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from X import ...`` statement reads from, with relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    base_parts = package_parts[: len(package_parts) - (node.level - 1)]
    return ".".join(base_parts + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (top level, inside functions, or
    under ``if TYPE_CHECKING``).

    ``from sdd_search.a import b`` is an edge to ``sdd_search.a.b`` when that is a module, else
    to ``sdd_search.a`` (a package's ``__init__``, whose own imports are its edges in turn).
    """
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute_base(node, module, is_package)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in files else base)
            for target in targets:
                if target in files and target != module:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strong_connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                strong_connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            strong_connect(node)
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    next_frontier.append(successor)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def test_the_graph_sees_imports_inside_functions_and_package_reexports() -> None:
    graph = import_graph()
    assert "sdd_search.models.factory" in graph["sdd_search.models"]  # __init__ re-export
    assert "sdd_search.models.base" in graph["sdd_search.models.resnet"]
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(cyclic) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (imports inside functions count): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_module_sizes() -> None:
    too_long = []
    for path in module_files().values():
        relative = path.relative_to(PACKAGE_ROOT.parent).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MODULE_LINES_ALLOWLIST.get(relative, MAX_MODULE_LINES):
            too_long.append(f"{relative} ({lines} lines)")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(too_long)


def test_function_lengths() -> None:
    too_long = []
    for path in module_files().values():
        relative = path.relative_to(PACKAGE_ROOT.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(too_long)
