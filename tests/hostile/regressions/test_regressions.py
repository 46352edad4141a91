"""Minimal reproductions of the reader bugs found by the hostile corpus and the fuzzers.

One test per bug, named after its id in docs/reliability.md ("Bugs found"), with
the smallest input that shows it. A test here that FAILS is a bug that is not
fixed yet: they are deliberately not marked xfail, so fixing the bug turns the
test green. Inputs that can hang or exhaust memory run in the sandboxed worker
(tests/hostile/sandbox.py); the rest call the reader directly.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats.sniff import open_reader
from bnexporter.scan import analyse_path
from tests.hostile import builders as b
from tests.hostile.sandbox import Sandbox

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
HANG = 3.0


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox(timeout=HANG) as sandbox:
        yield sandbox


def refused_cleanly(path: str | Path) -> CheckpointError:
    """open_reader + reading every tensor must end in a deliberate CheckpointError."""
    try:
        with open_reader(str(path)) as reader:
            for info in reader.tensors():
                reader.read(info.name)
    except CheckpointError as exc:
        assert " reader failed: " not in str(exc), str(exc)
        assert "\n" not in str(exc)
        return exc
    raise AssertionError(f"{path} was accepted")


def clean_report(path: str | Path) -> object:
    report = analyse_path(str(path))
    if report.error:
        assert " reader failed: " not in report.error, report.error
        assert "MemoryError" not in report.error, report.error
        assert "\n" not in report.error
    return report


def _k3_bn(f: h5py.File) -> h5py.Group:
    g = f.create_group("layers/batch_normalization/vars")
    for i in range(4):
        g.create_dataset(str(i), data=np.full(4, 1.0 + i, "f4"))
    return g


# -- B1 --------------------------------------------------------------------------------

def test_b1_fifo_is_refused_not_waited_on(tmp_path: Path, box: Sandbox) -> None:
    """B1: open() of a FIFO blocks until a writer appears (detect.py, RangeFile,
    tf_bundle.newest_prefix). Fix: refuse anything that is not a regular file
    (os.stat + stat.S_ISREG) before opening, or open with O_NONBLOCK and check fstat."""
    for name in ("model.pt", "ckpt.index"):
        os.mkfifo(tmp_path / name)
        verdict = box.analyse(str(tmp_path / name))
        assert verdict["status"] == "error", (name, verdict)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt"\n')
    verdict = box.analyse(str(tmp_path))  # the state file names the FIFO index
    assert verdict["status"] == "error", verdict


# -- B2 --------------------------------------------------------------------------------

def test_b2_hdf5_data_outside_the_file_is_not_read(tmp_path: Path) -> None:
    """B2: HDF5 external links, external raw storage and virtual datasets make the
    reader open other files (a FIFO there hangs it; a file outside the watched root
    is read and analysed). Fix in hdf5_keras: walk links with getlink=True and skip
    ExternalLink; refuse datasets with ds.external or ds.is_virtual."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(64, np.nan, "<f4").tobytes())
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        g = _k3_bn(f)
        g.create_dataset("4", shape=(64,), dtype="<f4", external=[(str(secret), 0, 256)])
    report = clean_report(path)
    assert report.error or report.summary.nonfinite == 0


def test_b2_dangling_soft_link_is_a_clean_error(tmp_path: Path) -> None:
    """B2: a dangling soft link raises KeyError from h5py ("keras-h5 reader failed")."""
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        _k3_bn(f)
        f["layers/batch_normalization/vars/4"] = h5py.SoftLink("/nowhere")
    clean_report(path)


# -- B3, B4 (safetensors) --------------------------------------------------------------

