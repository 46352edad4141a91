"""TorchScript archives and torch.export ``.pt2``: mutated real fixtures, as bytes, then
member by member behind valid zip CRCs (data.pkl, code/, weights config, program,
records), then the .pt2 weights config field by field with hostile JSON values."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import target_torch_export, target_torchscript

TS = fs.torchscript_seeds()
PT2 = fs.pt2_seeds()


def _members(raw: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [(i, zf.read(i)) for i in zf.infolist()]


def _zip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in members:
            zf.writestr(info.filename, data, info.compress_type)
    return buf.getvalue()


def _pick(members: list[tuple[zipfile.ZipInfo, bytes]], pick: int, kinds: tuple[str, ...]
          ) -> int:
    """Index of a member whose name contains one of ``kinds`` (the interesting ones more
    often than the hundreds of storage records)."""
    hits = [i for i, (info, _) in enumerate(members) if any(k in info.filename for k in kinds)]
    return hits[pick % len(hits)] if hits else pick % len(members)


_edits = st.lists(fs._edit, min_size=1, max_size=4)


@fs.fuzz_settings(40, shrink=False)
@given(fs.mutants(TS, max_edits=4))
def test_mutated_torchscript_bytes(mutant):
    target_torchscript(mutant.data)


@fs.fuzz_settings(40, shrink=False)
@given(fs.mutants(PT2, max_edits=4))
def test_mutated_pt2_bytes(mutant):
    target_torch_export(mutant.data)


def _edit_member(archive: bytes, kind: str, pick: int, edits, deflate: bool) -> bytes:
    """``archive`` with one member of ``kind`` edited, re-zipped with valid CRCs."""
    members = _members(archive)
    i = _pick(members, pick, (kind,))
    info, data = members[i]
    if deflate:
        info.compress_type = zipfile.ZIP_DEFLATED
    members[i] = (info, fs.apply_edits(data or b"\0", edits))
    return _zip(members)


_TS_KINDS = ("data.pkl", "/code/", "/data/", "constants.pkl", "version", "byteorder")


@fs.fuzz_settings(80, shrink=False)
@given(st.integers(0, len(TS) - 1), st.sampled_from(_TS_KINDS), st.integers(0, 1 << 16),
       _edits, st.booleans())
def test_mutated_torchscript_members(which, kind, pick, edits, deflate):
    """One member edited, the archive re-zipped with valid CRCs (optionally deflated)."""
    target_torchscript(_edit_member(TS[which], kind, pick, edits, deflate))


_PT2_KINDS = ("weights_config.json", "models/", "weights/weight_", "byteorder",
              "archive_format")


@fs.fuzz_settings(80, shrink=False)
@given(st.integers(0, len(PT2) - 1), st.sampled_from(_PT2_KINDS), st.integers(0, 1 << 16),
       _edits, st.booleans())
def test_mutated_pt2_members(which, kind, pick, edits, deflate):
    target_torch_export(_edit_member(PT2[which], kind, pick, edits, deflate))


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(fs.INTERESTING),
              st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=8),
              st.sampled_from(["weight_0", "../weight_0", "", "a" * 5000, "s0"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["as_int", "as_expr", "x"]),
                                            inner, max_size=2)),
    max_leaves=6)
_FIELDS = (("tensor_meta", "sizes"), ("tensor_meta", "strides"),
           ("tensor_meta", "storage_offset"), ("tensor_meta", "dtype"),
           ("tensor_meta", "layout"), ("tensor_meta",), ("path_name",), ("use_pickle",), ())


def _set(doc: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    if isinstance(doc, dict):
        doc[path[0]] = _set(doc.get(path[0]), path[1:], value)
    return doc


@fs.fuzz_settings(120, shrink=False)
@given(st.integers(0, len(PT2) - 1), st.integers(0, 1 << 16), st.sampled_from(_FIELDS),
       _JSON, st.integers(0, 3))
def test_hostile_pt2_config_values(which, pick, field, value, extra):
    """One weight's field (or the whole entry) replaced with a hostile JSON value; a few
    more entries with deep dotted names pointing at the same record."""
    members = _members(PT2[which])
    i = _pick(members, 0, ("weights_config.json",))
    info, data = members[i]
    doc = json.loads(data)
    names = sorted(doc["config"])
    name = names[pick % len(names)]
    doc["config"][name] = _set(doc["config"][name], field, value)
    for k in range(extra):
        doc["config"][f"x{k}." + "a." * (pick % 300) + "w"] = doc["config"][names[0]]
    members[i] = (info, json.dumps(doc).encode())
    target_torch_export(_zip(members))
