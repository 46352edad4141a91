"""Hostile torch pickles: nothing they name may run, and limits hold.

Each payload is first shown to work: plain ``pickle.loads`` in a subprocess
creates the marker file. Then the reader must refuse it, name the global, and
the marker must never appear.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import torch_pickle
from bnexporter.formats.torch_legacy import TorchLegacyReader
from bnexporter.formats.torch_zip import TorchZipReader
from tests.formats.test_torch_reader import (
    T,
    bn_dict,
    pickle_obj,
    torch_pickle_bytes,
    write_torch_zip,
)


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _call(module: str, name: str, *args: str) -> bytes:
    """GLOBAL + args tuple + REDUCE."""
    return f"c{module}\n{name}\n".encode() + b"(" + b"".join(_s(a) for a in args) + b"tR"


def payloads(marker: str) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (pickle, global the refusal must name, whether plain pickle runs it)."""
    cmd = f"touch {marker}"
    return {
        "os.system via REDUCE": (
            b"\x80\x02}(" + _s("x") + _call("os", "system", cmd) + b"u.", "os.system", True),
        "builtins.eval": (
            b"\x80\x02" + _call("builtins", "eval", f"__import__('os').system({cmd!r})")
            + b".", "builtins.eval", True),
        "posix.system via STACK_GLOBAL": (
            b"\x80\x04" + _s("posix") + _s("system") + b"\x93(" + _s(cmd) + b"tR.",
            "posix.system", True),
        "BUILD __setstate__ gadget": (
            b"\x80\x02cargparse\nNamespace\n)\x81}" + _s("__setstate__")
            + b"cos\nsystem\nsb" + _s(cmd) + b"b.", "os.system", True),
        "NEWOBJ subprocess.Popen": (
            b"\x80\x02csubprocess\nPopen\n(" + _s("sh") + b"t\x81.", "subprocess.Popen",
            False),
        "INST opcode": (f"(S'{cmd}'\nios\nsystem\n.".encode(), "os.system", True),
        "OBJ opcode": (b"(cos\nsystem\n" + _s(cmd) + b"o.", "os.system", True),
        "hyper_parameters (Namespace state)": (
            b"\x80\x02}(" + _s("hyper_parameters") + b"cargparse\nNamespace\n)\x81}("
            + _s("lr") + b"G?\xb9\x99\x99\x99\x99\x99\x9a" + _s("callback")
            + _call("posix", "system", cmd) + b"ub" + _s("global_step") + b"K\x05u.",
            "posix.system", True),
        "dotted name through another module": (
            b"\x80\x04" + _s("pathlib") + _s("os.system") + b"\x93(" + _s(cmd) + b"tR.",
            "pathlib.os.system", True),
        "builtins.getattr": (
            b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\ndict\n" + _s("fromkeys") + b"tR.",
            "builtins.getattr", False),
        "__import__ (py2 name)": (
            b"\x80\x02" + _call("__builtin__", "__import__", "os") + b".",
            "builtins.__import__", False),
        "nt.system": (b"\x80\x02" + _call("nt", "system", cmd) + b".", "nt.system", False),
        "torch.hub.load": (b"\x80\x02" + _call("torch.hub", "load", "x/y", "m") + b".",
                           "torch.hub.load", False),
    }


