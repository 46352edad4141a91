"""HDF5 layout interpretation: mutated real Keras weight files, analysed in a sandboxed
worker (libhdf5 is C: a malformed file may crash the process, which must be seen as a
failure of that input, not take pytest down)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator

import pytest
from hypothesis import given

from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import IGNORE_KNOWN, known_message
from tests.hostile.sandbox import Sandbox, problems

H5 = fs.h5_seeds()
STATS = os.environ.get("BNEXPORTER_FUZZ_STATS")  # file to append one line per input to
KERAS = fs.keras_seeds()


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox(timeout=10) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def scratch() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bnx-h5fuzz-") as d:
        yield d


def judge(box: Sandbox, path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    verdict = box.analyse(path)
    expect = {"error_file": path, "expect": "either", "reasons": [], "forbid": [],
              "nonfinite": 0, "max_nonfinite": None}
    found = problems(expect, verdict)
    bug = known_message(verdict.get("error") or "") or (
        "B20" if verdict["status"] == "timeout" else None)  # B20: libhdf5 spins in C
    if STATS:  # long runs: one line per input (status, known bug, whether it broke a rule)
        with open(STATS, "a") as fh:
            fh.write(f"{verdict['status']}\t{bug or '-'}\t{int(bool(found))}\t"
                     f"{(verdict.get('error') or '')[-120:]}\n")
    if found and IGNORE_KNOWN and bug:
        return
    tag = f"[known bug {bug}, docs/reliability.md]" if bug else "[NEW]"
    assert not found, (tag, found)


def test_seeds_exist():
    assert H5 and KERAS


@fs.fuzz_settings(120, shrink=False)
@given(fs.mutants(H5))
def test_mutated_weights_h5(box, scratch, mutant):
    judge(box, os.path.join(scratch, "model.weights.h5"), mutant.data)


def _rezip(keras: bytes, inner: bytes) -> bytes:
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(keras)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = inner if info.filename == "model.weights.h5" else src.read(info)
            dst.writestr(info, data)
    return out.getvalue()


@fs.fuzz_settings(60, shrink=False)
@given(fs.mutants(H5[:1], max_edits=4))
def test_mutated_weights_inside_keras(box, scratch, mutant):
    judge(box, os.path.join(scratch, "model.keras"), _rezip(KERAS[0], mutant.data))


@fs.fuzz_settings(60, shrink=False)
@given(fs.mutants(KERAS, max_edits=4))
def test_mutated_keras_archives(box, scratch, mutant):
    judge(box, os.path.join(scratch, "model.keras"), mutant.data)
