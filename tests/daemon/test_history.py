"""The daemon's per-model history: since when, newly dead, came back, bounded memory."""

from __future__ import annotations

from bnexporter.daemon.history import LIMIT, History, rate_per_1000_steps
from bnexporter.report import CheckpointReport, LayerReport, Summary


def _report(step: int, dead: dict[str, list[int]], mtime: float | None = None,
            channels: int = 100) -> CheckpointReport:
    layers = [LayerReport(name, channels, 1e-3, "config", "relu", "config", {"dead": ix})
              for name, ix in dead.items()]
    return CheckpointReport(f"/r/ckpt-{step}.h5", "keras2-h5", step, None,
                            Summary.build(layers, [], 0), layers,
                            mtime=float(step) if mtime is None else mtime)


def test_since_newly_dead_and_revived():
    h = History()
    h = h.add(_report(100, {"a": [], "b": [1]}), 1.0)
    assert h.change("a").since is None and h.newly_dead == 0  # nothing to compare with
    assert h.change("b").since == 100 and not h.change("b").since_exact  # was already dead
    h = h.add(_report(200, {"a": [3, 4], "b": [1, 2]}), 2.0)
    assert h.change("a").since == 200 and h.change("a").since_exact
    assert h.change("a").newly_dead == (3, 4) and h.change("b").newly_dead == (2,)
    assert h.newly_dead == 3
    h = h.add(_report(300, {"a": [4], "b": [1, 2]}), 3.0)
    assert h.change("a").since == 200 and h.change("a").revived == (3,)
    assert h.newly_dead == 0 and h.revived == 1
    h = h.add(_report(400, {"a": [], "b": [1, 2]}), 4.0)
    assert h.change("a").since is None  # the run of dead channels ended
    assert [p.step for p in h.points] == [100, 200, 300, 400]
    assert h.points[-1].dead == {"a": 0, "b": 2}
    assert rate_per_1000_steps(h, "b") == 1000 * (2 - 1) / 300


def test_same_checkpoint_again_replaces_its_point():
    h = History().add(_report(100, {"a": []}), 1.0).add(_report(200, {"a": [1]}), 2.0)
    again = h.add(_report(200, {"a": [1]}), 3.0)
    assert [p.step for p in again.points] == [100, 200]
    assert again.change("a").newly_dead == (1,)  # still measured against step 100


def test_restarted_run_starts_a_new_history():
    h = History().add(_report(500, {"a": [1]}), 1.0).add(_report(600, {"a": [1]}), 2.0)
    h = h.add(_report(100, {"a": []}), 3.0)
    assert [p.step for p in h.points] == [100] and h.restarted


def test_bounded_and_compact():
    h = History()
    for i in range(LIMIT + 30):
        h = h.add(_report(i * 10, {f"l{j}": list(range(i % 7)) for j in range(150)}), i)
    assert len(h.points) == LIMIT
    assert h.points[0].step == 300
    assert all(p.layers is h.points[-1].layers for p in h.points)  # one shared name tuple
    assert len(h.points[-1].counts) == 150 * 2 * 2  # two uint16 counts per layer


def test_wide_layers_use_32_bit_counts():
    h = History().add(_report(1, {"a": list(range(70000))}, channels=80000), 1.0)
    assert h.points[0].wide and h.points[0].dead == {"a": 70000}