def test_b3_safetensors_non_string_dtype(tmp_path: Path) -> None:
    """B3: ``{"dtype": []}`` -> TypeError: unhashable type ('code in _SUBBYTE').
    Fix (safetensors.py, before ``if code in _SUBBYTE``):
    ``if not isinstance(code, str): raise self.error(f"tensor {name!r}: dtype {code!r}
    is not a string")``."""
    header = json.dumps({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(b.safetensors_raw(header, bytes(4)))
    refused_cleanly(path)


def test_b4_safetensors_huge_step_metadata(tmp_path: Path) -> None:
    """B4: ``__metadata__.step`` of 5000 digits -> ValueError from int() (Python's
    4300-digit limit). Fix (safetensors.py): ``if step is not None and
    step.strip().isdigit() and len(step.strip()) <= 18:``."""
    header = json.dumps({"__metadata__": {"step": "9" * 5000},
                         "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(b.safetensors_raw(header, bytes(4)))
    with open_reader(str(path)) as reader:
        assert reader.meta.step is None


# -- B5 (analysis) -----------------------------------------------------------------------

def test_b5_empty_kernel_with_a_huge_dimension(tmp_path: Path, box: Sandbox) -> None:
    """B5: a 0-element kernel of shape (2**40, 0, 3, 3) makes TensorScan allocate
    np.zeros(2**40) per-filter sums (MemoryError). Fix (analysis.py TensorScan):
    no per-filter statistics when ``self.size == 0``."""
    header = json.dumps({"conv.weight": {"dtype": "F32", "shape": [1 << 40, 0, 3, 3],
                                         "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(b.safetensors_raw(header, b""))
    verdict = box.analyse(str(path))
    assert verdict["status"] == "ok", verdict
    # with a dimension of 2**63-1, numpy refuses the allocation with a ValueError instead,
    # which escapes analyse_path as a traceback (found by test_fuzz_npz_zip)
    header = json.dumps({"conv.weight": {"dtype": "F32", "shape": [(1 << 63) - 1, 0, 3, 3],
                                         "data_offsets": [0, 0]}}).encode()
    path.write_bytes(b.safetensors_raw(header, b""))
    verdict = box.analyse(str(path))
    assert verdict["status"] == "ok", verdict


# -- B6 (npz) ------------------------------------------------------------------------------

def _npz(tmp_path: Path, member: bytes) -> Path:
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.npy", member)
    return path


def test_b6_npz_shape_larger_than_data(tmp_path: Path) -> None:
    """B6: the .npy header is trusted: shape (1000,) over 16 bytes -> ValueError from
    numpy's read_array escapes analyse_path as a traceback; shape (2**40,) allocates
    4 TB; shape (-4,) is accepted; version (9, 0) -> ValueError. Fix (npz.py):
    validate non-negative dims, version in {(1,0),(2,0),(3,0)}, and
    prod(shape) * itemsize <= member size - header size in _header; wrap _load in
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)."""
    path = _npz(tmp_path, b.npy_bytes("<f4", "(1000,)", bytes(16)))
    refused_cleanly(path)


def test_b6_npz_shape_huge(tmp_path: Path, box: Sandbox) -> None:
    path = _npz(tmp_path, b.npy_bytes("<f4", "(1099511627776,)", bytes(16)))
    verdict = box.analyse(str(path))
    assert verdict["status"] == "error" and "MemoryError" not in verdict["error"], verdict


def test_b6_npz_negative_shape_and_bad_version(tmp_path: Path) -> None:
    refused_cleanly(_npz(tmp_path, b.npy_bytes("<f4", "(-4,)", bytes(16))))
    refused_cleanly(_npz(tmp_path, b.npy_bytes("<f4", "(4,)", bytes(16), version=(9, 0))))


def test_b6_npz_corrupt_deflate_member(tmp_path: Path) -> None:
    """B6: zip member errors (zlib.error, BadZipFile for a bad CRC) escape NpzReader."""
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.arange(100, dtype=np.float32))
    data = bytearray(buf.getvalue())
    data[60:64] = b"\xff\xff\xff\xff"  # inside the deflate stream of a.npy
    path = tmp_path / "x.npz"
    path.write_bytes(bytes(data))
    clean_report(path)
    refused_cleanly(path)


def test_b6_npz_member_needing_a_newer_zip_version(tmp_path: Path) -> None:
    """B6 (left after 424ffe4, minor): a central-directory entry whose "version needed
    to extract" is 7.5 makes zipfile raise NotImplementedError, which NpzReader does
    not catch (found by test_fuzz_npz_zip). Through open_reader, detect.py catches it
    first, so only a direct NpzReader call sees it. Fix (npz.py): add
    NotImplementedError and RuntimeError to the zip errors turned into CheckpointError."""
    from bnexporter.formats.npz import NpzReader

    path = _npz(tmp_path, b.npy_bytes("<f4", "(4,)", bytes(16)))
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, at + 6, 75)  # version needed to extract: 7.5
    path.write_bytes(bytes(data))
    refused_cleanly(path)
    with pytest.raises(CheckpointError):
        NpzReader(str(path))


# -- B7 (Keras config) ------------------------------------------------------------------

def test_b7_model_config_that_is_not_an_object(tmp_path: Path) -> None:
    """B7: model_config / config.json that is valid JSON but a list -> AttributeError
    in keras_graph (traceback out of analyse_path). Fix: hdf5_keras and keras_zip keep
    the config only ``if isinstance(config, dict)`` (else a note)."""
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["model_config"] = "[1, 2, 3]"
        f.attrs["layer_names"] = [b"bn"]
        g = f.create_group("bn")
        g.attrs["weight_names"] = [b"bn/gamma:0"]
        g.create_dataset("bn/gamma:0", data=np.ones(4, "f4"))
    clean_report(path)


# -- B8, B9 (.keras) --------------------------------------------------------------------------

def _rezip(src: Path, dst: Path, member: str, compress: int) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info),
                          compress if info.filename == member else zipfile.ZIP_STORED)


def test_b8_deflated_weights_member_is_read(tmp_path: Path) -> None:
    """B8: a .keras whose model.weights.h5 is deflated is refused with "member extends
    past end of file": KerasH5Reader opens RangeFile(path, 0, member_size) although
    direct_io is False. Fix (hdf5_keras.py): create the RangeFile only when direct_io."""
    dst = tmp_path / "model.keras"
    _rezip(FIXTURES / "keras" / "k3_small.keras", dst, "model.weights.h5",
           zipfile.ZIP_DEFLATED)
    report = analyse_path(str(dst))
    assert report.error is None, report.error
    assert report.bn_layers


def test_b9_keras_inflation_is_bounded_by_the_declared_size(tmp_path: Path,
                                                             box: Sandbox) -> None:
    """B9: zipfile inflates a member's whole deflate stream whatever its declared size:
    a 250 KB .keras declaring a 4 KB model.weights.h5 inflates 256 MB (MemoryError or
    "keras reader failed: BadZipFile"). Fix (keras_zip.py): read with
    ``zf.open(member).read(member.file_size + 1)`` (max_length-bounded), check the
    length, and map BadZipFile / zlib.error / OSError to CheckpointError; same for
    config.json."""
    bomb, crc = b.deflate_zeros(256 << 20)
    members = [b.ZipMember("metadata.json", b"{}"), b.ZipMember("config.json", b"{}"),
               b.ZipMember("model.weights.h5", bomb, method=8, file_size=4096, crc=crc)]
    path = tmp_path / "model.keras"
    path.write_bytes(b.zip_bytes(members))
    with Sandbox(timeout=HANG) as fresh:
        # the worker's own peak on a real .keras first: the bug adds 256 MB on top of it
        baseline = fresh.analyse(str(FIXTURES / "keras" / "k3_small.keras"))["maxrss_kb"]
        verdict = fresh.analyse(str(path), timeout=10)
    assert verdict["status"] == "error", verdict
    assert " reader failed: " not in verdict["error"], verdict["error"]
    assert "MemoryError" not in verdict["error"], verdict["error"]
    assert verdict["maxrss_kb"] - baseline < 100_000, (baseline, verdict["maxrss_kb"])


# -- B10 ----------------------------------------------------------------------------------------

def test_b10_corrupt_superblock_is_not_called_locked(tmp_path: Path) -> None:
    """B10: ``locked = "lock" in msg`` matches "bad superblock version number", so a
    corrupt file is reported as "locked by its writer" (reason incomplete, retryable:
    retried forever). Fix (hdf5_keras.py): ``"unable to lock file" in msg.lower()``."""
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes([7]) + bytes(200))
    exc = refused_cleanly(path)
    assert "locked" not in exc.cause and not exc.retryable, str(exc)


# -- B12, B15, B16, B17 (work out of proportion to the file) -------------------------------------

def test_b12_tf_entries_aliasing_one_range(tmp_path: Path, box: Sandbox) -> None:
    """B12: 5000 TF index entries naming the same 4 MB of the shard make the analysis
    scan 20 GB. Fix (tf_bundle.py): refuse overlapping (shard, offset, size) ranges, or
    scan each distinct range once. (The torch readers already refuse aliasing.)"""
    arr = np.ones(1 << 20, "f4")
    entries = [(b"k%05d" % i, b.tf_entry(1, (1 << 20,), 0, 4 << 20)) for i in range(5_000)]
    b.tf_bundle(str(tmp_path / "ckpt"), [b.TFTensor("big", arr)], entries=entries)
    verdict = box.analyse(str(tmp_path / "ckpt.index"), timeout=8)
    assert verdict["status"] in ("ok", "error"), verdict


def test_b12_hdf5_hard_links_to_one_dataset(tmp_path: Path, box: Sandbox) -> None:
    """B12: 20 000 hard links to one 4 MB dataset: 80 GB of scanning. Fix (hdf5_keras):
    remember each dataset's object address (h5py.h5o.get_info(ds.id).addr) and refuse
    or skip the repeats; the same set breaks hard-link cycles (now a RecursionError)."""
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        _k3_bn(f)
        g = f.create_group("layers/big/vars")
        ds = g.create_dataset("0", data=np.ones(1 << 20, "f4"))
        for i in range(1, 20_000):
            g[str(i)] = ds
    verdict = box.analyse(str(path), timeout=8)
    assert verdict["status"] in ("ok", "error"), verdict


def test_b15_tf_object_graph_chain(tmp_path: Path, box: Sandbox) -> None:
    """B15: tf_bundle._paths copies the whole path tuple for every node: a 600 KB object
    graph that is a 50 000-node chain needs O(n^2) memory (MemoryError after ~6 s).
    Fix: keep parent links and build a name only for nodes that carry variables, or
    refuse graphs deeper than a few hundred levels."""
    from tests.hostile.make_corpus import _graph_chain, _tf_with_graph

    verdict = box.analyse(str(_tf_with_graph(tmp_path, _graph_chain(50_000))), timeout=8)
    assert verdict["status"] in ("ok", "error"), verdict
    assert "MemoryError" not in (verdict.get("error") or ""), verdict


def test_b16_tf_sliced_tensor_reads_a_row_at_a_time(tmp_path: Path, box: Sandbox) -> None:
    """B16: TFBundleReader._read_sliced allocated whole rows of the full tensor for each
    chunk: a (1, 2**28) float32 tensor saved in two column slices allocated 1 GB per
    16 MB chunk. Fix: assemble only the elements [start, stop)."""
    from tests.hostile.make_corpus import _tf_sliced_wide

    verdict = box.analyse(str(_tf_sliced_wide(tmp_path)), timeout=20)
    assert verdict["status"] in ("ok", "error"), verdict
    assert "MemoryError" not in (verdict.get("error") or ""), verdict


def test_b17_hdf5_inflation_limit(tmp_path: Path, box: Sandbox) -> None:
    """B17: _MAX_INFLATION = 1000 lets a 4 MB gzip-chunked dataset declare 4 GB, which
    is decompressed and scanned in full (about 6 s of CPU on an idle core, more under
    load; refusing takes milliseconds). Keras never compresses weights and real float
    data compresses < 2x. Fix: a limit near 20."""
    from tests.hostile.make_corpus import _h5_builders

    make, _ = _h5_builders()["gzip-inflation-4GB"]
    verdict = box.analyse(str(make(tmp_path)), timeout=4)
    assert verdict["status"] in ("ok", "error"), verdict


# -- B18 ----------------------------------------------------------------------------------------

def test_b18_error_line_escapes_the_file_name(tmp_path: Path) -> None:
    """B18: the error line embeds the raw path: a file called "a\\nERROR fake" makes two
    log lines (and escape codes reach terminals). Fix (errors.py CheckpointError and
    scan.py's "cannot stat" line): show control characters of the path as \\xNN in
    the message (keep ``.path`` raw)."""
    path = tmp_path / "model\nERROR fake: injected.pt"
    path.write_bytes(b"junk")
    report = analyse_path(str(path))
    assert report.error and "\n" not in report.error
    assert not any(ord(c) < 32 for c in report.error)
    # the same name on a dangling link: scan.py's own "cannot stat" line (left after 6c56bf1)
    link = tmp_path / "link\nERROR fake: injected.pt"
    os.symlink("nowhere.pt", link)
    report = analyse_path(str(link))
    assert report.error and "\n" not in report.error, report.error


# -- B19 ----------------------------------------------------------------------------------------

def test_b19_h5py_runtime_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    """B19: h5py raises RuntimeError / KeyError / ValueError (not OSError) for corrupt
    metadata met during the tree walk; they reach open_reader's catch-all ("keras-h5
    reader failed: RuntimeError: Unable to synchronously check link existence ...").
    Fix (hdf5_keras.py): catch (OSError, RuntimeError, KeyError, ValueError, TypeError)
    around _open() and in _read_h5py, raise self.error("corrupt HDF5 metadata: ...")."""
    data = bytearray((FIXTURES / "keras" / "k3_small.weights.h5").read_bytes())
    # found by test_fuzz_hdf5: overwrite the root group's B-tree address region
    struct.pack_into("<Q", data, 136, 0xFFFFFFFFFFFFFF00)
    path = tmp_path / "model.weights.h5"
    path.write_bytes(bytes(data))
    clean_report(path)


# -- B20 ----------------------------------------------------------------------------------------

def test_b20_libhdf5_spin_does_not_freeze_the_caller(tmp_path: Path, box: Sandbox) -> None:
    """B20: 16 bytes of the superblock copied over an attribute message (offset 50 ->
    2385 of k3_small.weights.h5) make libhdf5 2.0.0 spin forever in H5Aread while
    holding the GIL: every thread of the process stops (the metrics server too).
    Not fixable in Python: parse HDF5 in a child process with a hard deadline."""
    data = bytearray((FIXTURES / "keras" / "k3_small.weights.h5").read_bytes())
    data[2385:2401] = data[50:66]
    path = tmp_path / "model.weights.h5"
    path.write_bytes(bytes(data))
    verdict = box.analyse(str(path), timeout=8)
    assert verdict["status"] in ("ok", "error"), verdict
