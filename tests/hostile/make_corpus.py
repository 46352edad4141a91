"""Write the hostile-input corpus: files no checkpoint reader should trust.

    python tests/hostile/make_corpus.py OUTDIR          # writes OUTDIR/<case>/..., manifest.json
    python tests/hostile/make_corpus.py --list          # case ids, one per line

The corpus is generated at test time (tests/hostile/test_hostile.py) and never
committed. Every case says what a correct reader must do with it: ``error``
(one line naming the file and the cause), ``ok`` (analysed; NaN/Inf-only
tensors are counted, not refused) or ``either`` (a clean error or an analysis,
but never a traceback, hang, crash, executed code or unbounded memory).
Cases are derived from real fixtures (truncations, in-place corruption) where
the committed fixtures allow, and written from the format layouts otherwise
(tests/hostile/builders.py). Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.hostile import builders as b  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MARKER = "PWNED"
# a FIFO, a device or a link to one must be refused at once, not waited on
HANG = 3.0
# a file whose declared work is absurd must be refused from its metadata, quickly
BOMB = 8.0
Make = Callable[[Path], Path]


@dataclass
class Case:
    id: str
    fmt: str
    make: Make
    expect: str = "error"            # error | ok | either
    reasons: tuple[str, ...] = ()    # allowed error_reason values (empty: any)
    nonfinite: int = 0               # for expect=ok: at least this many non-finite values
    error_file: str | None = None    # name (in the case folder) the error must start with
    timeout: float | None = None     # seconds a correct reader needs at most (default: global)
    max_nonfinite: int | None = None  # an analysis must not count more (data it must not read)
    forbid: tuple[str, ...] = ()     # words a truthful error message cannot contain

    @property
    def folder(self) -> str:
        return self.id.replace("/", "__")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cuts(size: int, n: int = 20) -> list[int]:
    """``n`` deterministic cut points in (0, size): structure edges plus an even spread."""
    edges = {1, 4, 8, 9, 16, 64, 512, 1024, 2048, size - 1, size - 8, size - 22, size - 48,
             size // 2}
    points = sorted(p for p in edges if 0 < p < size)
    spread = [size * k // (n + 1) for k in range(1, n + 1)]
    for p in spread:
        if len(points) >= n:
            break
        if 0 < p < size and p not in points:
            points.append(p)
    return sorted(points)[:n]


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _marker(d: Path) -> str:
    return str(d / MARKER)


# -- base files -------------------------------------------------------------------------


def st_good(fill: float | None = None) -> bytes:
    return b.safetensors_bytes(b.bn_arrays(fill=fill), metadata={"step": "12"})


def npz_good(compressed: bool = False, fill: float | None = None) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **b.bn_arrays(fill=fill))
    return buf.getvalue()


def torch_zip_good(fill: float | None = None) -> bytes:
    return b.torch_zip_from(b.TorchCheckpoint(b.bn_arrays(fill=fill),
                                              wrap={"key": "state_dict", "global_step": 3}))


def torch_legacy_good(fill: float | None = None) -> bytes:
    return b.torch_legacy_from(b.TorchCheckpoint(b.bn_arrays(fill=fill)))


def _fixture(rel: str) -> Path | None:
    p = FIXTURES / rel
    return p if p.exists() else None


# committed torch fixtures worth mutating: a plain state_dict, the legacy format, a
# pickled nn.Module and a Lightning checkpoint (used when tests/fixtures/torch exists)
REAL_TORCH = ("resnet_sd.pt", "mobilenet_legacy.pt", "mobilenet_module_eps1e-3.pt",
              "resnet_lightning.ckpt")


def _real_torch() -> list[Path]:
    return [p for p in (FIXTURES / "torch" / n for n in REAL_TORCH) if p.is_file()]


def _tf_prefixes() -> list[Path]:
    return sorted(p.with_suffix("") for p in (FIXTURES / "tf").glob("*/*.index"))


def _copy_bundle(prefix: Path, d: Path) -> Path:
    for f in prefix.parent.iterdir():
        if f.name.startswith(prefix.name + ".") and not f.name.endswith((".json", ".npz")):
            shutil.copy(f, d / f.name)
    return d / prefix.name


# -- generic: every format ----------------------------------------------------------------

EXTS = (".safetensors", ".npz", ".h5", ".weights.h5", ".keras", ".pt", ".pth", ".bin",
        ".ckpt", ".index")


def generic_cases() -> list[Case]:
    cases = []
    for ext in EXTS:
        cases.append(Case(f"any/empty{ext}", "any",
                          lambda d, e=ext: _write(d / f"model{e}", b""),
                          reasons=("truncated", "incomplete", "io")))
        for size in (1, 9, 100, 4096, 1 << 16):
            cases.append(Case(f"any/random-{size}{ext}", "any",
                              lambda d, e=ext, s=size: _write(d / f"model{e}",
                                                              _rand(s * 31 + len(e), s))))
    magics = {
        "zip": b"PK\x03\x04", "hdf5": b"\x89HDF\r\n\x1a\n",
        "legacy": bytes.fromhex("80028a0a6cfc9c46f9206aa85019"),
        "safetensors": struct.pack("<Q", 200) + b"{",
        "eocd": b"PK\x05\x06", "hdf5-at-512": bytes(512) + b"\x89HDF\r\n\x1a\n",
    }
    for name, magic in magics.items():
        for size in (0, 64, 4096):
            cases.append(Case(f"any/magic-{name}-then-{size}-random", "any",
                              lambda d, m=magic, s=size: _write(d / "model.bin",
                                                                m + _rand(s + 7, s)),
                              forbid=("locked",)))
    # right bytes, wrong name: detection must go by content
    wrong = {
        "safetensors-as.h5": (st_good, "model.h5"),
        "safetensors-as.pt": (st_good, "model.pt"),
        "npz-as.keras": (npz_good, "model.keras"),
        "torch-zip-as.safetensors": (torch_zip_good, "model.safetensors"),
        "torch-legacy-as.npz": (torch_legacy_good, "model.npz"),
    }
    for name, (make, fname) in wrong.items():
        cases.append(Case(f"any/wrong-ext-{name}", "any",
                          lambda d, m=make, f=fname: _write(d / f, m()), expect="ok"))
    for rel, fname in (("keras/k3_small.keras", "model.pt"),
                       ("keras/k3_small.weights.h5", "model.safetensors"),
                       ("keras/k2_nested.h5", "model.keras")):
        src = _fixture(rel)
        if src is not None:
            cases.append(Case(f"any/wrong-ext-{Path(rel).name}-as-{fname}", "any",
                              lambda d, s=src, f=fname: Path(shutil.copy(s, d / f)),
                              expect="ok"))
    cases += special_file_cases()
    return cases


def _symlink(d: Path, name: str, target: str) -> Path:
    link = d / name
    os.symlink(target, link)
    return link


def _fifo(d: Path, name: str) -> Path:
    path = d / name
    os.mkfifo(path)
    return path


def special_file_cases() -> list[Case]:
    """Symlink loops, FIFOs, devices and directories where a checkpoint should be."""
    def loop(d: Path) -> Path:
        os.symlink("b.pt", d / "a.pt")
        os.symlink("a.pt", d / "b.pt")
        return d / "a.pt"

    def folder(d: Path) -> Path:
        (d / "model.h5").mkdir()
        return d / "model.h5"

    def dir_link(d: Path) -> Path:
        (d / "real").mkdir()
        return _symlink(d, "model.safetensors", "real")

    def index_dir(d: Path) -> Path:
        (d / "ckpt.index").mkdir()
        return d / "ckpt.index"

    def tf_folder_loop(d: Path) -> Path:
        (d / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
        os.symlink("ckpt-1.index", d / "ckpt-1.index")
        return d

    cases = [
        Case("special/symlink-loop", "any", loop),
        Case("special/symlink-self", "any", lambda d: _symlink(d, "model.pt", "model.pt")),
        Case("special/symlink-dangling", "any",
             lambda d: _symlink(d, "model.pt", "does-not-exist.pt")),
        Case("special/symlink-to-dir", "any", dir_link),
        Case("special/directory-named-h5", "any", folder),
        Case("special/directory-named-index", "any", index_dir),
        Case("special/dev-zero.safetensors", "any",
             lambda d: _symlink(d, "model.safetensors", "/dev/zero")),
        Case("special/dev-null.pt", "any", lambda d: _symlink(d, "model.pt", "/dev/null")),
        Case("special/tf-folder-index-symlink-loop", "tf", tf_folder_loop),
        # names are data too: an error line must stay one line whatever the file is called
        Case("special/newline-in-name", "any",
             lambda d: _write(d / "model\nERROR fake: injected.pt", b"junk")),
        Case("special/newline-in-name-dangling-link", "any",
             lambda d: _symlink(d, "model\nERROR fake: injected.pt", "nowhere.pt")),
        Case("special/escape-codes-in-name", "any",
             lambda d: _write(d / "model\x1b[2J\x1b[31m.pt", b"junk")),
        Case("special/non-utf8-name", "any",
             lambda d: _write(Path(os.fsdecode(bytes(d) + b"/model\xff\xfe.pt")), b"junk")),
    ]
    # one FIFO per code path that opens a file: format detection, the TF index (the TF
    # shard and state-file paths are in tf_cases, HDF5 links in h5 cases)
    for name in ("model.pt", "ckpt.index"):
        cases.append(Case(f"special/fifo-{name}", "any", lambda d, n=name: _fifo(d, n),
                          timeout=HANG))
    return cases


# -- safetensors ------------------------------------------------------------------------------


def _st_header(entries: dict, payload: bytes = b"", header_len: int | None = None) -> bytes:
    return b.safetensors_raw(json.dumps(entries).encode(), payload, header_len)


def safetensors_cases() -> list[Case]:
    good = st_good()
    cases = [Case(f"safetensors/truncated-{cut:07d}", "safetensors",
                  lambda d, c=cut: _write(d / "model.safetensors", good[:c]),
                  reasons=("truncated", "incomplete", "unsupported"))
             for cut in _cuts(len(good))]

    def f32(shape: list[int], offs: list[int]) -> dict[str, object]:
        return {"dtype": "F32", "shape": shape, "data_offsets": offs}

    lies: dict[str, Callable[[], bytes]] = {
        "header-len-past-eof": lambda: good[8:].join([struct.pack("<Q", len(good) * 4), b""]),
        "header-len-max-u64": lambda: struct.pack("<Q", (1 << 64) - 1) + good[8:],
        "header-len-over-limit": lambda: struct.pack("<Q", 100_000_001) + good[8:],
        "header-len-zero": lambda: struct.pack("<Q", 0) + good[8:],
        "header-len-one-short": lambda: _st_header(
            {"a": f32([2], [0, 8])}, bytes(8), len(json.dumps({"a": f32([2], [0, 8])})) - 1),
        "header-not-utf8": lambda: b.safetensors_raw(b"{\"\xff\xfe\": 1}", b""),
        "header-not-json": lambda: b.safetensors_raw(b"{not json at all}", b""),
        "header-json-array": lambda: b.safetensors_raw(b"[1,2]", b""),
        "header-nested-100k": lambda: b.safetensors_raw(
            b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        "dtype-list": lambda: _st_header({"a": {"dtype": ["F32"], "shape": [1],
                                                 "data_offsets": [0, 4]}}, bytes(4)),
        "dtype-dict": lambda: _st_header({"a": {"dtype": {"x": 1}, "shape": [1],
                                                 "data_offsets": [0, 4]}}, bytes(4)),
        "dtype-unknown": lambda: _st_header({"a": {"dtype": "F128", "shape": [1],
                                                    "data_offsets": [0, 16]}}, bytes(16)),
        "dtype-subbyte": lambda: _st_header({"a": {"dtype": "F4", "shape": [2],
                                                    "data_offsets": [0, 1]}}, bytes(1)),
        "entry-not-object": lambda: _st_header({"a": [1, 2, 3]}),
        "shape-negative": lambda: _st_header({"a": f32([-1], [0, 4])}, bytes(4)),
        "shape-float": lambda: _st_header({"a": f32([1.5], [0, 4])}, bytes(4)),
        "shape-string": lambda: _st_header({"a": f32("12", [0, 4])}, bytes(4)),
        "shape-33-dims": lambda: _st_header({"a": f32([1] * 33, [0, 4])}, bytes(4)),
        "shape-huge-product": lambda: _st_header({"a": f32([1 << 40, 1 << 40], [0, 4])},
                                                 bytes(4)),
        "shape-huge-but-empty": lambda: _st_header({"a": f32([1 << 62, 0], [0, 0])}),
        "kernel-huge-but-empty": lambda: _st_header(
            {"conv.weight": f32([1 << 40, 0, 3, 3], [0, 0])}),
        "kernel-huge-dim-2^63-empty": lambda: _st_header(
            {"conv.weight": f32([(1 << 63) - 1, 0, 3, 3], [0, 0])}),
        "kernel-wide-empty-keras": lambda: _st_header(
            {"conv/kernel": f32([0, 1 << 40], [0, 0])}),
        "offsets-reversed": lambda: _st_header({"a": f32([1], [4, 0])}, bytes(4)),
        "offsets-negative": lambda: _st_header({"a": f32([1], [-4, 0])}, bytes(4)),
        "offsets-float": lambda: _st_header({"a": f32([1], [0.0, 4.0])}, bytes(4)),
        "offsets-three": lambda: _st_header({"a": f32([1], [0, 4, 8])}, bytes(8)),
        "offsets-huge": lambda: _st_header({"a": f32([1 << 60], [0, 1 << 62])}, bytes(4)),
        "offsets-past-eof": lambda: _st_header({"a": f32([4], [0, 16])}, bytes(8)),
        "offsets-overlap": lambda: _st_header({"a": f32([2], [0, 8]), "b": f32([2], [4, 12])},
                                              bytes(12)),
        "offsets-hole": lambda: _st_header({"a": f32([1], [0, 4]), "b": f32([1], [8, 12])},
                                           bytes(12)),
        "offsets-alias": lambda: _st_header({"a": f32([2], [0, 8]), "b": f32([2], [0, 8])},
                                            bytes(8)),
        "trailing-garbage": lambda: good + b"garbage",
        "metadata-list": lambda: _st_header({"__metadata__": [1, 2]}),
        "metadata-nested": lambda: _st_header({"__metadata__": {"step": {"a": [1]}},
                                               "a": f32([1], [0, 4])}, bytes(4)),
        "metadata-step-huge": lambda: _st_header({"__metadata__": {"step": "9" * 5000},
                                                  "a": f32([1], [0, 4])}, bytes(4)),
        "duplicate-keys": lambda: b.safetensors_raw(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
        "bn-shapes-disagree": lambda: b.safetensors_bytes({
            "bn.weight": np.ones(4, np.float32), "bn.bias": np.ones(3, np.float32),
            "bn.running_mean": np.zeros(4, np.float32),
            "bn.running_var": np.ones(5, np.float32)}),
        "bn-2d-stats": lambda: b.safetensors_bytes({
            "bn.weight": np.ones((2, 2), np.float32), "bn.bias": np.ones((2, 2), np.float32),
            "bn.running_mean": np.zeros((2, 2), np.float32),
            "bn.running_var": np.ones((2, 2), np.float32)}),
        "bn-negative-var": lambda: b.safetensors_bytes({
            "bn.weight": np.ones(4, np.float32), "bn.bias": np.ones(4, np.float32),
            "bn.running_mean": np.zeros(4, np.float32),
            "bn.running_var": np.full(4, -1.0, np.float32)}),
        "bn-int-and-bool": lambda: b.safetensors_bytes({
            "bn.weight": np.ones(4, bool), "bn.bias": np.ones(4, np.int64),
            "bn.running_mean": np.zeros(4, np.uint8),
            "bn.running_var": np.ones(4, np.int32)}),
        "bn-empty": lambda: b.safetensors_bytes({
            "bn.weight": np.ones(0, np.float32), "bn.bias": np.ones(0, np.float32),
            "bn.running_mean": np.zeros(0, np.float32),
            "bn.running_var": np.ones(0, np.float32)}),
    }
    either = {"duplicate-keys", "trailing-garbage", "metadata-nested", "metadata-step-huge",
              "shape-huge-but-empty", "kernel-huge-but-empty", "kernel-wide-empty-keras",
              "kernel-huge-dim-2^63-empty",
              "bn-shapes-disagree", "bn-2d-stats", "bn-negative-var", "bn-int-and-bool",
              "bn-empty"}
    for name, make in lies.items():
        cases.append(Case(f"safetensors/{name}", "safetensors",
                          lambda d, m=make: _write(d / "model.safetensors", m()),
                          expect="either" if name in either else "error"))
    many = {f"t{i:06d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            for i in range(50_000)}
    cases.append(Case("safetensors/50k-empty-tensors", "safetensors",
                      lambda d: _write(d / "model.safetensors", _st_header(many)),
                      expect="either"))
    for label, fill, count in (("nan", np.nan, 8 * 4 + 216), ("inf", np.inf, 8 * 4 + 216),
                               ("neg-inf", -np.inf, 8 * 4 + 216)):
        cases.append(Case(f"safetensors/all-{label}", "safetensors",
                          lambda d, f=fill: _write(d / "model.safetensors", st_good(f)),
                          expect="ok", nonfinite=count))
    cases.append(Case("safetensors/all-nan-f16-bf16", "safetensors", _st_nan_half,
                      expect="ok", nonfinite=16))
    return cases


def _st_nan_half(d: Path) -> Path:
    nan16 = np.full(8, np.nan, np.float16).tobytes()
    bf16 = struct.pack("<8H", *([0x7FC0] * 8))
    header = {"bn.weight": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]},
              "bn.bias": {"dtype": "BF16", "shape": [8], "data_offsets": [16, 32]}}
    return _write(d / "model.safetensors", _st_header(header, nan16 + bf16))


# -- npz ----------------------------------------------------------------------------------------


def _npz(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                         ) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npz_cases() -> list[Case]:
    good = npz_good()
    cases = [Case(f"npz/truncated-{cut:07d}", "npz",
                  lambda d, c=cut: _write(d / "model.npz", good[:c]))
             for cut in _cuts(len(good))]
    f4 = np.arange(4, dtype="<f4").tobytes()
    members: dict[str, Callable[[Path], dict[str, bytes]]] = {
        "shape-larger-than-data": lambda d: {"a.npy": b.npy_bytes("<f4", "(1000,)", f4)},
        "shape-huge": lambda d: {"a.npy": b.npy_bytes("<f4", "(1099511627776,)", f4)},
        "shape-huge-2d": lambda d: {"a.npy": b.npy_bytes("<f4", "(1048576, 1048576)", f4)},
        "shape-negative": lambda d: {"a.npy": b.npy_bytes("<f4", "(-4,)", f4)},
        "shape-zero-dims-lie": lambda d: {"a.npy": b.npy_bytes("<f4", "(0, 1099511627776)",
                                                               f4)},
        "shape-not-tuple": lambda d: {"a.npy": b.npy_bytes("<f4", "'abc'", f4)},
        "descr-object-pickle": lambda d: {"a.npy": b.npy_bytes("|O", "(1,)", _os_system(d))},
        "descr-structured": lambda d: {"a.npy": b.npy_bytes([("x", "<f4")], "(4,)", f4)},  # type: ignore[arg-type]
        "descr-string": lambda d: {"a.npy": b.npy_bytes("<U4", "(1,)", bytes(16))},
        "descr-datetime": lambda d: {"a.npy": b.npy_bytes("<M8[s]", "(2,)", bytes(16))},
        "descr-garbage": lambda d: {"a.npy": b.npy_bytes("zzz", "(2,)", bytes(16))},
        "header-code": lambda d: {"a.npy": b.npy_bytes("", "", f4, raw_header=(
            "__import__('os').system('touch " + _marker(d) + "')"))},
        "header-nested": lambda d: {"a.npy": b.npy_bytes("", "", f4, raw_header=(
            "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 3000 + ")" * 3000
            + "}"))},
        "header-version-9": lambda d: {"a.npy": b.npy_bytes("<f4", "(4,)", f4, version=(9, 0))},
        "bad-magic": lambda d: {"a.npy": b"\x93NUMPZ" + bytes(100)},
        "fortran-order": lambda d: {"a.npy": b.npy_bytes("<f4", "(2, 2)", f4, fortran=True)},
        "big-endian": lambda d: {"a.npy": b.npy_bytes(">f4", "(4,)", f4)},
        "empty-member": lambda d: {"a.npy": b""},
        "directory-member": lambda d: {"a.npy/": b""},
    }
    for name, make in members.items():
        expect = "either" if name in ("fortran-order", "big-endian", "directory-member",
                                      "shape-zero-dims-lie") else "error"
        cases.append(Case(f"npz/{name}", "npz",
                          lambda d, m=make: _write(d / "model.npz", _npz(m(d))),
                          expect=expect))
    def npz_bomb(d: Path) -> Path:
        """A deflated member whose header declares 64 Mi floats, then 256 MB of zeros."""
        head = b.npy_bytes("<f4", f"({16 << 20},)", b"")
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = bytes(1 << 20)
        raw = c.compress(head)
        crc = zlib.crc32(head)
        for _ in range(64):
            raw += c.compress(block)
            crc = zlib.crc32(block, crc)
        raw += c.flush()
        m = b.ZipMember("a.npy", raw, method=8, file_size=len(head) + (64 << 20), crc=crc)
        return _write(d / "model.npz", b.zip_bytes([m]))

    cases.append(Case("npz/deflate-bomb-64MB", "npz", npz_bomb, expect="either",
                      reasons=("too_large", "corrupt")))
    cases.append(Case("npz/20k-empty-members", "npz", lambda d: _write(
        d / "model.npz", b.zip_bytes([b.ZipMember(f"t{i}.npy", b.npy_bytes("<f4", "(0,)", b""))
                                      for i in range(20_000)])), expect="either"))
    cases.append(Case("npz/all-nan", "npz",
                      lambda d: _write(d / "model.npz", npz_good(fill=np.nan)),
                      expect="ok", nonfinite=248))
    cases.append(Case("npz/all-inf-compressed", "npz",
                      lambda d: _write(d / "model.npz", npz_good(True, fill=np.inf)),
                      expect="ok", nonfinite=248))
    return cases


def _os_system(d: Path, proto: int = 2) -> bytes:
    return b.Pickle(proto).glob("os", "system").str(f"touch {_marker(d)}").tuple(1).reduce() \
        .stop()


# -- pickles that try to run code ----------------------------------------------------------------


def evil_pickles(d: Path) -> dict[str, bytes]:
    """Each one, if really unpickled, creates the case's marker file."""
    m = _marker(d)
    P = b.Pickle
    touch = f"touch {m}"
    code = f"open({m!r}, 'w').close()"
    out = {
        "os.system-REDUCE": P().glob("os", "system").str(touch).tuple(1).reduce().stop(),
        "posix.system-REDUCE": P().glob("posix", "system").str(touch).tuple(1).reduce().stop(),
        "builtins.eval-STACK_GLOBAL": P(4).stack_global("builtins", "eval")
        .str(f"__import__('os').system({touch!r})").tuple(1).reduce().stop(),
        "builtins.exec-REDUCE": P().glob("builtins", "exec").str(code).tuple(1).reduce().stop(),
        "__builtin__.eval-py2": P().glob("__builtin__", "eval").str(code.replace(
            "open", "__import__('builtins').open")).tuple(1).reduce().stop(),
        "subprocess.Popen-REDUCE": P().glob("subprocess", "Popen").mark().str("touch").str(m)
        .op(b"l").tuple(1).reduce().stop(),
        "subprocess.Popen-NEWOBJ": P().glob("subprocess", "Popen").mark().str("touch").str(m)
        .op(b"l").tuple(1).newobj().stop(),
        "os.system-INST": P(0).mark().str(touch).op(b"ios\nsystem\n").stop(),
        "os.system-OBJ": P(1).mark().glob("os", "system").str(touch).op(b"o").stop(),
        "BUILD-setstate-gadget": P().glob("argparse", "Namespace").tuple(0).reduce()
        .empty_dict().str("__setstate__").glob("os", "system").setitem().build()
        .str(touch).build().stop(),
        "getattr-import-chain": P().glob("builtins", "getattr").glob("builtins", "__import__")
        .str("os").tuple(1).reduce().str("system").tuple(2).reduce().str(touch).tuple(1)
        .reduce().stop(),
        "importlib.import_module": P().glob("importlib", "import_module").str("os").tuple(1)
        .reduce().stop(),
        "runpy._run_code": P().glob("runpy", "_run_code").str(code).empty_dict().tuple(2)
        .reduce().stop(),
        "pickle.loads-nested": P().glob("pickle", "loads").bytes(
            P().glob("os", "system").str(touch).tuple(1).reduce().stop()).tuple(1).reduce()
        .stop(),
        "numpy.testing-runstring": P().glob("numpy.testing._private.utils", "runstring")
        .str(code).empty_dict().tuple(2).reduce().stop(),
        "torch.load-nested": P().glob("torch", "load").str("/etc/passwd").tuple(1).reduce()
        .stop(),
        "torch.hub.load": P().glob("torch.hub", "load").str("evil/repo").str("x").tuple(2)
        .reduce().stop(),
        "copyreg-extension": P().op(b"\x82\x01").stop(),
        "functools.partial-os.system": P().glob("functools", "partial").glob("os", "system")
        .str(touch).tuple(2).reduce().tuple(0).reduce().stop(),
        "operator.attrgetter": P().glob("operator", "attrgetter").str("system").tuple(1)
        .reduce().stop(),
        "timeit.timeit": P().glob("timeit", "timeit").str(code).tuple(1).reduce().stop(),
        "shutil.rmtree": P().glob("shutil", "rmtree").str(str(d)).tuple(1).reduce().stop(),
        "socket.create_connection": P().glob("socket", "create_connection").str("10.0.0.1")
        .int(9).tuple(2).tuple(1).reduce().stop(),
        "ctypes.CDLL": P().glob("ctypes", "CDLL").str("libc.so.6").tuple(1).reduce().stop(),
    }
    # not on any deny list, but they run a shell if really called: must stay inert
    out["pydoc.pipepager-unlisted"] = P().glob("pydoc", "pipepager").str("x").str(touch) \
        .tuple(2).reduce().stop()
    out["codecs-then-os-unlisted-chain"] = P().glob("_codecs", "encode").str(touch) \
        .str("latin1").tuple(2).reduce().pop().glob("pydoc", "pipepager").str("x") \
        .str(touch).tuple(2).reduce().stop()
    return out


