"""The package's import graph: no cycles, and the structure plans stay free of megatron-core."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_sffn"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (REPO_ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imported_names(module: str, path: Path, module_level: bool = False) -> set[str]:
    """Every module name an import statement of ``module`` may load (function-level ones too, unless
    ``module_level``).

    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    names: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def _import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """module -> the package modules importing it loads (a submodule loads its packages first)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in _imported_names(module, path, module_level):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                # a module's own packages are already loading when it runs: not an edge
                if target in modules and target != module and not module.startswith(target + "."):
                    edges.add(target)
        graph[module] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_sees_a_function_level_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "megatron_sffn.parallel.plan" in graph and graph["megatron_sffn.parallel.base"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_structure_plans_need_no_megatron():
    """The plans and what they import at module level (inside the package) import no megatron-core."""
    modules = _modules()
    graph = _import_graph(module_level=True)
    seen, todo = set(), [m for m in modules if m.startswith("megatron_sffn.parallel.plans")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert "megatron_sffn.parallel.layout" in seen
    importers = {m for m in seen if any(n.split(".")[0] == "megatron" for n in _imported_names(m, modules[m], True))}
    assert not importers, f"modules the structure plans load import megatron-core: {sorted(importers)}"
