"""One vocabulary each (channel classes, consumer kinds, error reasons), used everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from bnexporter.detection.analysis import classify_channels
from bnexporter.errors import REASONS, RETRYABLE
from bnexporter.report import CLASS_NAMES, CONSUMER_KINDS, LayerReport, Summary
from bnexporter.topology.keras_graph import CONSUMERS

ROOT = Path(__file__).resolve().parents[1]


def test_detection_produces_exactly_the_report_classes():
    res = classify_channels(np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), 1e-3, "relu")
    assert tuple(res.classes()) == CLASS_NAMES


def test_report_reads_every_class_as_an_attribute():
    layer = LayerReport("bn", 4, 1e-3, "config", "relu", "config", {"dead": [1]})
    assert all(getattr(layer, c) == ([1] if c == "dead" else []) for c in CLASS_NAMES)
    summary = Summary.build([layer], [], 0)
    assert all(getattr(summary, c) == (1 if c == "dead" else 0) for c in CLASS_NAMES)


def test_every_class_is_a_metric_and_in_the_contract():
    contract = (ROOT / "docs" / "metrics-contract.md").read_text()
    for c in CLASS_NAMES:
        assert f"bnexporter_layer_{c}_channels" in contract, c


def test_consumer_kinds_are_one_list():
    assert CONSUMERS == CONSUMER_KINDS


def _reason_literals() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "bnexporter").rglob("*.py"):
        if "web" in path.parts or path.name in ("validate.py", "yamlcheck.py"):
            continue  # config errors, not checkpoint reasons
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", "")
            own_error = name == "error" and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "self" and \
                "formats" in path.parts
            if name in ("CheckpointError", "_fail", "failed") and len(node.args) >= 3:
                arg = node.args[2]
            elif own_error and len(node.args) >= 2:
                arg = node.args[1]
            elif name in ("CheckpointError", "_fail", "failed") or own_error:
                arg = next((k.value for k in node.keywords if k.arg == "reason"), None)
            else:
                continue
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
    return found


def test_every_reason_raised_is_in_the_table():
    used = _reason_literals()
    assert used, "the scan found no reasons: it is broken"
    assert used <= set(REASONS), used - set(REASONS)
    assert set(REASONS) >= RETRYABLE
