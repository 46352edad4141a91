"""The census in the daemon: a sample dropped beside the checkpoints decides the verdicts,
every N-th checkpoint only when configured, and it shows in the metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.daemon import DaemonProcess

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _cfg(folder: Path, every: int) -> dict:
    return {"listen": "127.0.0.1:0", "log_level": "debug", "poll_interval": 0.3,
            "settle_seconds": 0.3, "analysis_timeout": 120, "census": {"every": every},
            "models": [{"name": "mnv2", "path": str(folder)}]}


def test_sample_beside_checkpoints_decides_and_every_nth_is_honoured(tmp_path: Path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(FIX / "census" / "mnv2_s150.h5.inputs.npy", folder / "bnexporter-census.npy")
    d = DaemonProcess(tmp_path, _cfg(folder, every=2)).start()
    try:
        shutil.copy(FIX / "keras" / "mnv2_s150.h5", folder / "ckpt-150.h5")
        s = d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="mnv2") == 150,
                       "first checkpoint", timeout=90)
        assert s.get("bnexporter_model_census_layers", model="mnv2") == 52  # 1st: census
        assert s.get("bnexporter_model_estimate_disagreement_channels", model="mnv2") > 0
        shutil.copy(FIX / "keras" / "mnv2_s150.h5", folder / "ckpt-151.h5")
        s = d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="mnv2") == 151,
                       "second checkpoint", timeout=90)
        assert s.get("bnexporter_model_census_layers", model="mnv2") == 0  # 2nd: skipped
    finally:
        assert d.stop() == 0, d.log()


def test_distilled_census_starts_each_checkpoint_from_the_last_ones_inputs(tmp_path: Path):
    import json

    folder, cache = tmp_path / "run", tmp_path / "cache"
    folder.mkdir()
    cfg = _cfg(folder, every=1)
    cfg["census"] = {"distill": True, "seconds": 6, "cache": str(cache)}
    d = DaemonProcess(tmp_path, cfg).start()

    def notes() -> list[str]:
        doc = json.loads(d.text("/api/v1/models")[1])
        return [n for n in doc["models"][0]["notes"] if n.startswith("distilled census:")]

    try:
        shutil.copy(FIX / "keras" / "k3_small.keras", folder / "ckpt-1.keras")
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="mnv2") == 1,
                   "first checkpoint", timeout=90)
        # whether 6 s finish the distillation depends on the machine; a budget that ends
        # it leaves the estimate in charge, and either way the inputs are kept
        assert any("(cold)" in n for n in notes()), notes()
        kept = list(cache.iterdir())
        assert len(kept) == 1 and kept[0].suffix == ".npz"
        assert cache.stat().st_mode & 0o777 == 0o700
        shutil.copy(FIX / "keras" / "k3_small.keras", folder / "ckpt-2.keras")
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="mnv2") == 2,
                   "second checkpoint", timeout=90)
        assert any("(warm)" in n for n in notes()), notes()
    finally:
        assert d.stop() == 0, d.log()
