"""The shipped consumer presets: the JSON copy the scan reads equals the YAML file
people edit. After editing the YAML, rewrite the copy:

    python tests/topology/test_presets_json.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bnexporter.topology import consumers

FOLDER = Path(consumers.__file__).resolve().parent / "presets"


def _from_yaml() -> object:
    return yaml.safe_load((FOLDER / consumers.PRESETS_YAML).read_text(encoding="utf-8"))


def test_json_copy_equals_the_yaml():
    copy = json.loads((FOLDER / consumers.PRESETS_JSON).read_text(encoding="utf-8"))
    want = _from_yaml()
    assert copy == want, "run: python tests/topology/test_presets_json.py"
    # the first matching rule wins: the order is part of the preset
    assert [list(v["rules"]) for v in copy.values()] == [list(v["rules"]) for v in want.values()]


def test_the_scan_needs_no_yaml():
    import subprocess
    import sys

    code = ("import sys, bnexporter.scan_cli, bnexporter.topology.consumers as c; "
            "assert c.PRESETS; print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


if __name__ == "__main__":
    with open(FOLDER / consumers.PRESETS_JSON, "w", encoding="utf-8") as f:
        json.dump(_from_yaml(), f, indent=1)
        f.write("\n")
