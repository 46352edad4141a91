"""Layer order: the model's own (config, else file order), never alphabetical."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnexporter.scan import ScanOptions, analyse_path
from tests.support.paths import FIXTURES as _FIXTURES

FIXTURES = Path(_FIXTURES)

_BLOCK = re.compile(r"block_(\d+)_")


def _names(path: str) -> list[str]:
    r = analyse_path(path, ScanOptions(bn_only=True))
    assert r.ok, r.error
    return [layer.name for layer in r.bn_layers]


@pytest.mark.parametrize("name", ["mnv2_s450_inj.keras", "mnv2_s150.h5"])
def test_mobilenet_layers_in_config_order(name: str):
    names = _names(str(FIXTURES / "keras" / name))
    blocks = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    assert blocks == sorted(blocks), names
    assert names[:3] == ["bn_Conv1", "expanded_conv_depthwise_BN", "expanded_conv_project_BN"]
    assert names[-1] == "Conv_1_bn"
    # within a block: expand, depthwise, project
    assert names.index("block_5_expand_BN") < names.index("block_5_depthwise_BN") \
        < names.index("block_5_project_BN")


def test_scan_json_lists_config_order(capsys):
    from bnexporter.scan_cli import main
    main(["--json", "--bn-only", str(FIXTURES / "keras" / "mnv2_s450_inj.keras")])
    doc = json.loads(capsys.readouterr().out)
    names = [layer["name"] for layer in doc["checkpoints"][0]["bn_layers"]]
    assert names == _names(str(FIXTURES / "keras" / "mnv2_s450_inj.keras"))


def test_torch_state_dict_keeps_file_order():
    names = _names(str(FIXTURES / "torch" / "mobilenet_ddp.pt"))
    assert names[:3] == ["stem.1", "blocks.0.dw.1", "blocks.0.project.1"]
    idx = [int(n.split(".")[1]) for n in names if n.startswith("blocks.")]
    assert idx == sorted(idx)
