"""Shipped configurations are accepted by the daemon's own validator, on the agreed port."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_support import DEFAULT_PORT, DEPLOY

from bnexporter.daemon import config as daemon_config
from bnexporter.daemon.validate import Overrides, load_config

K8S = DEPLOY / "kubernetes"


def _configmaps() -> list[tuple[str, str]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc["kind"] == "ConfigMap" and "config.yaml" in doc["data"]:
                out.append((str(path.relative_to(DEPLOY)), doc["data"]["config.yaml"]))
    return out


SHIPPED = [("config/config.yaml", (DEPLOY / "config" / "config.yaml").read_text()),
           *_configmaps()]


def test_deploy_port_is_the_daemon_default():
    assert DEFAULT_PORT == daemon_config.DEFAULT_PORT


@pytest.mark.parametrize(("name", "text"), SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_config_is_valid(name, text, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    # the folders exist only inside the container / on the host: skip the path checks
    cfg = load_config(str(path), check_paths=False)
    assert cfg.listen == f"0.0.0.0:{DEFAULT_PORT}"
    assert cfg.models and all(Path(m.path).is_absolute() for m in cfg.models)
    if "central" in name:
        assert cfg.watch == "poll"
        assert [m.template for m in cfg.models] == [True]
        sharded = load_config(str(path), Overrides(shard="1/2"), check_paths=False)
        assert sharded.shard == (1, 2)

