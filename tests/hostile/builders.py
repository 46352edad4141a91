"""Byte-level writers for checkpoint formats, able to lie on purpose.

The hostile corpus and the fuzzers need files that real frameworks never
write (a zip whose local header disagrees with its central directory, a torch
pickle with absurd strides, a TF index whose entry points past its shard), so
each format is written here from its documented layout, with every field
overridable. Nothing here imports torch or TensorFlow; the torch writers were
checked once against ``torch.load`` (see tests/fuzz/README.md).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexporter.formats.sstable import MAGIC_BYTES, crc32c, mask_crc

# -- protobuf -------------------------------------------------------------------


def varint(n: int) -> bytes:
    """Unsigned varint; negative numbers as 10-byte two's complement (like int64)."""
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb(number: int, value: int | bytes) -> bytes:
    """One protobuf field: an int becomes a varint field, bytes a length-delimited one."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


# -- SSTable / TF bundle -----------------------------------------------------------


def sstable_block(items: Sequence[tuple[bytes, bytes]], restart_every: int = 16) -> bytes:
    """A block with prefix-compressed keys and a restart point every ``restart_every``."""
    body = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(items):
        if i % restart_every == 0:
            restarts.append(len(body))
            shared = 0
        else:
            shared = 0
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        body += varint(shared) + varint(len(key) - shared) + varint(len(value))
        body += key[shared:] + value
        prev = key
    if not restarts:
        restarts = [0]
    return bytes(body) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack(
        "<I", len(restarts))


def _trailer(block: bytes, kind: int = 0) -> bytes:
    return bytes([kind]) + struct.pack("<I", mask_crc(crc32c(block + bytes([kind]))))


def sstable(items: Sequence[tuple[bytes, bytes]], per_block: int = 64) -> bytes:
    """A whole table: data blocks of ``per_block`` entries, metaindex, index, footer."""
    out = bytearray()
    index = []
    chunks = [items[i:i + per_block] for i in range(0, len(items), per_block)] or [[]]
    for chunk in chunks:
        block = sstable_block(chunk)
        handle = varint(len(out)) + varint(len(block))
        out += block + _trailer(block)
        index.append((chunk[-1][0] if chunk else b"", handle))
    meta = sstable_block([])
    meta_handle = varint(len(out)) + varint(len(meta))
    out += meta + _trailer(meta)
    iblock = sstable_block(index, restart_every=1)
    index_handle = varint(len(out)) + varint(len(iblock))
    out += iblock + _trailer(iblock)
    out += (meta_handle + index_handle).ljust(40, b"\0") + MAGIC_BYTES
    return bytes(out)


TF_DTYPES = {"float32": 1, "float64": 2, "int32": 3, "int64": 9, "float16": 19,
             "bfloat16": 14, "string": 7}


def tf_entry(dtype: int, shape: Iterable[int], offset: int, size: int, shard: int = 0,
             crc: int | None = None, extra: bytes = b"") -> bytes:
    """A BundleEntryProto; any field may lie."""
    dims = b"".join(pb(2, pb(1, d)) for d in shape)
    out = pb(1, dtype) + pb(2, dims) + pb(3, shard) + pb(4, offset) + pb(5, size)
    if crc is not None:
        out += varint(6 << 3 | 5) + struct.pack("<I", crc)
    return out + extra


def tf_header(num_shards: int = 1, endianness: int = 0) -> bytes:
    return pb(1, num_shards) + pb(2, endianness) + pb(3, pb(1, 1))


@dataclass
class TFTensor:
    key: str
    array: np.ndarray


def tf_bundle(prefix: str, tensors: Sequence[TFTensor],
              entries: Sequence[tuple[bytes, bytes]] = (), header: bytes | None = None,
              data: bytes | None = None) -> None:
    """Write ``prefix.index`` + one data shard (TF1-style names: no object graph)."""
    blob = bytearray()
    items: list[tuple[bytes, bytes]] = [(b"", header if header is not None else tf_header())]
    for t in sorted(tensors, key=lambda t: t.key):
        raw = np.ascontiguousarray(t.array).astype(t.array.dtype.newbyteorder("<")).tobytes()
        code = TF_DTYPES[t.array.dtype.name]
        items.append((t.key.encode(), tf_entry(code, t.array.shape, len(blob), len(raw),
                                               crc=mask_crc(crc32c(raw)))))
        blob += raw
    items += list(entries)
    items.sort(key=lambda kv: kv[0])
    with open(prefix + ".index", "wb") as fh:
        fh.write(sstable(items))
    with open(prefix + ".data-00000-of-00001", "wb") as fh:
        fh.write(bytes(blob) if data is None else data)


# -- safetensors / npy ----------------------------------------------------------------

ST_CODES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64",
            "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None
                      ) -> bytes:
    header: dict = {}
    blob = bytearray()
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": ST_CODES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    return safetensors_raw(json.dumps(header).encode(), bytes(blob))


def safetensors_raw(header: bytes, payload: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file from an already-serialised header (which may be anything)."""
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + payload


