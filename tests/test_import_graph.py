"""qatsparse's modules import each other without circles, counting imports inside functions too (a lazy
import that hides a circle still couples the two modules both ways)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx  # a dependency of torch

PACKAGE = Path(__file__).resolve().parents[1] / "qatsparse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Edges module -> qatsparse module it imports (anywhere in the file; ``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    if target in files and target != name:
                        g.add_edge(name, target)
            elif isinstance(node, ast.Import):
                g.add_edges_from((name, a.name) for a in node.names if a.name in files and a.name != name)
    return g


def test_no_import_circles():
    g = import_graph()
    assert g.number_of_edges() > 50  # the walk found the imports
    circles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert circles == []
