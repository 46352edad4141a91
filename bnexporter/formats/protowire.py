"""A minimal protobuf wire-format decoder.

TF checkpoints store their metadata as a handful of tiny protobuf messages;
decoding the wire format directly avoids a runtime dependency on the protobuf
package and on TensorFlow's generated ``_pb2`` modules. Every length and offset
is checked against the buffer, so hostile or torn bytes end in a
``CheckpointError`` rather than an IndexError, a huge allocation or a hang.
"""

from __future__ import annotations

from bnexporter.errors import CheckpointError

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5

# field number -> values in file order: ints for varint and fixed32/64 fields,
# bytes for length-delimited ones
Fields = dict[int, list]


def read_varint(buf: bytes, pos: int, where: str = "<protobuf>") -> tuple[int, int]:
    """Decode one unsigned varint (at most 10 bytes); returns (value, next position)."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise CheckpointError(where, "protobuf varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            # 10-byte varints (negative int64) carry bits above 64: drop them
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise CheckpointError(where, "protobuf varint longer than 10 bytes")


def parse(buf: bytes, where: str = "<protobuf>") -> Fields:
    """Split one message into its fields; nested messages stay as bytes."""
    fields: Fields = {}
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CheckpointError(where, "protobuf field number 0 is invalid")
        value: int | bytes
        if wire == VARINT:
            value, pos = read_varint(buf, pos, where)
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > end:
                raise CheckpointError(where, f"protobuf field {number} runs past its buffer")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == LEN:
            length, pos = read_varint(buf, pos, where)
            if length > end - pos:
                raise CheckpointError(
                    where, f"protobuf field {number} claims {length} bytes, "
                           f"only {end - pos} remain")
            value = bytes(buf[pos:pos + length])
            pos += length
        else:
            # groups (3, 4) are deprecated and absent from every message read here
            raise CheckpointError(where, f"protobuf wire type {wire} is not supported")
        fields.setdefault(number, []).append(value)
    return fields


def get_int(fields: Fields, number: int, default: int = 0, where: str = "<protobuf>",
            signed: bool = False) -> int:
    """The last value of a scalar varint field (protobuf's last-one-wins rule)."""
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise CheckpointError(where, f"protobuf field {number} is not a number")
    if signed and value >= 1 << 63:
        value -= 1 << 64
    return value


def get_bytes(fields: Fields, number: int, where: str = "<protobuf>") -> bytes | None:
    values = fields.get(number)
    if not values:
        return None
    value = values[-1]
    if not isinstance(value, bytes):
        raise CheckpointError(where, f"protobuf field {number} is not length-delimited")
    return value


def get_str(fields: Fields, number: int, where: str = "<protobuf>") -> str:
    raw = get_bytes(fields, number, where)
    if raw is None:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(where, f"protobuf field {number} is not valid UTF-8") from None


def get_messages(fields: Fields, number: int, where: str = "<protobuf>") -> list[Fields]:
    """All values of a repeated message field, each parsed."""
    out = []
    for value in fields.get(number, ()):
        if not isinstance(value, bytes):
            raise CheckpointError(where, f"protobuf field {number} is not a message")
        out.append(parse(value, where))
    return out