def npy_bytes(descr: str, shape: str, data: bytes, version: tuple[int, int] = (1, 0),
              fortran: bool = False, raw_header: str | None = None) -> bytes:
    """A ``.npy`` member whose header says whatever it is told (``shape`` is source text)."""
    text = raw_header if raw_header is not None else (
        f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}")
    hlen_size = 2 if version[0] == 1 else 4
    pad = -(10 + len(text) + 1 + (hlen_size - 2)) % 64
    text = text + " " * pad + "\n"
    head = b"\x93NUMPY" + bytes(version)
    head += struct.pack("<H" if hlen_size == 2 else "<I", len(text))
    return head + text.encode("latin1") + data


# -- zip --------------------------------------------------------------------------------


@dataclass
class ZipMember:
    """One member; ``local_*`` / ``central_*`` overrides make the two headers disagree."""

    name: str
    data: bytes                      # bytes as stored (already compressed when method=8)
    method: int = 0
    file_size: int | None = None     # uncompressed size (default: len(data) if stored)
    crc: int | None = None
    local_name: str | None = None
    local_extra: bytes = b""
    central_extra: bytes = b""
    central_offset: int | None = None  # header offset written in the central directory
    central_csize: int | None = None
    central_usize: int | None = None
    flags: int = 0
    external_attr: int = 0


