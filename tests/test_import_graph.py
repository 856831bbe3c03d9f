"""The package's import graph, read from the source: no module cycles, and the layering rules.

One reader serves every check.  Imports inside functions count (they run
when the function does); imports under ``if TYPE_CHECKING:`` never run, so
they count only for the layering rules, where even an annotation-only
dependency would tie a lower layer to a higher one.

Layering: ``config/`` is a leaf that every layer can read (it imports neither
the sharding code, the accounting, EST, planning nor training); ``planning/``
plans a run without training one, so it never imports ``training/``; and no
two top-level packages import each other, directly or round a longer loop.
The structure plans and the planning tools load without megatron-core.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


def _imported_names(module: str, path: Path, *, type_checking: bool) -> set[str]:
    """Every module name an import statement of ``module`` may load, function-level ones included.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule).
    """
    names: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if not type_checking and _is_type_checking_block(node):
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

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def _import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the package modules importing it loads (a submodule loads its packages first)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in _imported_names(module, path, type_checking=type_checking):
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
        for target in sorted(graph.get(node, ())):
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


def _layer(module: str) -> str:
    """The top-level package (``megatron_sffn.config``) or module (``megatron_sffn.train``) holding ``module``."""
    return ".".join(module.split(".")[:2])


def _layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in _import_graph(type_checking=True).items():
        for target in targets:
            if _layer(target) not in (_layer(module), PACKAGE):
                graph.setdefault(_layer(module), set()).add(_layer(target))
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_reader_sees_lazy_relative_and_type_checking_imports():
    modules = _modules()
    names = _imported_names("megatron_sffn.planning.plan", modules["megatron_sffn.planning.plan"], type_checking=False)
    assert {"megatron_sffn.planning.checks", "megatron_sffn.accounting.model", "megatron_sffn.config.train"} <= names
    graph = _import_graph()
    assert "megatron_sffn.parallel.plan" in graph["megatron_sffn.planning.checks"]  # imported inside a function
    assert graph["megatron_sffn.parallel.base"]
    with_annotations = _import_graph(type_checking=True)["megatron_sffn.parallel.base"]
    assert "megatron_sffn.parallel.subnetwork" in with_annotations - graph["megatron_sffn.parallel.base"]


def test_cycle_finder_sees_a_function_level_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_is_a_leaf():
    above = {"parallel", "accounting", "est", "planning", "training", "model", "inference", "data", "hf"}
    reached = {layer.rpartition(".")[2] for layer in _reachable(_layer_graph(), "megatron_sffn.config")}
    assert not reached & above, f"megatron_sffn.config reaches {sorted(reached & above)}"


def test_planning_does_not_import_training():
    assert "megatron_sffn.training" not in _reachable(_layer_graph(), "megatron_sffn.planning")


def test_no_two_packages_import_each_other():
    graph = _layer_graph()
    loops = sorted(layer for layer in graph if layer in _reachable(graph, layer))
    assert not loops, f"packages on an import loop: {loops}"


def test_the_structure_plans_and_the_dry_run_load_without_megatron():
    """Run, not read: a one-rank dry run and the cost model must not pay megatron-core's import."""
    code = (
        "import sys, megatron_sffn.parallel.plan, megatron_sffn.planning.plan; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout
