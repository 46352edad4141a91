"""Generate deploy/kubernetes/prometheusrule.yaml from bnexporter.rules.yml.

The plain rules file is the source of truth (promtool unit-tests it); the Prometheus
Operator copy embeds its text verbatim under ``spec:`` so comments survive and the two
cannot disagree. ``--check`` exits 1 when the generated file is out of date (CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "bnexporter.rules.yml"
TARGET = HERE.parent / "kubernetes" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/bnexporter.rules.yml by
# deploy/prometheus/render_prometheusrule.py: edit the rules file, then re-run the script.
# Prometheus Operator: the Prometheus resource's ruleSelector must match these labels
# (kube-prometheus-stack selects release: <helm release name> by default).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: bnexporter
  labels:
    app.kubernetes.io/name: bnexporter
    app.kubernetes.io/component: alert-rules
spec:
"""


def render(rules_text: str) -> str:
    """Return the PrometheusRule document for ``rules_text`` (a rules file)."""
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError("rules file has no top-level 'groups:' key")
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    out = HEADER + body + "\n"
    # The text splice must mean exactly the same rules as the source file.
    if yaml.safe_load(out)["spec"] != yaml.safe_load(rules_text):
        raise ValueError("rendered PrometheusRule does not match the rules file")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the generated file is out of date")
    args = p.parse_args(argv)
    expected = render(RULES.read_text(encoding="utf-8"))
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != expected:
            print(f"{TARGET} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