def plain_pickle_runs(tmp_path, data: bytes, marker: str, pythonpath: str = "") -> bool:
    src = tmp_path / "payload.pkl"
    src.write_bytes(data)
    code = ("import pickle, sys\ntry:\n    pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "except Exception:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": pythonpath}
    subprocess.run([sys.executable, "-c", code, str(src)], env=env, cwd=tmp_path,
                   timeout=60, check=True)
    ran = os.path.exists(marker)
    if ran:
        os.remove(marker)
    return ran


@pytest.mark.parametrize("name", list(payloads("M")))
def test_payload_runs_under_plain_pickle_but_is_refused_by_name(tmp_path, name):
    marker = str(tmp_path / "pwned")
    data, global_name, runs = payloads(marker)[name]
    if runs:
        assert plain_pickle_runs(tmp_path, data, marker), "payload should be live"
    path = write_torch_zip(tmp_path / "evil.pt", data_pkl=data)
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(path)
    assert exc.value.reason == "forbidden"
    assert f"forbidden global {global_name}" in str(exc.value)
    with pytest.raises(torch_pickle.Refused):
        torch_pickle.load(data)
    assert not os.path.exists(marker)


def test_payload_after_real_tensors_in_a_lightning_checkpoint(tmp_path):
    marker = str(tmp_path / "pwned")
    hparams = (b"cargparse\nNamespace\n)\x81}(" + _s("cb")
               + _call("posix", "system", f"touch {marker}") + b"ub")
    obj = {"state_dict": {f"model.{k}": v for k, v in bn_dict().items()}, "global_step": 3}
    storages: dict[str, bytes] = {}
    body = pickle_obj(obj, storages)               # ends with SETITEMS: add one more item
    data = b"\x80\x02" + body[:-1] + _s("hyper_parameters") + hparams + b"u."
    path = write_torch_zip(tmp_path / "evil.ckpt", data_pkl=data, extra={
        f"data/{k}": v for k, v in storages.items()})
    with pytest.raises(CheckpointError, match=r"forbidden global posix\.system"):
        TorchZipReader(path)
    assert not os.path.exists(marker)


def test_payload_in_a_legacy_file_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    head = b"".join(pickle.dumps(v, protocol=2) for v in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
    data, _, _ = payloads(marker)["os.system via REDUCE"]
    path = tmp_path / "legacy.pt"
    path.write_bytes(head + data + pickle.dumps([], protocol=2))
    with pytest.raises(CheckpointError) as exc:
        TorchLegacyReader(str(path))
    assert exc.value.reason == "forbidden" and "os.system" in str(exc.value)
    assert not os.path.exists(marker)


EVIL_MODULE = """
import os
CMD = {cmd!r}
class EvilState:
    def __setstate__(self, state):
        os.system(CMD)
class EvilNew:
    def __new__(cls, *args):
        os.system(CMD)
        return object.__new__(cls)
class EvilInit:
    def __init__(self, *args):
        os.system(CMD)
os.system(CMD)   # even importing it is enough
"""


@pytest.mark.parametrize(("label", "body"), [
    ("BUILD on a custom class", b"cevilmod\nEvilState\n)\x81" + _s("x") + b"b"),
    ("NEWOBJ on a custom class", b"cevilmod\nEvilNew\n(" + _s("x") + b"t\x81"),
    ("REDUCE on a custom class", b"cevilmod\nEvilInit\n(" + _s("x") + b"tR"),
])
def test_unknown_classes_are_recorded_never_imported_or_run(tmp_path, monkeypatch, label,
                                                            body):
    marker = str(tmp_path / "pwned")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "evilmod.py").write_text(textwrap.dedent(EVIL_MODULE.format(cmd=f"touch {marker}")))
    data = b"\x80\x02}(" + _s("hyper_parameters") + body + b"u."
    assert plain_pickle_runs(tmp_path, data, marker, str(pkg)), label
    monkeypatch.syspath_prepend(str(pkg))
    obj = torch_pickle.load(data)
    hp = obj["hyper_parameters"]
    assert isinstance(hp, torch_pickle.Opaque) and hp.global_module == "evilmod"
    assert "evilmod" not in sys.modules
    assert not os.path.exists(marker)


def test_build_on_a_stand_in_is_refused():
    data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + _s("__defaults__")
            + b"Nsb.")
    with pytest.raises(torch_pickle.Refused) as exc:
        torch_pickle.load(data)
    assert exc.value.reason == "forbidden"
    state = b"(N}" + _s("__defaults__") + b"Nst"   # slot-state form
    with pytest.raises(torch_pickle.Refused):
        torch_pickle.load(b"\x80\x02ccollections\nOrderedDict\n" + state + b"b.")


def test_non_storage_persistent_ids_are_refused(tmp_path):
    data = b"\x80\x02(" + _s("module") + _s("x") + b"tQ."
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(write_torch_zip(tmp_path / "p.pt", data_pkl=data))
    assert exc.value.reason == "forbidden" and "persistent id" in str(exc.value)
    with pytest.raises(torch_pickle.Refused):
        torch_pickle.load(b"\x80\x02" + _s("storage") + b"Q.")


@pytest.mark.parametrize("data", [
    b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s.",       # deep tuple as a dict key
    b"\x80\x04" + b")" + b"\x85" * 200_000 + b"\x85(\x91.",        # ... inside a frozenset
])
def test_deep_tuples_are_refused_before_hashing(data):
    # plain pickle.loads would overflow the C stack (segfault) hashing these
    with pytest.raises(torch_pickle.Refused) as exc:
        torch_pickle.load(data)
    assert exc.value.reason == "too_large"


def test_deeply_nested_containers_give_a_clean_error(tmp_path):
    depth = 200_000
    lists = b"\x80\x02" + b"(" * depth + b"]" + b"l" * depth + b"."
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(write_torch_zip(tmp_path / "deep.pt", data_pkl=lists))
    assert exc.value.reason == "too_large" and "nest" in str(exc.value)
    # a chain of opaque objects, each holding the next in its state
    chain = b"\x80\x02" + b"".join(b"cx\nY\n)\x81" for _ in range(5000)) + b"b" * 4999 + b"."
    with pytest.raises(CheckpointError, match="nest"):
        TorchZipReader(write_torch_zip(tmp_path / "chain.pt", data_pkl=chain))


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x80\x02]r\xff\xff\xff\x7f.", "corrupt"),                 # memo index 2**31 - 1
    (b"\x80\x02B\xff\xff\xff\x7fabc.", "truncated"),            # BINBYTES claims 2 GiB
    (b"\x80\x02\x82\x01.", "forbidden"),                        # EXT1
    (b"\x80\x05\x97.", "forbidden"),                            # NEXT_BUFFER
    (b"\x80\x02h\x05.", "corrupt"),                             # memo read before write
    (b"\x80\x02]", "truncated"),                                # no STOP
    (b"", "truncated"),
])
def test_malformed_pickles_are_clean_errors(data, reason):
    with pytest.raises(torch_pickle.Refused) as exc:
        torch_pickle.load(data)
    assert exc.value.reason == reason, exc.value.cause


