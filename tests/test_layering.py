"""The package's layers, read from the source: every import counts, top-level, lazy and ``TYPE_CHECKING`` alike.

``config/`` is a leaf that every layer can read (it imports neither the
sharding code, the accounting, EST, planning nor training); ``planning/``
plans a run without training one, so it never imports ``training/``; and no
two top-level packages import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_ROOT / "megatron_sffn"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its source."""
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
                source = f"{parent}.{node.module}" if node.module else parent
            else:
                source = node.module or ""
            for alias in node.names:  # ``from . import counts`` imports the submodule, not the package
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {name for name in found if name in known and name != module}


def _layer(module: str) -> str:
    """The top-level package (``megatron_sffn.config``) or module (``megatron_sffn.train``) holding ``module``."""
    return ".".join(module.split(".")[:2])


def _layer_graph() -> dict[str, set[str]]:
    known = _module_names()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        for imported in _imports(module, path, known):
            if _layer(imported) != _layer(module):
                graph.setdefault(_layer(module), set()).add(_layer(imported))
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_reader_sees_lazy_and_relative_imports():
    """The reader itself, on a module whose imports are known: planning.plan imports .checks and accounting."""
    known = _module_names()
    imports = _imports("megatron_sffn.planning.plan", known["megatron_sffn.planning.plan"], known)
    assert {"megatron_sffn.planning.checks", "megatron_sffn.accounting.model", "megatron_sffn.config.train"} <= imports
    lazy = _imports("megatron_sffn.planning.checks", known["megatron_sffn.planning.checks"], known)
    assert "megatron_sffn.parallel.plan" in lazy  # imported inside a function


def test_config_is_a_leaf():
    graph = _layer_graph()
    above = {"parallel", "accounting", "est", "planning", "training", "model", "inference", "data", "hf"}
    reached = {layer.rpartition(".")[2] for layer in _reachable(graph, "megatron_sffn.config")}
    assert not reached & above, f"megatron_sffn.config reaches {sorted(reached & above)}"


def test_planning_does_not_import_training():
    reached = _reachable(_layer_graph(), "megatron_sffn.planning")
    assert "megatron_sffn.training" not in reached


def test_no_two_packages_import_each_other():
    graph = _layer_graph()
    loops = sorted(layer for layer in graph if layer in _reachable(graph, layer))
    assert not loops, f"packages on an import loop: {loops}"