EVIL_NAMES = sorted(evil_pickles(Path("/x")))
_UNLISTED = {"pydoc.pipepager-unlisted", "codecs-then-os-unlisted-chain"}


def _evil_case_expect(name: str) -> tuple[str, tuple[str, ...]]:
    return ("either", ()) if name in _UNLISTED else ("error", ("forbidden",))


# -- torch -----------------------------------------------------------------------------------


def _tz(d: Path, pkl: bytes, storages: dict[str, bytes] | None = None, **kw: object) -> Path:
    return _write(d / "model.pt", b.torch_zip_bytes(pkl, storages or {}, **kw))  # type: ignore[arg-type]


def _tensor_pkl(tensors: dict[str, b.TorchTensor]) -> bytes:
    return b.state_dict_pickle(tensors)


def _nested(kind: str, depth: int) -> bytes:
    """``depth`` levels of lists / dicts / tuples / unknown-class objects, innermost first."""
    p = b.Pickle(2)
    if kind == "list":
        p.op(b"]" * depth + b"a" * (depth - 1))
    elif kind == "dict":  # D0 "k" D1 "k" D2 ... then SETITEM from the inside out
        p.op(b"}" + b"X\x01\x00\x00\x00k}" * (depth - 1) + b"s" * (depth - 1))
    elif kind == "tuple":
        p.op(b")" + b"\x85" * depth)
    else:  # Thing(Thing(...Thing()...)): globals first, then REDUCE/TUPLE1 pairs
        for _ in range(depth):
            p.glob("mod", "Thing")
        p.op(b")" + b"R\x85" * (depth - 1) + b"R")
    return p.stop()


