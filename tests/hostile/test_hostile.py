"""Every hostile file gets one clear error line (or, for NaN/Inf-only files, an
analysis), in a worker process under a memory cap and a time limit, without
running any code the file names.

The corpus is written at test time by make_corpus.py; each case is one test,
named by its case id, so a failure says which file and which rule. Cases that
fail because of a bug already reported are listed in KNOWN_BUGS with the bug's
id in docs/reliability.md: they are left failing on purpose (not xfail), so
the fix shows up as green.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.hostile import make_corpus
from tests.hostile.sandbox import MEMORY_LIMIT, TIME_LIMIT, analyse_many, problems

pytestmark = pytest.mark.slow  # builds and analyses the whole hostile corpus (~25 s)

CASES = make_corpus.plan()
BY_ID = {c.id: c for c in CASES}

# case id prefix -> bug id in docs/reliability.md ("Bugs found")
KNOWN_BUGS = {
    "special/fifo-": "B1", "tf/shard-is-fifo": "B1",
    "tf/state-file-points-at-fifo": "B1", "tf/state-file-is-fifo": "B1",
    "h5/external-": "B2", "h5/virtual-dataset-": "B2", "h5/soft-link-dangling": "B2",
    "safetensors/dtype-": "B3", "safetensors/metadata-step-huge": "B4",
    "safetensors/kernel-huge": "B5",
    "npz/shape-": "B6", "npz/header-version-9": "B6",
    "h5/k2-model-config-list": "B7", "keras/config-is-list": "B7",
    "keras/weights-deflated": "B8", "keras/weights-deflate-bomb-declared-small": "B9",
    "any/magic-hdf5-": "B10",
    "torch-zip/stride-zero": "B11", "torch-legacy/stride-zero": "B11",
    "torch-zip/alias-amplification": "B12", "tf/duplicate-extents-alias": "B12",
    "h5/hard-link-amplification": "B12",
    "torch-zip/path-amplification": "B13", "torch-zip/opcode-flood": "B14",
    "tf/graph-chain-50k": "B15", "tf/sliced-wide": "B16", "h5/gzip-inflation": "B17",
    "h5/libhdf5-spins": "B20",
    "special/newline-in-name": "B18", "special/escape-codes-in-name": "B18",
    "tf/state-file-binary": "B18",
}


def known_bug(case_id: str) -> str | None:
    return next((bug for prefix, bug in KNOWN_BUGS.items() if case_id.startswith(prefix)),
                None)


@pytest.fixture(scope="session")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[dict, dict]]]:
    out = tmp_path_factory.mktemp("hostile")
    try:
        manifest = make_corpus.build(out, CASES)
        results = analyse_many((m["id"], m["path"], m["marker"], m["timeout"])
                               for m in manifest)
        markers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                   if f == make_corpus.MARKER]
        yield {m["id"]: (m, results[m["id"]]) for m in manifest} | {
            "__markers__": ({}, {"found": markers})}
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_hostile_input(verdicts: dict, case_id: str) -> None:
    m, r = verdicts[case_id]
    found = problems(m, r)
    if found:
        bug = known_bug(case_id)
        tag = f"[known bug {bug}, docs/reliability.md] " if bug else "[NEW] "
        rebuild = (f"rebuild: python tests/hostile/make_corpus.py OUT; "
                   f"bnexporter scan OUT/{BY_ID[case_id].folder}/{os.path.basename(m['path'])}")
        pytest.fail(tag + case_id + ":\n  - " + "\n  - ".join(found) + "\n  " + rebuild,
                    pytrace=False)


def test_no_marker_file_anywhere(verdicts: dict) -> None:
    assert verdicts["__markers__"][1]["found"] == []


def test_corpus_covers_every_format() -> None:
    counts = Counter(c.fmt for c in CASES)
    for fmt, least in {"any": 40, "safetensors": 40, "npz": 25, "torch": 90,
                       "torch-legacy": 40, "keras-h5": 60, "keras": 40, "tf": 100}.items():
        assert counts[fmt] >= least, (fmt, counts[fmt])
    evil = {c.id.split("evil-", 1)[1] for c in CASES if "/evil-" in c.id}
    assert {"os.system-REDUCE", "builtins.eval-STACK_GLOBAL", "os.system-INST",
            "os.system-OBJ", "subprocess.Popen-NEWOBJ", "BUILD-setstate-gadget"} <= evil
    assert sum(c.expect == "ok" and c.nonfinite > 0 for c in CASES) >= 10


def test_real_fixtures_fit_the_limits() -> None:
    """Every committed real checkpoint is analysed inside the same caps, so the caps
    measure hostile behaviour, not the normal cost of a reader."""
    fixtures = make_corpus.FIXTURES
    paths = sorted(str(p) for p in fixtures.glob("keras/*") if p.suffix in (".h5", ".keras"))
    paths += sorted(str(p) for p in fixtures.glob("tf/*/*.index"))
    paths += sorted(str(p) for p in fixtures.glob("torch/*") if p.suffix in (".pt", ".ckpt")
                    and not p.name.startswith("torchscript"))
    results = analyse_many((p, p, None, None) for p in paths)
    bad = {p: r for p, r in results.items() if r["status"] != "ok"}
    assert not bad
    assert all(r["seconds"] < TIME_LIMIT / 4 for r in results.values())
    # peak resident memory of the workers stays far below the cap
    assert max(r["maxrss_kb"] for r in results.values()) * 1024 < MEMORY_LIMIT / 2


def test_every_worker_ran_under_the_limits(verdicts: dict) -> None:
    """The caps are real: each worker reports its own address-space limit."""
    limits = {r.get("rlimit_as") for k, (_, r) in verdicts.items()
              if k != "__markers__" and r["status"] not in ("timeout", "crash")}
    assert limits == {MEMORY_LIMIT}
    assert 0 < TIME_LIMIT <= 30
