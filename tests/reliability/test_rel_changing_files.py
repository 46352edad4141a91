"""Checkpoints truncated or rewritten while the daemon reads them.

The readers use ``os.pread`` (never mmap: a mapped file that shrinks raises
SIGBUS and would kill the whole daemon with ``isolation: thread``), and the
planner throws away whatever an analysis made of a file whose size or mtime
changed meanwhile, so no mixture of two versions is ever exported and no error
is counted for a file that was simply still moving.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
from rel_support import RELU_RULE, base_config, bn_tensors, safetensors_bytes

from bnexporter.daemon.web.collector import has_finding
from bnexporter.scan import analyse_path
from tests.support.daemon import ROOT, DaemonProcess

FIX = ROOT / "tests" / "fixtures"
# (model, file name, version 1, version 2): two real checkpoints of each format
PAIRS = [
    ("h5", "model.h5", FIX / "keras" / "k2_resnet_s400.h5", FIX / "keras" /
     "k2_resnet_s400_inj.h5"),
    ("keras", "model.keras", FIX / "keras" / "k3_small.keras", FIX / "keras" /
     "k3_small_inj.keras"),
    ("torch", "model.pt", FIX / "torch" / "resnet_sd.pt", FIX / "torch" / "resnet_fp16.pt"),
    ("st", "model.safetensors", None, None),
]


def _st(dead: int) -> bytes:
    return safetensors_bytes(bn_tensors([f"layer{i}.bn" for i in range(12)], 16, dead=dead))


def _versions(tmp: Path) -> dict[str, tuple[bytes, bytes]]:
    out = {}
    for model, _, v1, v2 in PAIRS:
        out[model] = (_st(2), _st(5)) if v1 is None else (v1.read_bytes(), v2.read_bytes())
    return out


def _expect(d: DaemonProcess, model: str, data: bytes, scratch: Path) -> None:
    ref_path = scratch / f"ref-{model}{Path(dict((m, f) for m, f, _, _ in PAIRS)[model]).suffix}"
    ref_path.write_bytes(data)
    ref = analyse_path(str(ref_path))
    assert ref.ok, ref.error

    def matches(s) -> bool:  # type: ignore[no-untyped-def]
        if s.get("bnexporter_model_dead_channels", model=model) != ref.summary.dead:
            return False
        return all(s.get("bnexporter_layer_dead_channels", model=model, layer=x.name)
                   in (len(x.dead), None if not has_finding(x) else -1)  # {model}: findings
                   for x in ref.bn_layers)

    d.wait_for(matches, f"{model}: metrics of the final version", timeout=20)


_DONE = r"model big: (analysed|\S+ changed while being analysed)"


def _analysing(d: DaemonProcess, model: str) -> int:
    return len(re.findall(rf"model {model}: analysing ", d.log()))


def _wait_analysing(d: DaemonProcess, counts: dict[str, int]) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if all(_analysing(d, m) > n for m, n in counts.items()):
            return
        time.sleep(0.02)
    raise AssertionError(f"analyses did not start: {counts}\n{d.log()}")


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_truncated_or_rewritten_after_the_check_every_format(tmp_path: Path, isolation: str):
    """The test delay holds each analysis between its completeness check and its
    reads; the file is truncated (then rewritten) in that window."""
    versions = _versions(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    models = []
    for model, _name, _, _ in PAIRS:
        (tmp_path / model).mkdir()
        models.append({"name": model, "path": str(tmp_path / model)})
    cfg = base_config(workers=4, isolation=isolation, models=models)
    d = DaemonProcess(tmp_path, cfg, env={"BNEXPORTER_TEST_HOOKS": "1",
                                   "BNEXPORTER_TEST_ANALYSIS_DELAY": "1.5"}).start()
    paths = {m: tmp_path / m / name for m, name, _, _ in PAIRS}
    try:
        # 1. truncated to half while held: a failure that proves nothing, not an error
        counts = {m: _analysing(d, m) for m in paths}
        for m, p in paths.items():
            p.write_bytes(versions[m][0])
        _wait_analysing(d, counts)
        time.sleep(0.4)
        for m, p in paths.items():
            os.truncate(p, len(versions[m][0]) // 2)
        d.wait_log(r"changed while being analysed \(", count=len(paths))
        # 2. rewritten in place with version 2 while held: read whole, but discarded
        counts = {m: _analysing(d, m) for m in paths}
        for m, p in paths.items():
            p.write_bytes(versions[m][0])
        _wait_analysing(d, counts)
        time.sleep(0.4)
        for m, p in paths.items():
            with open(p, "r+b") as fh:
                fh.truncate(0)
                fh.write(versions[m][1])
        d.wait_log(r"changed while being analysed; result discarded", count=len(paths))
        for m in paths:
            _expect(d, m, versions[m][1], scratch)
        s = d.scrape()
        assert sum(v for (n, _), v in s.samples.items() if n == "bnexporter_errors_total") == 0
        assert s.get("bnexporter_analyses_total", outcome="error") == 0
        assert all(s.get("bnexporter_model_up", model=m) == 1 for m in paths)
        assert d.alive()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


def test_truncated_and_rewritten_mid_read_in_process(tmp_path: Path):
    """``isolation: thread``: the readers run inside the daemon process itself, so a
    memory-mapped read of a shrinking file would kill it with SIGBUS. A ~1 s
    analysis of 12k small tensors is truncated or overwritten at random moments."""
    folder = tmp_path / "big"
    folder.mkdir()
    path = folder / "model.safetensors"
    layers = [f"layer{i}.bn" for i in range(3000)]
    cfg = base_config(workers=1, isolation="thread", settle_seconds=0.2,
                      models=[{"name": "big", "path": str(folder)}], **RELU_RULE)
    d = DaemonProcess(tmp_path, cfg).start()
    rng = random.Random(7)
    try:
        for cycle in range(6):
            data = safetensors_bytes(bn_tensors(layers, 32, dead=1 + cycle % 3, seed=cycle))
            counts = {"big": _analysing(d, "big")}
            path.write_bytes(data)
            _wait_analysing(d, counts)
            time.sleep(rng.uniform(0.1, 0.5))
            if cycle % 2 == 0:
                os.truncate(path, rng.randrange(len(data) // 4, len(data)))
            else:  # same size, other bytes: a reader that mixed versions would be wrong
                with open(path, "r+b") as fh:
                    fh.seek(len(data) // 2)
                    fh.write(os.urandom(len(data) // 4))
            done = len(re.findall(_DONE, d.log()))
            end = time.monotonic() + 10
            while len(re.findall(_DONE, d.log())) == done and time.monotonic() < end:
                time.sleep(0.05)  # this analysis has ended, one way or the other
            assert d.alive(), d.log()
        outcomes = re.findall(r"model big: .* changed while being analysed(; result "
                              r"discarded| \(\w+\))", d.log())
        assert len(outcomes) >= 4, f"only {outcomes} of 6 changes landed mid-analysis"
        assert "; result discarded" in outcomes  # an overwrite read through: not exported
        assert " (truncated)" in outcomes
        final = safetensors_bytes(bn_tensors(layers, 32, dead=4, seed=99))
        path.write_bytes(final)
        s = d.wait_for(lambda s: s.get("bnexporter_model_dead_channels", model="big")
                       == 4 * len(layers), "the final version exported", timeout=20)
        assert s.get("bnexporter_model_checkpoint_timestamp_seconds", model="big") == \
            pytest.approx(path.stat().st_mtime)
        assert sum(v for (n, _), v in s.samples.items() if n == "bnexporter_errors_total") == 0
        assert d.alive()
    finally:
        rc = d.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert rc == 0, d.log()