def _memo_loops() -> dict[str, bytes]:
    P = b.Pickle
    return {
        "list-contains-itself": P().empty_list().put(0).get(0).append().stop(),
        "dict-contains-itself": P().empty_dict().put(0).str("self").get(0).setitem().stop(),
        "opaque-state-is-itself": P().glob("mod", "Thing").tuple(0).reduce().put(0)
        .empty_dict().str("me").get(0).setitem().build().stop(),
        "mutual-lists": P().empty_list().put(0).empty_list().put(1).get(0).append().append()
        .get(1).stop(),
    }


def _loop_with_tensor() -> tuple[bytes, dict[str, bytes]]:
    """A real state_dict that also holds a reference cycle through a module object."""
    p = b.Pickle(2)
    p.glob("collections", "OrderedDict").tuple(0).reduce().put(0)
    p.str("bn.weight")
    b.torch_tensor_ops(p, b.TorchTensor("0", numel=4, size=(4,), stride=(1,)))
    p.setitem()
    p.str("loop").glob("mod", "Thing").tuple(0).reduce().put(1).empty_dict().str("root")
    p.get(0).str("me").get(1).setitem().setitem().build().setitem()
    return p.stop(), {"0": np.ones(4, "<f4").tobytes()}


def _alias_amplified(n_refs: int, numel: int) -> tuple[bytes, dict[str, bytes]]:
    """One storage of ``numel`` floats viewed by ``n_refs`` tensors (memo references:
    the pickle stays tiny while the declared tensor bytes grow by ``n_refs``)."""
    p = b.Pickle(2)
    p.glob("collections", "OrderedDict").tuple(0).reduce().mark()
    p.str("t0")
    b.torch_tensor_ops(p, b.TorchTensor("0", numel=numel, size=(numel,), stride=(1,)))
    p.put(1)
    for i in range(1, n_refs):
        p.str(f"t{i}").get(1)
    p.setitems()
    return p.stop(), {"0": bytes(4 * numel)}


def _path_amplified(depth: int, key_len: int) -> bytes:
    """Nested dicts keyed by one memoized long string: tensor paths grow quadratically."""
    p = b.Pickle(2)
    p.str("k" * key_len).put(0).pop()
    p.op(b"}")
    for _ in range(depth - 1):
        p.get(0).op(b"}")
    p.op(b"s" * (depth - 1))
    return p.stop()


def _opcode_flood(n_pairs: int) -> bytes:
    return b"\x80\x02" + b"N0" * n_pairs + b"N."


