"""Reader for the LevelDB-style SSTable that TF uses as a checkpoint's ``.index``.

Layout (TF ``core/lib/io/format.h``, ``block_builder.cc``): data blocks, a
metaindex block, an index block whose values are handles to the data blocks, and
a 48-byte footer ending in a magic number. The footer is written last, so a
missing magic means "still being written" and is reported as retryable; once the
magic is present every other inconsistency is real corruption. Index files are
small, so the whole file is parsed from memory and every block's CRC is checked
(pure-Python CRC32C is fine at these sizes; tensor data is never checksummed).
"""

from __future__ import annotations

import struct

from bnexporter.errors import CheckpointError
from bnexporter.formats.protowire import read_varint

MAGIC = 0xDB4775248B80FB57
MAGIC_BYTES = struct.pack("<Q", MAGIC)
FOOTER_SIZE = 48
TRAILER_SIZE = 5  # 1 compression-type byte + fixed32 masked crc32c
_MASK_DELTA = 0xA282EAD8


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli); the stdlib only has the IEEE polynomial."""
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB masks stored CRCs so that CRCs of CRC-bearing data stay well-distributed."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def has_magic(data: bytes) -> bool:
    return len(data) >= FOOTER_SIZE and data[-8:] == MAGIC_BYTES


def _handle(buf: bytes, pos: int, where: str) -> tuple[int, int, int]:
    offset, pos = read_varint(buf, pos, where)
    size, pos = read_varint(buf, pos, where)
    return offset, size, pos


def _block(data: bytes, offset: int, size: int, limit: int, where: str, what: str) -> bytes:
    """The contents of one block, after checking its extent, type byte and CRC."""
    if offset + size + TRAILER_SIZE > limit:
        raise CheckpointError(where, f"{what} block at {offset}+{size} lies outside the table "
                                     f"({limit} bytes before the footer)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if mask_crc(crc32c(data[offset:offset + size + 1])) != stored:
        raise CheckpointError(where, f"{what} block at offset {offset}: checksum mismatch")
    if kind == 1:
        raise CheckpointError(where, f"{what} block at offset {offset} is snappy-compressed, "
                                     "which is not supported (TF never writes it)", "unsupported")
    if kind != 0:
        raise CheckpointError(where, f"{what} block at offset {offset}: unknown compression "
                                     f"type {kind}")
    return contents


def parse_block(contents: bytes, where: str = "<sstable>") -> list[tuple[bytes, bytes]]:
    """Decode the prefix-compressed entries of one block, in order."""
    n = len(contents)
    if n < 4:
        raise CheckpointError(where, "block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", contents, n - 4)
    if num_restarts == 0 or num_restarts > (n - 4) // 4:
        raise CheckpointError(where, f"block has an impossible restart count {num_restarts}")
    limit = n - 4 - 4 * num_restarts
    restarts = struct.unpack_from(f"<{num_restarts}I", contents, limit)
    if restarts[0] != 0 or any(r >= max(limit, 1) for r in restarts):
        raise CheckpointError(where, "block restart offsets point outside its entries")
    restart_set = set(restarts)
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        at_restart = pos in restart_set
        shared, pos = read_varint(contents, pos, where)
        non_shared, pos = read_varint(contents, pos, where)
        value_len, pos = read_varint(contents, pos, where)
        if shared > len(key) or (at_restart and shared):
            raise CheckpointError(where, f"block entry shares {shared} bytes of a "
                                         f"{len(key)}-byte key")
        if non_shared + value_len > limit - pos:
            raise CheckpointError(where, "block entry runs past the end of the block")
        new_key = key[:shared] + contents[pos:pos + non_shared]
        pos += non_shared
        if entries and new_key <= key:
            raise CheckpointError(where, "block keys are not in increasing order")
        key = new_key
        entries.append((key, contents[pos:pos + value_len]))
        pos += value_len
    return entries


def read_table(data: bytes, where: str = "<sstable>") -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a table held in memory, in key order.

    The metaindex is ignored: TF writes no filters or stats that matter here.
    """
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(where, f"index is {len(data)} bytes, shorter than the "
                                     f"{FOOTER_SIZE}-byte footer", "truncated", True)
    if data[-8:] != MAGIC_BYTES:
        raise CheckpointError(where, "index has no SSTable footer magic (still being written, "
                                     "or not a TF checkpoint index)", "truncated", True)
    footer_at = len(data) - FOOTER_SIZE
    footer = data[footer_at:footer_at + 40]
    _meta_off, _meta_size, pos = _handle(footer, 0, where)
    index_off, index_size, _ = _handle(footer, pos, where)
    index = parse_block(_block(data, index_off, index_size, footer_at, where, "index"), where)
    entries: list[tuple[bytes, bytes]] = []
    for _sep, handle in index:
        off, size, end = _handle(handle, 0, where)
        if end != len(handle):
            raise CheckpointError(where, "index entry is not a single block handle")
        block = parse_block(_block(data, off, size, footer_at, where, "data"), where)
        if entries and block and block[0][0] <= entries[-1][0]:
            raise CheckpointError(where, "data blocks are not in increasing key order")
        entries.extend(block)
    return entries