def test_pickle_size_limit(monkeypatch, tmp_path):
    data, storages = torch_pickle_bytes(bn_dict())
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", len(data) - 1)
    path = write_torch_zip(tmp_path / "big.pt", data_pkl=data, extra={
        f"data/{k}": v for k, v in storages.items()})
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(path)
    assert exc.value.reason == "too_large"


def test_legit_data_globals_still_load():
    """Numpy scalars, sets, bytes and devices decode to plain values, nothing else."""
    np_scalar = (b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(" + _s("f8")
                 + b"\x89\x88tR(K\x03" + _s("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
                 + b"C\x08" + struct.pack("<d", 2.5) + b"tR")
    data = (b"\x80\x02}(" + _s("np") + np_scalar + _s("set") + b"c__builtin__\nset\n]("
            + _s("a") + _s("b") + b"e\x85R" + _s("bytes") + _call("_codecs", "encode", "\xff",
                                                               "latin1")
            + _s("dev") + _call("torch", "device", "cuda") + b"u.")
    obj = torch_pickle.load(data)
    assert obj == {"np": 2.5, "set": {"a", "b"}, "bytes": b"\xff", "dev": "cuda"}
    with pytest.raises(torch_pickle.Refused, match="encoding"):
        torch_pickle.load(b"\x80\x02" + _call("_codecs", "encode", "x", "zlib_codec") + b".")
    with pytest.raises(torch_pickle.Refused):
        torch_pickle.load(b"\x80\x02cbuiltins\nbytearray\n(J\x00\x00\x00\x40tR.")


def test_shared_storage_with_conflicting_types_is_refused(tmp_path):
    a = T("0", np.zeros(4, np.float32))
    b = T("0", np.zeros(4, np.float32), dtype="float64")
    with pytest.raises(CheckpointError, match="described twice"):
        TorchZipReader(write_torch_zip(tmp_path / "c.pt", {"a": a, "b": b}))


def test_aliasing_and_stride_zero_amplification_is_refused(tmp_path):
    w = T("w", np.zeros(1 << 16, np.float32))             # 256 KiB, named 5000 times
    aliases = {f"t{i}": w for i in range(5000)}           # ~1.3 GB declared
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(write_torch_zip(tmp_path / "alias.pt", aliases))
    assert exc.value.reason == "too_large" and "amplification" in str(exc.value)
    huge = {"w": T("0", np.zeros(16, np.float32), size=(1 << 31, 1 << 31), stride=(0, 0))}
    with pytest.raises(CheckpointError, match="amplification"):
        TorchZipReader(write_torch_zip(tmp_path / "s0.pt", huge))
    tied = {"a": w, "b": w, **bn_dict()}                  # ordinary tied weights are fine
    with TorchZipReader(write_torch_zip(tmp_path / "tied.pt", tied)) as r:
        assert {"a", "b"} <= {t.name for t in r.tensors()}


def test_overlong_key_paths_are_skipped_not_built(tmp_path):
    key = "k" * 3000
    obj = {"state_dict": bn_dict(), "extra": {key: {key: {"t": T("x", np.ones(2, np.float32))}}}}
    with TorchZipReader(write_torch_zip(tmp_path / "long.pt", obj)) as r:
        assert {t.name for t in r.tensors()} == set(bn_dict())
        assert any("longer than 4096" in n for n in r.meta.notes)


def test_legacy_storage_count_must_match_the_pickle(tmp_path):
    head = b"".join(pickle.dumps(v, protocol=2) for v in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
    body = (b"\x80\x02}(" + _s("w") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + _s("storage")
            + b"ctorch\nFloatStorage\n" + _s("7") + _s("cpu") + b"K\x04NtQK\x00K\x04\x85K\x01"
            + b"\x85\x89NtRu.")
    keys = pickle.dumps(["7"], protocol=2)
    for count, ok in ((4, True), (3, False)):
        path = tmp_path / f"l{count}.pt"
        path.write_bytes(head + body + keys + struct.pack("<q", count) + b"\0" * 16)
        if ok:
            with TorchLegacyReader(str(path)) as r:
                assert r.read_array("w").tolist() == [0.0] * 4
        else:
            with pytest.raises(CheckpointError, match="holds 3 elements, the pickle says 4"):
                TorchLegacyReader(str(path))