def deflate(data: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def deflate_zeros(total: int, level: int = 9) -> tuple[bytes, int]:
    """Raw deflate of ``total`` zero bytes without holding them; returns (stream, crc)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    out = bytearray()
    crc = 0
    left = total
    while left:
        piece = block[:min(left, len(block))]
        out += c.compress(piece)
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    out += c.flush()
    return bytes(out), crc


def zip_bytes(members: Sequence[ZipMember], eocd_count: int | None = None,
              cd_offset: int | None = None, cd_size: int | None = None,
              comment: bytes = b"", zip64: bool = False) -> bytes:
    """A zip archive laid out by hand, so every header field can be made to lie."""
    out = bytearray()
    central = bytearray()
    for m in members:
        offset = len(out)
        usize = m.file_size if m.file_size is not None else len(m.data)
        crc = m.crc if m.crc is not None else (zlib.crc32(m.data) if m.method == 0 else 0)
        lname = (m.local_name if m.local_name is not None else m.name).encode()
        cname = m.name.encode()
        big = zip64 or usize >= 0xFFFFFFFF or len(m.data) >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
        lsz = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(m.data), usize)
        lextra = (struct.pack("<HHQQ", 1, 16, usize, len(m.data)) if big else b"") + m.local_extra
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45 if big else 20, m.flags, m.method,
                           0, 0x21, crc, lsz[0], lsz[1], len(lname), len(lextra))
        out += lname + lextra + m.data
        csize = m.central_csize if m.central_csize is not None else len(m.data)
        cusize = m.central_usize if m.central_usize is not None else usize
        hofs = m.central_offset if m.central_offset is not None else offset
        cextra = m.central_extra
        cbig = big or max(cusize, csize, hofs) >= 0xFFFFFFFF
        if cbig:
            cextra = struct.pack("<HHQQQ", 1, 24, cusize, csize, hofs) + cextra
            cusize_f = csize_f = hofs_f = 0xFFFFFFFF
        else:
            cusize_f, csize_f, hofs_f = cusize, csize, hofs
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45 if cbig else 20,
                               45 if cbig else 20, m.flags, m.method, 0, 0x21, crc, csize_f,
                               cusize_f, len(cname), len(cextra), 0, 0, 0, m.external_attr,
                               hofs_f)
        central += cname + cextra
    cd_at = len(out)
    out += central
    count = len(members) if eocd_count is None else eocd_count
    cdo = cd_at if cd_offset is None else cd_offset
    cds = len(central) if cd_size is None else cd_size
    if zip64:
        rec_at = len(out)
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                           cds, cdo)
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, rec_at, 1)
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                           0xFFFFFFFF, len(comment))
    else:
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                           min(count, 0xFFFF), cds & 0xFFFFFFFF, cdo & 0xFFFFFFFF,
                           len(comment))
    return bytes(out + comment)


# -- pickles ----------------------------------------------------------------------------


class Pickle:
    """A pickle written opcode by opcode (protocol 2 framing, no FRAME)."""

    def __init__(self, proto: int = 2):
        self.b = bytearray()
        if proto >= 2:
            self.b += b"\x80" + bytes([proto])

    def op(self, raw: bytes) -> Pickle:
        self.b += raw
        return self

    def mark(self) -> Pickle:
        return self.op(b"(")

    def none(self) -> Pickle:
        return self.op(b"N")

    def bool(self, v: bool) -> Pickle:
        return self.op(b"\x88" if v else b"\x89")

    def int(self, v: int) -> Pickle:
        if 0 <= v < 256:
            return self.op(b"K" + bytes([v]))
        if -(1 << 31) <= v < (1 << 31):
            return self.op(b"J" + struct.pack("<i", v))
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return self.op(b"\x8a" + bytes([len(raw)]) + raw)

    def float(self, v: float) -> Pickle:
        return self.op(b"G" + struct.pack(">d", v))

    def str(self, s: str) -> Pickle:
        raw = s.encode("utf-8", "surrogatepass")
        return self.op(b"X" + struct.pack("<I", len(raw)) + raw)

    def bytes(self, data: bytes) -> Pickle:  # protocol 3 BINBYTES
        return self.op(b"B" + struct.pack("<I", len(data)) + data)

    def glob(self, module: str, name: str) -> Pickle:
        return self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def stack_global(self, module: str, name: str) -> Pickle:
        return self.str(module).str(name).op(b"\x93")

    def tuple(self, n: int | None = None) -> Pickle:
        if n is None:
            return self.op(b"t")
        return self.op({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}[n])

    def empty_dict(self) -> Pickle:
        return self.op(b"}")

    def empty_list(self) -> Pickle:
        return self.op(b"]")

    def setitem(self) -> Pickle:
        return self.op(b"s")

    def setitems(self) -> Pickle:
        return self.op(b"u")

    def append(self) -> Pickle:
        return self.op(b"a")

    def appends(self) -> Pickle:
        return self.op(b"e")

    def reduce(self) -> Pickle:
        return self.op(b"R")

    def build(self) -> Pickle:
        return self.op(b"b")

    def newobj(self) -> Pickle:
        return self.op(b"\x81")

    def persid(self) -> Pickle:
        return self.op(b"Q")

    def put(self, i: int) -> Pickle:
        return self.op(b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i))

    def get(self, i: int) -> Pickle:
        return self.op(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))

    def pop(self) -> Pickle:
        return self.op(b"0")

    def stop(self) -> bytes:
        return bytes(self.b + b".")


@dataclass
class TorchTensor:
    """A tensor as torch pickles it: a strided view of a named storage."""

    storage: str
    storage_type: str = "FloatStorage"
    numel: int = 0
    offset: int = 0
    size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()


def torch_tensor_ops(p: Pickle, t: TorchTensor, legacy: bool = False,
                     rebuild: str = "_rebuild_tensor_v2") -> None:
    """Push ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})``."""
    p.glob("torch._utils", rebuild)
    p.mark()
    p.mark().str("storage").glob("torch", t.storage_type).str(t.storage).str("cpu")
    p.int(t.numel)
    if legacy:
        p.none()
    p.tuple().persid()
    p.int(t.offset)
    p.mark()
    for d in t.size:
        p.int(d)
    p.tuple()
    p.mark()
    for s in t.stride:
        p.int(s)
    p.tuple()
    p.bool(False)
    p.glob("collections", "OrderedDict").tuple(0).reduce()
    p.tuple().reduce()


def state_dict_pickle(tensors: dict[str, TorchTensor], wrap: dict | None = None,
                      legacy: bool = False) -> bytes:
    """``OrderedDict(name -> tensor)``; ``wrap`` puts it under ``wrap['key']`` with extra
    int entries, like a Lightning checkpoint (``{'state_dict': ..., 'global_step': 7}``)."""
    p = Pickle(2)
    if wrap:
        p.empty_dict().mark()
        for k, v in wrap.items():
            if k == "key":
                continue
            p.str(k).int(v)
        p.str(wrap["key"])
    p.glob("collections", "OrderedDict").tuple(0).reduce()
    p.mark()
    for name, t in tensors.items():
        p.str(name)
        torch_tensor_ops(p, t, legacy)
    p.setitems()
    if wrap:
        p.setitems()
    return p.stop()


def contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


@dataclass
class TorchCheckpoint:
    """A state_dict of float32 arrays, ready to be written in either torch format."""

    arrays: dict[str, np.ndarray]
    wrap: dict | None = None
    storage_type: str = "FloatStorage"
    refs: dict[str, TorchTensor] = field(default_factory=dict)
    storages: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, (name, arr) in enumerate(self.arrays.items()):
            key = str(i)
            self.refs[name] = TorchTensor(key, self.storage_type, arr.size, 0, arr.shape,
                                          contiguous(arr.shape))
            self.storages[key] = np.ascontiguousarray(arr).astype("<f4").tobytes()


def torch_zip_bytes(data_pkl: bytes, storages: dict[str, bytes], root: str = "archive",
                    extra_members: Sequence[ZipMember] = (), byteorder: bytes = b"little"
                    ) -> bytes:
    """The ``torch.save`` zip layout, with 64-byte aligned storage records."""
    members = [ZipMember(f"{root}/data.pkl", data_pkl),
               ZipMember(f"{root}/byteorder", byteorder)]
    for key, raw in storages.items():
        members.append(ZipMember(f"{root}/data/{key}", raw))
    members.append(ZipMember(f"{root}/version", b"3\n"))
    members += list(extra_members)
    return zip_bytes(_aligned(members))


def _aligned(members: list[ZipMember]) -> list[ZipMember]:
    """Pad local extra fields so every member's data starts on a 64-byte boundary."""
    pos = 0
    out = []
    for m in members:
        name = (m.local_name if m.local_name is not None else m.name).encode()
        start = pos + 30 + len(name) + len(m.local_extra)
        pad = -(start + 4) % 64
        extra = m.local_extra + struct.pack("<HH", 0xFA4B, pad) + b"Z" * pad if "/data/" in \
            m.name else m.local_extra
        m = ZipMember(**{**m.__dict__, "local_extra": extra})
        out.append(m)
        pos += 30 + len(name) + len(extra) + len(m.data)
    return out


