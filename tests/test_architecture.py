"""The rooms of the package and the direction of their dependencies."""

from __future__ import annotations

from tests.support.imports import cycles, import_graph

# lower layers never import higher ones
LAYERS = [
    ("bnexporter.errors", "bnexporter.steps", "bnexporter.report", "bnexporter.buildinfo"),
    ("bnexporter.formats",),
    ("bnexporter.topology",),
    ("bnexporter.detection",),
    ("bnexporter.scan",),
    ("bnexporter.daemon", "bnexporter.scan_cli", "bnexporter.textfile", "bnexporter.cli",
     "bnexporter.__main__"),
]


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return -1


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_dependencies_point_down():
    graph = import_graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if _layer(m) >= 0 and _layer(d) > _layer(m)]
    assert up == []
    assert all(_layer(m) >= 0 for m in graph if m != "bnexporter"), \
        [m for m in graph if _layer(m) < 0]


def test_web_wing_does_not_import_the_engine():
    engine = ("planner", "worker", "watch", "files", "policy", "validate")
    graph = import_graph()
    bad = [(m, d) for m, deps in graph.items() if m.startswith("bnexporter.daemon.web")
           for d in deps if d.rsplit(".", 1)[-1] in engine]
    assert bad == []
