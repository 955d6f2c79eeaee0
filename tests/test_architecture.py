"""The folders name the architecture (docs/architecture.md): imports point one way, and no cycles.

Read from the source (every ``from .x import`` / ``from ..x import``, at module level or inside a
function), so the check does not depend on what a test happens to import first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "asrfx"

# Each layer may import its own folder and the layers below it, never above.
RANK = {
    "errors": 0, "data": 0,
    "algebra": 1,
    "graph": 2, "nn": 2,
    "passes": 3,
    "observe": 4, "deploy": 4,
    "api": 5,
    "cli": 6,
    # public names kept from before the folders, and the package itself
    "attention": 7, "models": 7, "checkpoint": 7, "dynamo": 7, "quickstart": 7, "__main__": 7, "": 8,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    base = ROOT.parent / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(tree: ast.AST):
    """Relative imports anywhere in the module, except under ``if TYPE_CHECKING:`` (annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        module = _module(path)
        graph.add_node(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text())):
            if all(a.name.startswith("__") for a in node.names) and node.module is None:
                continue  # `from .. import __version__`: package metadata, not code
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` names a submodule; `from .m import f` the module m
            for name in [target] + [f"{target}.{a.name}" for a in node.names]:
                if name != module and _exists(name):
                    graph.add_edge(module, name)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = import_graph()
    graph.remove_nodes_from([n for n in graph if n == "asrfx" or n.count(".") == 1 and _exists(n)
                             and (ROOT.parent / n.replace(".", "/") / "__init__.py").exists()])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_point_down_the_layers():
    wrong = [(a, b) for a, b in import_graph().edges
             if _layer(a) != _layer(b) and RANK[_layer(b)] >= RANK[_layer(a)]]
    assert not wrong, f"imports against the layer order {RANK}: {wrong}"


@pytest.mark.parametrize("layer", sorted({_layer(_module(p)) for p in ROOT.rglob("*.py")}))
def test_every_layer_has_a_rank(layer):
    assert layer in RANK, f"asrfx/{layer}: a new folder or top-level module needs its place in RANK"


def test_the_checker_sees_a_planted_cycle(tmp_path, monkeypatch):
    """The checks can fail: a copy of the package with graph importing passes is caught."""
    import shutil

    copy = tmp_path / "asrfx"
    shutil.copytree(ROOT, copy)
    ops = copy / "graph" / "ops.py"
    ops.write_text("from ..passes.detect import detect  # planted\n" + ops.read_text())
    monkeypatch.setattr(__import__(__name__), "ROOT", copy)
    graph = import_graph()
    assert ("asrfx.graph.ops", "asrfx.passes.detect") in graph.edges
    assert list(nx.simple_cycles(graph))
    with pytest.raises(AssertionError, match="layer order"):
        test_imports_point_down_the_layers()
