"""npz members and zip member location: mutated archives and lying .npy headers."""

from __future__ import annotations

import io
import zipfile

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import target_npz, target_zipmember
from tests.hostile import builders as b

shapes = st.one_of(
    st.lists(st.one_of(st.integers(0, 9), st.sampled_from(fs.INTERESTING),
                       st.integers(-3, -1)), max_size=4).map(
        lambda dims: "(" + "".join(f"{d}, " for d in dims) + ")"),
    st.sampled_from(["'x'", "None", "(1.5,)", "[]", "((1,),)", "(" * 50 + ")" * 50]))
descrs = st.sampled_from(["<f4", ">f4", "<f2", "|u1", "<i8", "|b1", "|O", "<U3", "<M8[s]",
                          "<c8", "|V4", "zz", "<f16"])


def _npz(member: bytes, name: str = "bn.weight.npy", deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
                         ) as zf:
        zf.writestr(name, member)
    return buf.getvalue()


@fs.fuzz_settings(300)
@given(descrs, shapes, st.binary(max_size=64), st.sampled_from([(1, 0), (2, 0), (3, 0), (4, 0)]),
       st.booleans(), st.booleans())
def test_lying_npy_headers(descr, shape, data, version, fortran, deflate):
    target_npz(_npz(b.npy_bytes(descr, shape, data, version, fortran), deflate=deflate))


@fs.fuzz_settings(200)
@given(fs.mutants(fs.npz_seeds()))
def test_mutated_npz(mutant):
    target_npz(mutant.data)


@fs.fuzz_settings(400)
@given(fs.mutants(fs.zip_seeds(), max_edits=4))
def test_mutated_zip_directories(mutant):
    target_zipmember(mutant.data)


member = st.builds(
    b.ZipMember, name=st.sampled_from(["archive/data.pkl", "archive/data/0", "a", "", "a/b/"]),
    data=st.binary(max_size=40), method=st.sampled_from([0, 0, 8, 12]),
    file_size=st.one_of(st.none(), st.sampled_from(fs.INTERESTING)),
    local_name=st.one_of(st.none(), st.just("other")),
    local_extra=st.sampled_from([b"", b"\x01\x00\x08\x00" + bytes(8), b"\xff" * 5]),
    central_extra=st.sampled_from([b"", b"\x01\x00\x18\x00" + bytes(24), b"\x01\x00\x04\x00"]),
    central_offset=st.one_of(st.none(), st.integers(0, 300), st.sampled_from(fs.INTERESTING)),
    central_csize=st.one_of(st.none(), st.integers(0, 64), st.sampled_from(fs.INTERESTING)),
    central_usize=st.one_of(st.none(), st.sampled_from(fs.INTERESTING)),
    flags=st.sampled_from([0, 0, 1, 8, 0x800]))


@fs.fuzz_settings(400)
@given(st.lists(member, max_size=5), st.one_of(st.none(), st.sampled_from(fs.INTERESTING)),
       st.one_of(st.none(), st.integers(0, 400)), st.booleans(), st.binary(max_size=30))
def test_lying_zip_headers(members, count, cd_offset, zip64, comment):
    try:
        data = b.zip_bytes(members, eocd_count=count, cd_offset=cd_offset, zip64=zip64,
                           comment=comment)
    except (OverflowError, ValueError, __import__("struct").error):
        return  # the writer itself cannot express this combination
    target_zipmember(data)