def torch_zip_from(ck: TorchCheckpoint, **kw: object) -> bytes:
    return torch_zip_bytes(state_dict_pickle(ck.refs, ck.wrap), ck.storages, **kw)  # type: ignore[arg-type]


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_header_pickles(little_endian: bool = True) -> bytes:
    magic = Pickle(2).int(LEGACY_MAGIC).stop()
    version = Pickle(2).int(1001).stop()
    p = Pickle(2).empty_dict().mark()
    p.str("protocol_version").int(1001).str("little_endian").bool(little_endian)
    p.str("type_sizes").empty_dict().mark()
    for k, v in (("short", 2), ("int", 4), ("long", 4)):
        p.str(k).int(v)
    p.setitems().setitems()
    return magic + version + p.stop()


def torch_legacy_bytes(obj_pkl: bytes, storages: dict[str, bytes], itemsize: int = 4,
                       keys: Sequence[str] | None = None, counts: dict[str, int] | None = None,
                       little_endian: bool = True) -> bytes:
    """The pre-1.6 ``torch.save`` stream: header pickles, object pickle, key list, storages."""
    keys = list(storages) if keys is None else list(keys)
    kp = Pickle(2).empty_list().mark()
    for k in keys:
        kp.str(k)
    out = bytearray(legacy_header_pickles(little_endian) + obj_pkl + kp.appends().stop())
    order = "<" if little_endian else ">"
    for k in keys:
        raw = storages.get(k, b"")
        count = (counts or {}).get(k, len(raw) // itemsize)
        out += struct.pack(order + "q", count) + raw
    return bytes(out)


def torch_legacy_from(ck: TorchCheckpoint) -> bytes:
    return torch_legacy_bytes(state_dict_pickle(ck.refs, ck.wrap, legacy=True), ck.storages)


# -- the BatchNorm layer every synthetic checkpoint holds ------------------------------


def bn_arrays(channels: int = 8, prefix: str = "bn", fill: float | None = None
              ) -> dict[str, np.ndarray]:
    """A torch-named conv + BN pair; ``fill`` replaces every value (NaN, Inf...)."""
    rng = np.random.default_rng(channels)
    arrays = {
        f"{prefix}.weight": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}.bias": rng.normal(0, 0.1, channels).astype(np.float32),
        f"{prefix}.running_mean": rng.normal(0, 0.1, channels).astype(np.float32),
        f"{prefix}.running_var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "conv.weight": rng.normal(0, 0.1, (channels, 3, 3, 3)).astype(np.float32),
    }
    if fill is not None:
        arrays = {k: np.full_like(v, fill) for k, v in arrays.items()}
    return arrays