def torch_cases() -> list[Case]:
    cases: list[Case] = []
    zgood, lgood = torch_zip_good(), torch_legacy_good()
    for cut in _cuts(len(zgood)):
        cases.append(Case(f"torch-zip/truncated-{cut:07d}", "torch",
                          lambda d, c=cut: _write(d / "model.pt", zgood[:c])))
    for cut in _cuts(len(lgood)):
        cases.append(Case(f"torch-legacy/truncated-{cut:07d}", "torch-legacy",
                          lambda d, c=cut: _write(d / "model.pt", lgood[:c])))
    for real in _real_torch():
        data = real.read_bytes()
        fmt = "torch-legacy" if data.startswith(bytes.fromhex("80028a0a")) else "torch"
        for cut in _cuts(len(data)):
            cases.append(Case(f"{fmt}/{real.name}-truncated-{cut:08d}", fmt,
                              lambda d, c=cut, raw=data: _write(d / "model.pt", raw[:c])))
    # code execution attempts, in every place a pickle is read
    for name in EVIL_NAMES:
        expect, reasons = _evil_case_expect(name)
        cases.append(Case(f"torch-zip/evil-{name}", "torch",
                          lambda d, n=name: _tz(d, evil_pickles(d)[n]),
                          expect=expect, reasons=reasons))
        cases.append(Case(f"torch-legacy/evil-{name}", "torch-legacy",
                          lambda d, n=name: _write(d / "model.pt", b.torch_legacy_bytes(
                              evil_pickles(d)[n], {})), expect=expect, reasons=reasons))
    for slot in ("sys_info", "key-list"):
        cases.append(Case(f"torch-legacy/evil-in-{slot}", "torch-legacy",
                          lambda d, s=slot: _legacy_evil_slot(d, s), reasons=("forbidden",)))
    cases.append(Case("npz/evil-object-array", "npz", lambda d: _write(
        d / "model.npz", _npz({"a.npy": b.npy_bytes("|O", "(1,)", _os_system(d))}))))
    # nesting, loops, sizes
    for kind in ("list", "dict", "tuple", "opaque"):
        cases.append(Case(f"torch-zip/nested-{kind}-100k", "torch",
                          lambda d, k=kind: _tz(d, _nested(k, 100_000)), expect="either"))
    cases.append(Case("torch-legacy/nested-list-100k", "torch-legacy", lambda d: _write(
        d / "model.pt", b.torch_legacy_bytes(_nested("list", 100_000), {})), expect="either"))
    for name, pkl in _memo_loops().items():
        cases.append(Case(f"torch-zip/memo-{name}", "torch",
                          lambda d, raw=pkl: _tz(d, raw), expect="either"))
    cases.append(Case("torch-zip/memo-loop-with-tensor", "torch",
                      lambda d: _tz(d, *_loop_with_tensor()), expect="ok"))
    cases += [
        Case("torch-zip/memo-index-huge", "torch",
             lambda d: _tz(d, b.Pickle().none().op(b"r\xff\xff\xff\x7f").stop())),
        Case("torch-zip/memo-get-unset", "torch",
             lambda d: _tz(d, b.Pickle().op(b"j\xff\xff\xff\x00").stop())),
        Case("torch-zip/binbytes8-length-lie", "torch",
             lambda d: _tz(d, b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"abc.")),
        Case("torch-zip/long4-length-lie", "torch",
             lambda d: _tz(d, b"\x80\x02\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"\x01.")),
        Case("torch-zip/long4-huge-real", "torch",
             lambda d: _tz(d, b"\x80\x02\x8b" + struct.pack("<i", 8 << 20) + b"\x01" * (8 << 20)
                           + b"."), expect="either"),
        Case("torch-zip/alias-amplification-80GB", "torch",
             lambda d: _tz(d, *_alias_amplified(20_000, 1 << 20)), expect="either",
             timeout=BOMB),
        Case("torch-zip/path-amplification", "torch",
             lambda d: _tz(d, _path_amplified(990, 1 << 20)), expect="either", timeout=BOMB),
        Case("torch-zip/opcode-flood-50M", "torch",
             lambda d: _tz(d, _opcode_flood(25_000_000)), expect="either", timeout=BOMB),
        Case("torch-zip/empty-pickle", "torch", lambda d: _tz(d, b"")),
        Case("torch-zip/pickle-no-stop", "torch", lambda d: _tz(d, b"\x80\x02N")),
        Case("torch-zip/pickle-stack-underflow", "torch", lambda d: _tz(d, b"\x80\x02a.")),
        Case("torch-zip/pickle-mark-never-set", "torch", lambda d: _tz(d, b"\x80\x02t.")),
        Case("torch-zip/unknown-opcode", "torch", lambda d: _tz(d, b"\x80\x02\xff.")),
    ]
    cases += torch_layout_cases()
    cases += torch_zip_structure_cases()
    for label, fill in (("nan", np.nan), ("inf", np.inf)):
        cases.append(Case(f"torch-zip/all-{label}", "torch",
                          lambda d, f=fill: _write(d / "model.pt", torch_zip_good(f)),
                          expect="ok", nonfinite=248))
        cases.append(Case(f"torch-legacy/all-{label}", "torch-legacy",
                          lambda d, f=fill: _write(d / "model.pt", torch_legacy_good(f)),
                          expect="ok", nonfinite=248))
    return cases


def _legacy_evil_slot(d: Path, slot: str) -> Path:
    ck = b.TorchCheckpoint(b.bn_arrays())
    obj = b.state_dict_pickle(ck.refs, legacy=True)
    evil = _os_system(d)
    head = b.legacy_header_pickles()
    magic_version = head[:len(b.Pickle(2).int(b.LEGACY_MAGIC).stop())
                         + len(b.Pickle(2).int(1001).stop())]
    data = magic_version + evil + obj if slot == "sys_info" else head + obj + evil
    out = bytearray(data)
    for raw in ck.storages.values():
        out += struct.pack("<q", len(raw) // 4) + raw
    return _write(d / "model.pt", bytes(out))


def torch_layout_cases() -> list[Case]:
    """Absurd storage sizes, offsets, strides and dtypes in otherwise valid files."""
    one = {"0": np.ones(16, "<f4").tobytes()}
    T = b.TorchTensor
    layouts: dict[str, tuple[dict[str, b.TorchTensor], dict[str, bytes], str]] = {
        "numel-huge": ({"w": T("0", numel=1 << 60, size=(4,), stride=(1,))}, one, "error"),
        "numel-larger-than-record": ({"w": T("0", numel=17, size=(4,), stride=(1,))}, one,
                                     "error"),
        "offset-huge": ({"w": T("0", numel=16, offset=1 << 62, size=(4,), stride=(1,))}, one,
                        "error"),
        "offset-past-storage": ({"w": T("0", numel=16, offset=13, size=(4,), stride=(1,))},
                                one, "error"),
        "stride-past-storage": ({"w": T("0", numel=16, size=(4, 4), stride=(5, 1))}, one,
                                "error"),
        "stride-huge": ({"w": T("0", numel=16, size=(2,), stride=(1 << 62,))}, one, "error"),
        "stride-zero-huge-numel": ({"w": T("0", numel=16, size=(1 << 31, 1 << 31),
                                           stride=(0, 0))}, one, "either"),
        "stride-zero-64-dims": ({"w": T("0", numel=16, size=(2,) * 64, stride=(0,) * 64)}, one,
                                "either"),
        "size-65-dims": ({"w": T("0", numel=16, size=(1,) * 65, stride=(1,) * 65)}, one,
                         "error"),
        "size-stride-rank-differ": ({"w": T("0", numel=16, size=(4, 4), stride=(1,))}, one,
                                    "error"),
        "storage-missing-record": ({"w": T("9", numel=16, size=(4,), stride=(1,))}, one,
                                   "error"),
        "storage-key-path-traversal": ({"w": T("../../etc/passwd", numel=4, size=(4,),
                                               stride=(1,))}, one, "error"),
        "storage-described-twice": ({"a": T("0", numel=16, size=(4,), stride=(1,)),
                                     "b": T("0", "DoubleStorage", numel=8, size=(4,),
                                            stride=(1,))}, one, "error"),
        "storage-unknown-type": ({"w": T("0", "EvilStorage", numel=16, size=(4,), stride=(1,))},
                                 one, "either"),
        "storage-quantized": ({"w": T("0", "QInt8Storage", numel=64, size=(4,), stride=(1,))},
                              one, "either"),
        "bn-shapes-disagree": ({
            "bn.weight": T("0", numel=16, size=(4,), stride=(1,)),
            "bn.bias": T("0", numel=16, size=(3,), stride=(1,)),
            "bn.running_mean": T("0", numel=16, size=(4,), stride=(1,)),
            "bn.running_var": T("0", numel=16, size=(5,), stride=(1,))}, one, "either"),
    }
    # the legacy format stores each storage's real length next to its bytes, and the
    # reader trusts that rather than the pickle's claim: a lying numel is harmless there
    legacy_either = {"numel-huge", "numel-larger-than-record"}
    cases = []
    for name, (tensors, storages, expect) in layouts.items():
        timeout = BOMB if name.startswith("stride-zero") else None
        if name != "stride-zero-64-dims":  # (each stride-zero bomb in one format is enough)
            cases.append(Case(f"torch-zip/{name}", "torch",
                              lambda d, t=tensors, s=storages: _tz(d, _tensor_pkl(t), s),
                              expect=expect, timeout=timeout))
        if name == "stride-zero-huge-numel":
            continue
        cases.append(Case(f"torch-legacy/{name}", "torch-legacy",
                          lambda d, t=tensors, s=storages: _write(
                              d / "model.pt", b.torch_legacy_bytes(
                                  b.state_dict_pickle(t, legacy=True), s)),
                          expect="either" if name in legacy_either else expect,
                          timeout=timeout))
    legacy_lies = {
        "count-huge": {"0": 1 << 60},
        "count-negative": {"0": -5},
        "count-past-eof": {"0": 17},
    }
    for name, counts in legacy_lies.items():
        cases.append(Case(f"torch-legacy/{name}", "torch-legacy", lambda d, c=counts: _write(
            d / "model.pt", b.torch_legacy_bytes(b.state_dict_pickle(
                {"w": T("0", numel=16, size=(4,), stride=(1,))}, legacy=True), one, counts=c))))
    cases.append(Case("torch-legacy/key-list-unknown-key", "torch-legacy", lambda d: _write(
        d / "model.pt", b.torch_legacy_bytes(b.state_dict_pickle(
            {"w": T("0", numel=16, size=(4,), stride=(1,))}, legacy=True), one,
            keys=["0", "ghost"]))))
    cases.append(Case("torch-legacy/key-list-200k-strings", "torch-legacy", lambda d: _write(
        d / "model.pt", b.legacy_header_pickles() + b.state_dict_pickle({}, legacy=True)
        + b"\x80\x02](" + b"X\x01\x00\x00\x000" * 200_000 + b"e.")))
    return cases


def torch_zip_structure_cases() -> list[Case]:
    """Zip directories that lie: local vs central headers, offsets, bombs, counts."""
    ck = b.TorchCheckpoint(b.bn_arrays())
    pkl = b.state_dict_pickle(ck.refs)
    M = b.ZipMember

    def members(**over: dict) -> list[b.ZipMember]:
        ms = [M("archive/data.pkl", pkl), M("archive/byteorder", b"little")]
        ms += [M(f"archive/data/{k}", v) for k, v in ck.storages.items()]
        for i, m in enumerate(ms):
            if m.name in over:
                ms[i] = M(**{**m.__dict__, **over[m.name]})
        return ms

    def z(d: Path, ms: list[b.ZipMember], **kw: object) -> Path:
        return _write(d / "model.pt", b.zip_bytes(ms, **kw))  # type: ignore[arg-type]

    cases = [
        Case("torch-zip/local-name-differs", "torch", lambda d: z(d, members(
            **{"archive/data.pkl": {"local_name": "archive/evil.pkl"}}))),
        Case("torch-zip/local-extra-huge", "torch", lambda d: z(d, [*members(
            **{"archive/data/0": {"local_extra": b"\x00" * 60000}}), M("pad", b"")]),
             expect="either"),
        Case("torch-zip/central-offset-points-at-other-member", "torch", lambda d: z(d, members(
            **{"archive/data/1": {"central_offset": 0}}))),
        Case("torch-zip/central-offset-past-eof", "torch", lambda d: z(d, members(
            **{"archive/data/1": {"central_offset": 1 << 40}}))),
        Case("torch-zip/central-size-lies-small", "torch", lambda d: z(d, members(
            **{"archive/data/4": {"central_csize": 8, "central_usize": 8}}))),
        Case("torch-zip/central-size-lies-large", "torch", lambda d: z(d, members(
            **{"archive/data/4": {"central_csize": 1 << 40, "central_usize": 1 << 40}}))),
        Case("torch-zip/data-pkl-crc-wrong", "torch", lambda d: z(d, members(
            **{"archive/data.pkl": {"crc": 1234}}))),
        Case("torch-zip/duplicate-member", "torch", lambda d: z(d, [
            *members(), M("archive/data.pkl", b"\x80\x02N.")])),
        Case("torch-zip/all-members-same-offset", "torch", lambda d: z(d, [
            M(f"archive/data/{i}", b"", central_offset=0) for i in range(1000)]
            + [M("archive/data.pkl", pkl)])),
        Case("torch-zip/eocd-count-huge", "torch", lambda d: z(d, members(), eocd_count=65535)),
        Case("torch-zip/eocd-cd-offset-past-eof", "torch",
             lambda d: z(d, members(), cd_offset=1 << 31)),
        Case("torch-zip/eocd-cd-size-huge", "torch",
             lambda d: z(d, members(), cd_size=0xFFFFFFF0)),
        Case("torch-zip/zip64-count-huge", "torch", lambda d: _zip64_count(d, members())),
        Case("torch-zip/encrypted-member", "torch", lambda d: z(d, members(
            **{"archive/data.pkl": {"flags": 1}}))),
        Case("torch-zip/data-pkl-deflate-bomb-declared-8GB", "torch", lambda d: z(d, [
            M("archive/data.pkl", _bomb()[0], method=8, file_size=8 << 30, crc=_bomb()[1])])),
        Case("torch-zip/data-pkl-deflate-bomb-declared-small", "torch", lambda d: z(d, [
            M("archive/data.pkl", _bomb()[0], method=8, file_size=1000, crc=_bomb()[1])])),
        Case("torch-zip/data-pkl-over-256MB-declared", "torch", lambda d: z(d, [
            M("archive/data.pkl", b.deflate(bytes(1 << 20)), method=8,
              file_size=300 << 20)])),
        Case("torch-zip/storage-deflated", "torch", lambda d: z(d, members(
            **{"archive/data/0": {"data": b.deflate(ck.storages["0"]), "method": 8,
                                  "file_size": len(ck.storages["0"])}}))),
        Case("torch-zip/unknown-compression", "torch", lambda d: z(d, members(
            **{"archive/data.pkl": {"method": 12, "file_size": len(pkl)}}))),
        Case("torch-zip/byteorder-huge", "torch", lambda d: z(d, members(
            **{"archive/byteorder": {"data": b"x" * 100}}))),
        Case("torch-zip/byteorder-big", "torch", lambda d: z(d, members(
            **{"archive/byteorder": {"data": b"big"}})), expect="either"),
        Case("torch-zip/no-data-pkl", "torch", lambda d: z(d, [M("archive/other", b"x")])),
        Case("torch-zip/torchscript", "torch", lambda d: z(d, [
            M("archive/constants.pkl", b"\x80\x02N."), M("archive/data.pkl", pkl)]),
             reasons=("unsupported",)),
        Case("torch-zip/100k-members", "torch", lambda d: z(d, members() + [
            M(f"archive/x/{i}", b"") for i in range(100_000)]), expect="either"),
        Case("torch-zip/comment-with-fake-eocd", "torch", lambda d: z(
            d, members(), comment=b"PK\x05\x06" + bytes(18))),
    ]
    return cases


@functools.cache
def _bomb(size: int = 256 << 20) -> tuple[bytes, int]:
    """Raw deflate of ``size`` zero bytes (~1000:1) and its CRC, made once."""
    return b.deflate_zeros(size)


def _zip64_count(d: Path, ms: list[b.ZipMember]) -> Path:
    data = bytearray(b.zip_bytes(ms, zip64=True))
    rec = data.rfind(b"PK\x06\x06")
    struct.pack_into("<QQ", data, rec + 24, 1 << 40, 1 << 40)
    return _write(d / "model.pt", bytes(data))


# -- Keras HDF5 ---------------------------------------------------------------------------------


def _h5(d: Path, name: str = "model.weights.h5"):  # type: ignore[no-untyped-def]
    import h5py

    return h5py.File(d / name, "w")


def _k3_bn(f, channels: int = 4, fill: float | None = None, dtype: str = "f4"):  # type: ignore[no-untyped-def]
    g = f.create_group("layers/batch_normalization/vars")
    for i in range(4):
        data = np.full(channels, fill if fill is not None else 1.0 + i, dtype)
        g.create_dataset(str(i), data=data)
    return g


def h5_cases() -> list[Case]:
    cases = []
    for rel in ("keras/k2_resnet_s400_weights.h5", "keras/k3_small.weights.h5",
                "keras/k2_nested.h5"):
        src = _fixture(rel)
        if src is None:
            continue
        data = src.read_bytes()
        for cut in _cuts(len(data)):
            cases.append(Case(f"h5/{src.name}-truncated-{cut:07d}", "keras-h5",
                              lambda d, c=cut, raw=data, n=src.name: _write(d / n, raw[:c])))
    hangs = {"external-link-to-fifo", "external-raw-storage-fifo", "virtual-dataset-fifo"}
    bombs = {"gzip-inflation-4GB", "hard-link-amplification-20k"}
    outside = {"external-link-outside-root", "external-raw-storage-outside-root",
               "virtual-dataset-outside-root"}
    cases += [Case(f"h5/{name}", "keras-h5", make, expect=expect,
                   timeout=HANG if name in hangs else BOMB if name in bombs else None,
                   max_nonfinite=0 if name in outside else None)
              for name, (make, expect) in _h5_builders().items()]
    src = _fixture("keras/k3_small.weights.h5")
    if src is not None:
        # found by tests/fuzz/test_fuzz_hdf5.py: 16 bytes of the superblock copied over an
        # attribute message make libhdf5 2.0 spin forever, holding the GIL
        cases.append(Case("h5/libhdf5-spins-on-corrupt-attribute", "keras-h5",
                          lambda d, s=src: _write(d / "model.weights.h5", _copy16(
                              s.read_bytes(), 50, 2385)), expect="either", timeout=BOMB))
    for rel in ("keras/k3_small.weights.h5", "keras/k2_resnet_s400_weights.h5"):
        src = _fixture(rel)
        if src is not None:
            for label, fill in (("nan", np.nan), ("inf", np.inf)):
                cases.append(Case(f"h5/{src.name}-all-{label}", "keras-h5",
                                  lambda d, s=src, f=fill: _fill_h5(d, s, f),
                                  expect="ok", nonfinite=1000))
    return cases


def _copy16(data: bytes, src: int, dst: int) -> bytes:
    out = bytearray(data)
    out[dst:dst + 16] = data[src:src + 16]
    return bytes(out)


def _fill_h5(d: Path, src: Path, value: float) -> Path:
    """A copy of a real weights file with every float dataset overwritten in place."""
    import h5py

    dst = d / src.name
    if dst != src:
        shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        def fill(_name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and obj.size:
                obj[...] = value
        f.visititems(fill)
    return dst


def _h5_builders() -> dict[str, tuple[Make, str]]:
    import h5py

    def huge_chunked(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(10**12,), dtype="f4", chunks=(1024,))
        return d / "model.weights.h5"

    def huge_contiguous(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(1 << 40,), dtype="f4")
        return d / "model.weights.h5"

    def huge_fill_value(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(1 << 34,), dtype="f4", chunks=(1 << 20,),
                             fillvalue=np.nan)
        return d / "model.weights.h5"

    def inflation_bomb(d: Path) -> Path:
        """4 GB of (almost) zeros in 1000 gzip chunks of ~4 KB: just under the reader's
        1000x inflation limit, so a 4 MB file is decompressed and scanned in full."""
        chunk = 1 << 20
        raw = zlib.compress(_rand(1, 200) + bytes(4 * chunk - 200), 9)
        with _h5(d) as f:
            g = _k3_bn(f)
            ds = g.create_dataset("4", shape=(chunk * 1000,), dtype="f4", chunks=(chunk,),
                                  compression="gzip")
            for i in range(1000):
                ds.id.write_direct_chunk((i * chunk,), raw)
        return d / "model.weights.h5"

    def hard_link_cycle(d: Path) -> Path:
        with _h5(d) as f:
            _k3_bn(f)
            f["layers/batch_normalization/loop"] = f["layers"]
        return d / "model.weights.h5"

    def soft_link_cycle(d: Path) -> Path:
        with _h5(d) as f:
            _k3_bn(f)
            f["layers/batch_normalization/loop"] = h5py.SoftLink("/layers")
        return d / "model.weights.h5"

    def soft_link_dangling(d: Path) -> Path:
        with _h5(d) as f:
            _k3_bn(f)
            f["layers/batch_normalization/vars/4"] = h5py.SoftLink("/nowhere")
        return d / "model.weights.h5"

    def external_link_fifo(d: Path) -> Path:
        os.mkfifo(d / "pipe.h5")
        with _h5(d) as f:
            _k3_bn(f)
            f["layers/other"] = h5py.ExternalLink(str(d / "pipe.h5"), "/")
        return d / "model.weights.h5"

    def external_link_outside(d: Path) -> Path:
        outside = d / "outside"
        outside.mkdir()
        with h5py.File(outside / "secret.h5", "w") as s:
            s.create_dataset("vars/0", data=np.full(4, np.nan, "f4"))
        with _h5(d) as f:
            _k3_bn(f)
            f["layers/stolen"] = h5py.ExternalLink(str(outside / "secret.h5"), "/")
        return d / "model.weights.h5"

    def external_raw_fifo(d: Path) -> Path:
        os.mkfifo(d / "raw.bin")
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(4,), dtype="f4", external=[(str(d / "raw.bin"), 0, 16)])
        return d / "model.weights.h5"

    def external_raw_outside(d: Path) -> Path:
        """Raw data of a dataset kept in another file (HDF5 'external storage')."""
        (d / "outside").mkdir()
        (d / "outside" / "secret.bin").write_bytes(np.full(64, np.nan, "<f4").tobytes())
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(64,), dtype="<f4",
                             external=[(str(d / "outside" / "secret.bin"), 0, 256)])
        return d / "model.weights.h5"

    def virtual_outside(d: Path) -> Path:
        (d / "outside").mkdir()
        with h5py.File(d / "outside" / "secret.h5", "w") as s:
            s.create_dataset("data", data=np.full(64, np.nan, "f4"))
        layout = h5py.VirtualLayout(shape=(64,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(d / "outside" / "secret.h5"), "data", shape=(64,))
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_virtual_dataset("4", layout, fillvalue=0)
        return d / "model.weights.h5"

    def virtual_fifo(d: Path) -> Path:
        os.mkfifo(d / "src.h5")
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(d / "src.h5"), "data", shape=(4,))
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_virtual_dataset("4", layout, fillvalue=0)
        return d / "model.weights.h5"

    def hard_link_amplification(d: Path) -> Path:
        with _h5(d) as f:
            _k3_bn(f)
            g = f.create_group("layers/big/vars")
            ds = g.create_dataset("0", data=np.ones(1 << 20, "f4"))
            for i in range(1, 20_000):
                g[str(i)] = ds
        return d / "model.weights.h5"

    def odd_dtypes(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", data=np.zeros(3, [("a", "f4"), ("b", "i4")]))
            g.create_dataset("5", data=np.array([b"abc"]))
            g.create_dataset("6", data=np.array([1, 2], h5py.enum_dtype({"a": 1, "b": 2})))
            g.create_dataset("7", shape=(2,), dtype=h5py.vlen_dtype("f4"))
            g.create_dataset("8", data=np.zeros(4, "f2").astype(">f2"))
            g.create_dataset("9", data=np.zeros(4, np.longdouble))
            g.create_dataset("10", data=np.zeros(4, "c8"))
            g.create_dataset("11", shape=(2,), dtype=h5py.ref_dtype)
        return d / "model.weights.h5"

    def bf16_marker_odd(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            ds = g.create_dataset("4", data=np.zeros(8, "V2"), chunks=(4,), compression="gzip")
            ds.attrs["dtype"] = "bfloat16"
            ds2 = g.create_dataset("5", data=np.zeros(8, "f4"))
            ds2.attrs["dtype"] = "bfloat16"
        return d / "model.weights.h5"

    def unknown_filter(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            g.create_dataset("4", shape=(16,), dtype="f4", chunks=(16,), compression=32001,
                             allow_unknown_filter=True)
            g["4"].id.write_direct_chunk((0,), b"\x00" * 40)
        return d / "model.weights.h5"

    def fletcher_corrupt(d: Path) -> Path:
        with _h5(d) as f:
            g = _k3_bn(f)
            ds = g.create_dataset("4", data=np.ones(64, "f4"), chunks=(64,), fletcher32=True)
            off = ds.id.get_chunk_info(0).byte_offset
        with open(d / "model.weights.h5", "r+b") as fh:
            fh.seek(off + 10)
            fh.write(b"\xff\xff")
        return d / "model.weights.h5"

    def k2_lies(kind: str) -> Make:
        def make(d: Path) -> Path:
            with _h5(d, "model.h5") as f:
                f.attrs["keras_version"] = "2.15.0"
                if kind == "missing-weight":
                    f.attrs["layer_names"] = [b"bn"]
                    g = f.create_group("bn")
                    g.attrs["weight_names"] = [b"bn/gamma:0", b"bn/beta:0"]
                    g.create_dataset("bn/gamma:0", data=np.ones(4, "f4"))
                elif kind == "names-are-paths":
                    f.attrs["layer_names"] = [b"/", b"..", b"bn/../../bn"]
                    g = f.create_group("bn")
                    g.attrs["weight_names"] = [b"/bn/gamma:0"]
                    g.create_dataset("gamma:0", data=np.ones(4, "f4"))
                elif kind == "names-not-strings":
                    f.attrs["layer_names"] = np.arange(5)
                    f.create_group("0").attrs["weight_names"] = np.arange(3)
                elif kind == "names-1M":
                    for part in range(24):  # split like Keras does past 64 KB
                        f.attrs[f"layer_names{part}"] = np.array(
                            [b"x%d" % (part * 5000 + i) for i in range(5000)])
                elif kind == "model-config-list":
                    f.attrs["model_config"] = json.dumps([1, 2, 3])
                    _k2_bn(f)
                elif kind == "model-config-wrong-types":
                    f.attrs["model_config"] = json.dumps({
                        "class_name": "Functional", "config": {"layers": [
                            {"class_name": "BatchNormalization", "name": "bn",
                             "config": {"name": "bn", "epsilon": "abc"},
                             "inbound_nodes": [{"config": [1]}]},
                            {"class_name": "ReLU", "name": "r", "config": {
                                "negative_slope": {"a": 1}},
                             "inbound_nodes": [[["bn", 0, 0, {}]]]}]}})
                    _k2_bn(f)
                elif kind == "model-config-nested":
                    f.attrs["model_config"] = '{"a":' + "[" * 50_000 + "]" * 50_000 + "}"
                    _k2_bn(f)
                elif kind == "model-config-lambda":
                    f.attrs["model_config"] = json.dumps({
                        "class_name": "Sequential", "config": {"layers": [{
                            "class_name": "Lambda", "config": {"name": "l", "function": [
                                "4wEAAAAAAAAAAAAAAAEAAAACAAAAQwAAAHMIAAAAdAB8AIMBUwApAU4pAdoE"
                                "ZXZhbCkB2gF4qQByAgAAAPoAcggAAAABAAAAcwAAAAA=", None, None]}}]}})
                    _k2_bn(f)
            return d / "model.h5"
        return make

    return {
        "enormous-shape-chunked": (huge_chunked, "error"),
        "enormous-shape-contiguous": (huge_contiguous, "error"),
        "enormous-shape-fill-value-only": (huge_fill_value, "error"),
        "gzip-inflation-4GB": (inflation_bomb, "either"),
        "hard-link-cycle": (hard_link_cycle, "either"),
        "soft-link-cycle": (soft_link_cycle, "either"),
        "soft-link-dangling": (soft_link_dangling, "either"),
        "external-link-to-fifo": (external_link_fifo, "either"),
        "external-link-outside-root": (external_link_outside, "either"),
        "external-raw-storage-fifo": (external_raw_fifo, "either"),
        "external-raw-storage-outside-root": (external_raw_outside, "either"),
        "virtual-dataset-fifo": (virtual_fifo, "either"),
        "virtual-dataset-outside-root": (virtual_outside, "either"),
        "hard-link-amplification-20k": (hard_link_amplification, "either"),
        "odd-dtypes": (odd_dtypes, "either"),
        "bfloat16-marker-on-odd-datasets": (bf16_marker_odd, "either"),
        "unknown-filter": (unknown_filter, "either"),
        "fletcher32-corrupt-chunk": (fletcher_corrupt, "error"),
        "k2-missing-weight": (k2_lies("missing-weight"), "error"),
        "k2-names-are-paths": (k2_lies("names-are-paths"), "either"),
        "k2-names-not-strings": (k2_lies("names-not-strings"), "either"),
        "k2-120k-layer-names": (k2_lies("names-1M"), "either"),
        "k2-model-config-list": (k2_lies("model-config-list"), "either"),
        "k2-model-config-wrong-types": (k2_lies("model-config-wrong-types"), "either"),
        "k2-model-config-nested-50k": (k2_lies("model-config-nested"), "either"),
        "k2-model-config-lambda": (k2_lies("model-config-lambda"), "either"),
    }


def _k2_bn(f) -> None:  # type: ignore[no-untyped-def]
    f.attrs["layer_names"] = [b"bn"]
    g = f.create_group("bn")
    names = [b"bn/gamma:0", b"bn/beta:0", b"bn/moving_mean:0", b"bn/moving_variance:0"]
    g.attrs["weight_names"] = names
    for i, n in enumerate(names):
        g.create_dataset(n.decode(), data=np.full(4, 1.0 + i, "f4"))


# -- .keras -----------------------------------------------------------------------------------


def keras_cases() -> list[Case]:
    cases = []
    for rel in ("keras/k3_small.keras", "keras/k3_nested.keras"):
        src = _fixture(rel)
        if src is None:
            continue
        data = src.read_bytes()
        for cut in _cuts(len(data)):
            cases.append(Case(f"keras/{src.name}-truncated-{cut:07d}", "keras",
                              lambda d, c=cut, raw=data: _write(d / "model.keras", raw[:c])))
    src = _fixture("keras/k3_small.keras")
    if src is None:
        return cases
    with zipfile.ZipFile(src) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}
    weights = parts["model.weights.h5"]
    M = b.ZipMember

    def k(d: Path, ms: list[b.ZipMember], **kw: object) -> Path:
        return _write(d / "model.keras", b.zip_bytes(ms, **kw))  # type: ignore[arg-type]

    def base(**over: dict) -> list[b.ZipMember]:
        ms = [M(n, v) for n, v in parts.items()]
        for i, m in enumerate(ms):
            if m.name in over:
                ms[i] = M(**{**m.__dict__, **over[m.name]})
        return ms

    cases += [
        Case("keras/weights-deflated", "keras", lambda d: k(d, base(**{"model.weights.h5": {
            "data": b.deflate(weights), "method": 8, "file_size": len(weights),
            "crc": zlib.crc32(weights)}})), expect="ok"),
        Case("keras/weights-deflate-bomb-declared-1GB", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"data": _bomb()[0], "method": 8, "file_size": 1 << 30,
                                 "crc": _bomb()[1]}})), reasons=("too_large", "unsupported")),
        Case("keras/weights-deflate-bomb-declared-small", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"data": _bomb()[0], "method": 8, "file_size": 4096,
                                 "crc": _bomb()[1]}}))),
        Case("keras/config-deflate-bomb-declared-small", "keras", lambda d: k(d, base(**{
            "config.json": {"data": _bomb()[0], "method": 8, "file_size": 4096,
                            "crc": _bomb()[1]}}))),
        Case("keras/config-deflate-bomb-60MB-zeros", "keras", lambda d: k(d, base(**{
            "config.json": {"data": _bomb(60 << 20)[0], "method": 8, "file_size": 60 << 20,
                            "crc": _bomb(60 << 20)[1]}}))),
        Case("keras/config-declared-1TB", "keras", lambda d: k(d, base(**{
            "config.json": {"data": b.deflate(b"{}"), "method": 8, "file_size": 1 << 40}}))),
        Case("keras/config-nested-100k", "keras", lambda d: k(d, base(**{
            "config.json": {"data": b"[" * 100_000 + b"]" * 100_000}})), expect="either"),
        Case("keras/config-not-json", "keras", lambda d: k(d, base(**{
            "config.json": {"data": b"\xff\xfe not json"}}))),
        Case("keras/config-wrong-types", "keras", lambda d: k(d, base(**{
            "config.json": {"data": json.dumps({"class_name": 5, "config": {
                "layers": [1, "x", {"config": []}, {"class_name": "Model", "config": {
                    "layers": "nope"}}]}}).encode()}})), expect="either"),
        Case("keras/config-is-list", "keras", lambda d: k(d, base(**{
            "config.json": {"data": b"[1, 2]"}})), expect="either"),
        Case("keras/no-weights-member", "keras", lambda d: k(d, [
            M(n, v) for n, v in parts.items() if n != "model.weights.h5"])),
        Case("keras/weights-is-npz", "keras", lambda d: k(d, [
            M(n, v) for n, v in parts.items() if n != "model.weights.h5"]
            + [M("model.weights.npz", npz_good())])),
        Case("keras/local-name-differs", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"local_name": "evil.h5"}})), expect="either"),
        Case("keras/local-extra-shifts-data", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"local_extra": b"\x00" * 1000}})), expect="either"),
        Case("keras/central-offset-at-config", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"central_offset": 0}}))),
        Case("keras/central-offset-past-eof", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"central_offset": 1 << 31}}))),
        Case("keras/central-size-larger", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"central_csize": len(weights) + 5000,
                                 "central_usize": len(weights) + 5000}})), expect="either"),
        Case("keras/central-size-smaller", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"central_csize": len(weights) // 2,
                                 "central_usize": len(weights) // 2}}))),
        Case("keras/duplicate-weights-member", "keras", lambda d: k(d, [
            *base(), M("model.weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(100))]),
             expect="either"),
        Case("keras/encrypted-flag", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"flags": 1}})), expect="either"),
        Case("keras/eocd-count-lies", "keras", lambda d: k(d, base(), eocd_count=60000),
             expect="either"),
        Case("keras/inner-h5-truncated", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"data": weights[:len(weights) // 2]}}))),
        Case("keras/inner-random", "keras", lambda d: k(d, base(**{
            "model.weights.h5": {"data": b"\x89HDF\r\n\x1a\n" + _rand(5, 50_000)}}))),
    ]

    def keras_nan(d: Path, fill: float) -> Path:
        inner = _fill_h5(d, _write(d / "inner.weights.h5", weights), fill).read_bytes()
        (d / "inner.weights.h5").unlink()
        return k(d, [M(n, inner if n == "model.weights.h5" else v) for n, v in parts.items()])

    cases.append(Case("keras/all-nan", "keras", lambda d: keras_nan(d, np.nan), expect="ok",
                      nonfinite=1000))
    cases.append(Case("keras/all-inf", "keras", lambda d: keras_nan(d, -np.inf), expect="ok",
                      nonfinite=1000))
    return cases


# -- TF bundles ---------------------------------------------------------------------------------


def _tfb(d: Path, tensors: list[b.TFTensor] | None = None, **kw: object) -> Path:
    if tensors is None:
        tensors = _tf_bn()
    b.tf_bundle(str(d / "ckpt"), tensors, **kw)  # type: ignore[arg-type]
    return d / "ckpt.index"


def _tf_bn(fill: float | None = None) -> list[b.TFTensor]:
    arrays = b.bn_arrays(fill=fill)
    names = {"bn.weight": "bn/BatchNorm/gamma", "bn.bias": "bn/BatchNorm/beta",
             "bn.running_mean": "bn/BatchNorm/moving_mean",
             "bn.running_var": "bn/BatchNorm/moving_variance", "conv.weight": "conv/weights"}
    return [b.TFTensor(names[k], v) for k, v in arrays.items()]


def _slice_key(name: str, extents: list[tuple[int, int]]) -> bytes:
    def num(x: int) -> bytes:
        if x == -1:
            return b"\x7f"
        for length in range(1, 10):
            if x < 1 << (7 * length - 1):
                header = ((1 << length) - 1) << (8 * length - length)
                return (header | x).to_bytes(length, "big")
        raise ValueError(x)
    out = b"\x00" + name.encode() + b"\x00\x01" + bytes([1, len(extents)])
    for start, length in extents:
        out += num(start) + num(length)
    return out


def _tf_sliced_wide(d: Path) -> Path:
    """A (1, 2^28) float32 tensor saved as two column slices over a sparse 1 GB shard:
    one row is 1 GB, so a reader that assembles whole rows per chunk needs 1 GB for
    every 16 MB it scans."""
    cols = 1 << 28
    half = cols // 2
    part = 4 * half
    extents = [[(0, -1), (0, half)], [(0, -1), (half, half)]]
    slices = b"".join(b.pb(7, b"".join(b.pb(1, (b.pb(1, s) if s else b"") + (
        b.pb(2, n) if n != -1 else b"")) for s, n in ext)) for ext in extents)
    full = b.tf_entry(1, (1, cols), 0, 0, extra=slices)
    entries = [(b"w", full)]
    for i, ext in enumerate(extents):
        entries.append((_slice_key("w", list(ext)), b.tf_entry(1, (1, half), i * part, part)))
    b.tf_bundle(str(d / "ckpt"), [], entries=entries, data=b"")
    with open(d / "ckpt.data-00000-of-00001", "r+b") as fh:
        fh.truncate(2 * part)
    return d / "ckpt.index"


def _tf_graph(nodes: list[bytes]) -> bytes:
    return b"".join(b.pb(1, n) for n in nodes)


def _tf_with_graph(d: Path, graph: bytes) -> Path:
    """A bundle whose object graph is ``graph`` (written as TF's string scalar)."""
    from bnexporter.formats.sstable import crc32c, mask_crc

    n = len(graph)
    length = struct.pack("<I", n)
    body = struct.pack("<I", mask_crc(crc32c(length))) + graph
    raw = b.varint(n) + body
    data_crc = mask_crc(crc32c(body, crc32c(length)))
    tensors = _tf_bn()
    blob = bytearray()
    items = [(b"", b.tf_header())]
    for t in sorted(tensors, key=lambda t: t.key):
        rawt = t.array.astype("<f4").tobytes()
        items.append((t.key.encode(), b.tf_entry(1, t.array.shape, len(blob), len(rawt))))
        blob += rawt
    items.append((b"_CHECKPOINTABLE_OBJECT_GRAPH",
                  b.tf_entry(7, (), len(blob), len(raw), crc=data_crc)))
    blob += raw
    items.sort()
    (d / "ckpt.index").write_bytes(b.sstable(items))
    (d / "ckpt.data-00000-of-00001").write_bytes(bytes(blob))
    return d / "ckpt.index"


def _graph_chain(n: int) -> bytes:
    """Node i has one child, node i+1: breadth-first paths grow to length n."""
    nodes = []
    for i in range(n):
        node = b.pb(1, b.pb(1, i + 1) + b.pb(2, b"a")) if i + 1 < n else b""
        if i == n - 1:
            node += b.pb(2, b.pb(1, b"VARIABLE_VALUE") + b.pb(2, b"bn/BatchNorm/gamma")
                         + b.pb(3, b"bn/BatchNorm/gamma"))
        nodes.append(node)
    return _tf_graph(nodes)


def tf_cases() -> list[Case]:
    cases: list[Case] = []
    for prefix in _tf_prefixes()[:4]:
        index = Path(str(prefix) + ".index").read_bytes()
        shard = Path(str(prefix) + ".data-00000-of-00001")
        label = f"{prefix.parent.name}-{prefix.name}"
        for cut in _cuts(len(index)):
            cases.append(Case(f"tf/{label}-index-truncated-{cut:06d}", "tf",
                              lambda d, c=cut, p=prefix: _tf_cut(d, p, ".index", c)))
        if shard.exists():
            for cut in _cuts(shard.stat().st_size, 10):
                cases.append(Case(f"tf/{label}-shard-truncated-{cut:07d}", "tf",
                                  lambda d, c=cut, p=prefix: _tf_cut(
                                      d, p, ".data-00000-of-00001", c)))
    prefixes = _tf_prefixes()
    if prefixes:
        p0 = prefixes[0]
        cases.append(Case("tf/shard-missing", "tf", lambda d: _tf_drop_shard(d, p0),
                          reasons=("incomplete",)))
        cases.append(Case("tf/shard-is-fifo", "tf", lambda d: _tf_fifo_shard(d, p0),
                          timeout=HANG))
        cases.append(Case("tf/shard-path-given-index-truncated", "tf",
                          lambda d: Path(str(_tf_cut(d, p0, ".index", 100))[:-len(".index")]
                                         + ".data-00000-of-00001"),
                          error_file=p0.name + ".index"))
    E, T = b.tf_entry, b.TFTensor
    f4 = 1  # DT_FLOAT
    lies: dict[str, Callable[[Path], Path]] = {
        "header-missing": lambda d: _tfb(d, header=b""),
        "header-num-shards-0": lambda d: _tfb(d, header=b.tf_header(0)),
        "header-num-shards-1M": lambda d: _tfb(d, header=b.tf_header(1 << 20)),
        "header-num-shards-2^63": lambda d: _tfb(d, header=b.tf_header((1 << 63) - 1)),
        "header-endianness-7": lambda d: _tfb(d, header=b.tf_header(1, 7)),
        "header-bad-varint": lambda d: _tfb(d, header=b"\x08" + b"\xff" * 11),
        "entry-offset-past-shard": lambda d: _tfb(d, entries=[(b"x", E(f4, (4,), 1 << 20, 16))]),
        "entry-offset-2^62": lambda d: _tfb(d, entries=[(b"x", E(f4, (4,), 1 << 62, 16))]),
        "entry-offset-negative": lambda d: _tfb(d, entries=[(b"x", E(f4, (4,), -16, 16))]),
        "entry-size-2^62": lambda d: _tfb(d, entries=[(b"x", E(f4, (1 << 60,), 0, 1 << 62))]),
        "entry-shape-huge": lambda d: _tfb(d, entries=[(b"x", E(f4, (1 << 40, 1 << 40), 0, 16))]),
        "entry-shape-huge-empty": lambda d: _tfb(d, entries=[(b"x/kernel", E(f4, (1 << 40, 0),
                                                                              0, 0))]),
        "entry-shape-negative": lambda d: _tfb(d, entries=[(b"x", E(f4, (-1,), 0, 0))]),
        "entry-shape-65-dims": lambda d: _tfb(d, entries=[(b"x", E(f4, (1,) * 65, 0, 4))]),
        "entry-shard-5-of-1": lambda d: _tfb(d, entries=[(b"x", E(f4, (1,), 0, 4, shard=5))]),
        "entry-bad-varint": lambda d: _tfb(d, entries=[(b"x", b"\x08" + b"\xff" * 11)]),
        "entry-truncated-field": lambda d: _tfb(d, entries=[(b"x", b"\x12\x7f\x01")]),
        "entry-wire-type-group": lambda d: _tfb(d, entries=[(b"x", b"\x0b\x0c")]),
        "entry-field-zero": lambda d: _tfb(d, entries=[(b"x", b"\x00\x01")]),
        "entry-dtype-99": lambda d: _tfb(d, entries=[(b"x", E(99, (4,), 0, 16))]),
        "entry-size-mismatch": lambda d: _tfb(d, entries=[(b"x", E(f4, (4,), 0, 12))]),
        "entry-key-not-utf8": lambda d: _tfb(d, entries=[(b"\xff\xfe", E(f4, (1,), 0, 4))]),
        "entry-unknown-rank": lambda d: _tfb(d, entries=[(b"x", b.pb(1, 1) + b.pb(2, b.pb(3, 1)))]),
        "slice-key-garbage": lambda d: _tfb(d, entries=[(b"\x00w\x00\x01\x02\xff\xff", E(f4, (1,),
                                                                                          0, 4))]),
        "slice-without-tensor": lambda d: _tfb(d, entries=[(_slice_key("w", [(0, 1)]),
                                                             E(f4, (1,), 0, 4))]),
        "slice-outside-shape": lambda d: _tfb(d, entries=[
            (b"w", E(f4, (2,), 0, 0, extra=b.pb(7, b.pb(1, b.pb(1, 5) + b.pb(2, 1))))),
            (_slice_key("w", [(5, 1)]), E(f4, (1,), 0, 4))]),
        "slice-100k-extents": lambda d: _tfb(d, entries=[
            (b"w", E(f4, (2,), 0, 0, extra=b.pb(7, b.pb(1, b"") * 100_000)))]),
        "sliced-wide-row-sparse-1GB": _tf_sliced_wide,
        "duplicate-extents-alias-20GB": lambda d: _tfb(
            d, [T("big", np.ones(1 << 20, "f4"))],
            entries=[(b"k%05d" % i, E(f4, (1 << 20,), 0, 4 << 20)) for i in range(5_000)]),
        "graph-chain-50k": lambda d: _tf_with_graph(d, _graph_chain(50_000)),
        "graph-cycle": lambda d: _tf_with_graph(d, _tf_graph([
            b.pb(1, b.pb(1, 1) + b.pb(2, b"a")), b.pb(1, b.pb(1, 0) + b.pb(2, b"b"))])),
        "graph-dangling-child": lambda d: _tf_with_graph(d, _tf_graph([
            b.pb(1, b.pb(1, 99) + b.pb(2, b"a"))])),
        "graph-garbage": lambda d: _tf_with_graph(d, _rand(3, 500)),
        "graph-empty": lambda d: _tf_with_graph(d, b""),
        "block-restarts-huge": lambda d: _tf_raw_index(d, _bad_restart_index()),
        "footer-handle-past-eof": lambda d: _tf_raw_index(
            d, (b.varint(0) + b.varint(1 << 40) + b.varint(0) + b.varint(1 << 40)).ljust(40, b"\0")
            + b.sstable([])[-8:]),
        "index-random-with-magic": lambda d: _tf_raw_index(d, _rand(11, 4000)
                                                           + b.sstable([])[-8:]),
        "state-file-points-outside": lambda d: _tf_state(d, "../../../../etc/ckpt"),
        "state-file-points-at-fifo": _tf_state_fifo,
        "state-file-is-fifo": lambda d: _fifo(d, "checkpoint"),
        "state-file-binary": lambda d: _tf_state(d, "\udcff\x00" * 10),
        "state-file-huge": lambda d: _write(d / "checkpoint", b"model_checkpoint_path: \""
                                             + b"a" * (32 << 20) + b"\"\n"),
    }
    either = {"entry-dtype-99", "entry-shape-huge-empty", "graph-cycle", "graph-chain-50k",
              "duplicate-extents-alias-20GB", "sliced-wide-row-sparse-1GB", "graph-empty"}
    hangs = {"state-file-points-at-fifo", "state-file-is-fifo"}
    bombs = {"duplicate-extents-alias-20GB", "graph-chain-50k"}
    for name, make in lies.items():
        cases.append(Case(f"tf/{name}", "tf", make,
                          expect="either" if name in either else "error",
                          timeout=HANG if name in hangs else BOMB if name in bombs else None))
    for label, fill in (("nan", np.nan), ("inf", np.inf)):
        cases.append(Case(f"tf/all-{label}", "tf", lambda d, f=fill: _tfb(d, _tf_bn(f)),
                          expect="ok", nonfinite=248))
    if prefixes:
        cases.append(Case("tf/real-all-nan", "tf", lambda d: _tf_fill_real(d, prefixes[0]),
                          expect="ok", nonfinite=10))
    return cases


def _tf_cut(d: Path, prefix: Path, suffix: str, cut: int) -> Path:
    p = _copy_bundle(prefix, d)
    target = Path(str(p) + suffix)
    data = target.read_bytes()
    target.write_bytes(data[:cut])
    return Path(str(p) + ".index")


def _tf_drop_shard(d: Path, prefix: Path) -> Path:
    p = _copy_bundle(prefix, d)
    Path(str(p) + ".data-00000-of-00001").unlink()
    return Path(str(p) + ".index")


def _tf_fifo_shard(d: Path, prefix: Path) -> Path:
    p = _copy_bundle(prefix, d)
    shard = Path(str(p) + ".data-00000-of-00001")
    shard.unlink()
    os.mkfifo(shard)
    return Path(str(p) + ".index")


def _tf_raw_index(d: Path, data: bytes) -> Path:
    (d / "ckpt.index").write_bytes(data)
    (d / "ckpt.data-00000-of-00001").write_bytes(b"")
    return d / "ckpt.index"


def _bad_restart_index() -> bytes:
    return _table_with_block(b"\x00" * 8 + struct.pack("<I", 0x7FFFFFFF))


def _table_with_block(block: bytes) -> bytes:
    from bnexporter.formats.sstable import MAGIC_BYTES, crc32c, mask_crc

    trailer = b"\0" + struct.pack("<I", mask_crc(crc32c(block + b"\0")))
    handles = (b.varint(0) + b.varint(len(block)) + b.varint(0) + b.varint(len(block)))
    return block + trailer + handles.ljust(40, b"\0") + MAGIC_BYTES


def _tf_state(d: Path, target: str) -> Path:
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{target}"\n', errors="surrogateescape")
    return d


def _tf_state_fifo(d: Path) -> Path:
    os.mkfifo(d / "ckpt-1.index")
    return _tf_state(d, "ckpt-1")


def _tf_fill_real(d: Path, prefix: Path) -> Path:
    from bnexporter.formats.tf_bundle import load_index

    p = _copy_bundle(prefix, d)
    bundle = load_index(str(p))
    shard = Path(str(p) + ".data-00000-of-00001")
    data = bytearray(shard.read_bytes())
    for e in bundle.entries.values():
        if e.dtype == 1 and e.size and not e.slices:
            data[e.offset:e.offset + e.size] = np.full(e.size // 4, np.nan, "<f4").tobytes()
    shard.write_bytes(bytes(data))
    return Path(str(p) + ".index")


# -- everything -----------------------------------------------------------------------------------


def plan() -> list[Case]:
    cases = (generic_cases() + safetensors_cases() + npz_cases() + torch_cases() + h5_cases()
             + keras_cases() + tf_cases())
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"duplicate case ids: {sorted(dupes)}")
    return cases


def build(out: Path, cases: list[Case] | None = None) -> list[dict]:
    """Write every case under ``out``; return the manifest (also saved as manifest.json)."""
    cases = plan() if cases is None else cases
    manifest = []
    for case in cases:
        d = out / case.folder
        d.mkdir(parents=True, exist_ok=True)
        path = case.make(d)
        error_file = str(d / case.error_file) if case.error_file else str(path)
        if case.fmt == "tf" and not case.error_file:
            error_file = str(d)  # any file of the bundle may be the one named
        manifest.append({"id": case.id, "format": case.fmt, "path": str(path),
                         "expect": case.expect, "reasons": list(case.reasons),
                         "nonfinite": case.nonfinite, "error_file": error_file,
                         "marker": _marker(d), "timeout": case.timeout,
                         "max_nonfinite": case.max_nonfinite, "forbid": list(case.forbid)})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="folder to write the corpus into")
    ap.add_argument("--list", action="store_true", help="print case ids and exit")
    args = ap.parse_args()
    if args.list or not args.out:
        for case in plan():
            print(case.id)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build(out)
    counts: dict[str, int] = {}
    for m in manifest:
        counts[m["format"]] = counts.get(m["format"], 0) + 1
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
