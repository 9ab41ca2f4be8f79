"""COSEM Data in A-XDR (Blue Book 4.1.5, Green Book 9.5): decoding what a GET answers with, and
encoding the few typed values a SET or ACTION carries.

This is the client's one decoder of attribute values. It exists, instead of gurux-dlms's
`_GXCommon.getData`, because profiling a full meter read (association, clock, four registers with
scaler_unit, a 96-row load profile, release) showed gurux's generic decoder taking about 80 % of
the client's CPU: every byte goes through GXByteBuffer position bookkeeping. This decoder
does the same job with `struct` on a bytes object, strictly: a value that ends early or has an
unknown type tag is an `AxdrError` naming the offset.

Python forms: null-data None; boolean bool; the integer types and enum int; float32/float64
float; octet-string, date-time, date, time bytes; visible-string and utf8-string str; bit-string
a str of "0"/"1"; array and structure list.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["AxdrError", "ber_length", "decode_data", "null", "boolean", "integer", "unsigned",
           "long_unsigned", "double_long_unsigned", "enum", "octet_string", "array", "structure"]


class AxdrError(ValueError):
    """The bytes are not one well-formed COSEM Data value."""


# Fixed-size types: tag -> struct format.
_FIXED: dict[int, struct.Struct] = {
    5: struct.Struct(">i"),   # double-long
    6: struct.Struct(">I"),   # double-long-unsigned
    13: struct.Struct(">b"),  # bcd (one signed byte, as gurux and the Blue Book table have it)
    15: struct.Struct(">b"),  # integer
    16: struct.Struct(">h"),  # long
    17: struct.Struct(">B"),  # unsigned
    18: struct.Struct(">H"),  # long-unsigned
    20: struct.Struct(">q"),  # long64
    21: struct.Struct(">Q"),  # long64-unsigned
    22: struct.Struct(">B"),  # enum
    23: struct.Struct(">f"),  # float32
    24: struct.Struct(">d"),  # float64
}
# Fixed-size octet strings: date-time, date, time.
_FIXED_OCTETS = {25: 12, 26: 5, 27: 4}
ARRAY, STRUCTURE, NULL, BOOLEAN, BIT_STRING = 1, 2, 0, 3, 4
OCTET_STRING, VISIBLE_STRING, UTF8_STRING = 9, 10, 12


def decode_data(data: bytes, offset: int = 0) -> Any:
    """The one Data value in `data[offset:]`, which it must fill exactly."""
    value, end = _decode(data, offset)
    if end != len(data):
        raise AxdrError(f"{len(data) - end} bytes left over after the value at offset {end}")
    return value


def ber_length(data: bytes, offset: int) -> tuple[int, int]:
    """A BER definite length (one byte below 0x80, else 0x81..0x84 and that many bytes)."""
    try:
        first = data[offset]
    except IndexError:
        raise AxdrError(f"length missing at offset {offset}") from None
    if first < 0x80:
        return first, offset + 1
    size = first & 0x7F
    if not 1 <= size <= 4 or offset + 1 + size > len(data):
        raise AxdrError(f"bad length 0x{first:02x} at offset {offset}")
    return int.from_bytes(data[offset + 1:offset + 1 + size], "big"), offset + 1 + size


def _take(data: bytes, offset: int, size: int) -> tuple[bytes, int]:
    end = offset + size
    if end > len(data):
        raise AxdrError(f"{size} bytes wanted at offset {offset}, {len(data) - offset} left")
    return data[offset:end], end


def _decode(data: bytes, offset: int) -> tuple[Any, int]:
    try:
        tag = data[offset]
    except IndexError:
        raise AxdrError(f"value missing at offset {offset}") from None
    offset += 1
    fixed = _FIXED.get(tag)
    if fixed is not None:
        if offset + fixed.size > len(data):
            raise AxdrError(f"type {tag} needs {fixed.size} bytes at offset {offset}")
        return fixed.unpack_from(data, offset)[0], offset + fixed.size
    if tag == ARRAY or tag == STRUCTURE:
        count, offset = ber_length(data, offset)
        if tag == ARRAY and count >= _UNIFORM_MIN:
            uniform = _uniform_array(data, offset, count)
            if uniform is not None:
                return uniform
        items = []
        append = items.append
        size = len(data)
        for _ in range(count):
            # Scalars and short octet-strings inline: a profile buffer is thousands of them,
            # and a call per value was most of the decoding time.
            item_tag = data[offset] if offset < size else None
            fixed = _FIXED.get(item_tag)
            if fixed is not None and offset + 1 + fixed.size <= size:
                append(fixed.unpack_from(data, offset + 1)[0])
                offset += 1 + fixed.size
                continue
            if item_tag == OCTET_STRING and offset + 1 < size and data[offset + 1] < 0x80:
                end = offset + 2 + data[offset + 1]
                if end <= size:
                    append(data[offset + 2:end])
                    offset = end
                    continue
            item, offset = _decode(data, offset)
            append(item)
        return items, offset
    if tag == OCTET_STRING:
        size, offset = ber_length(data, offset)
        return _take(data, offset, size)
    if tag in _FIXED_OCTETS:
        return _take(data, offset, _FIXED_OCTETS[tag])
    if tag == VISIBLE_STRING or tag == UTF8_STRING:
        size, offset = ber_length(data, offset)
        raw, offset = _take(data, offset, size)
        try:
            return raw.decode("ascii" if tag == VISIBLE_STRING else "utf-8"), offset
        except UnicodeDecodeError as failure:
            raise AxdrError(f"string at offset {offset - size}: {failure}") from None
    if tag == BOOLEAN:
        raw, offset = _take(data, offset, 1)
        return raw[0] != 0, offset
    if tag == NULL:
        return None, offset
    if tag == BIT_STRING:
        bits, offset = ber_length(data, offset)
        raw, offset = _take(data, offset, (bits + 7) // 8)
        return "".join(f"{byte:08b}" for byte in raw)[:bits], offset
    raise AxdrError(f"unknown or unsupported type tag {tag} at offset {offset - 1}")


# -- arrays of same-shaped elements (a profile buffer) -----------------------------------------
#
# A profile buffer is an array of rows that are all encoded alike: structure{octet-string(12),
# double-long-unsigned, ...}. When the first element holds only fixed-size values and short
# octet-strings, every element has the same length and layout, so the whole array is unpacked
# by one struct.iter_unpack, each element's type tags checked against the first's. Any element
# that differs sends the array back to the general decoder, which says what is wrong.

_UNIFORM_MIN = 8
_FORMATS = {5: "i", 6: "I", 13: "b", 15: "b", 16: "h", 17: "B", 18: "H", 20: "q", 21: "Q",
            22: "B", 23: "f", 24: "d"}


def _element_layout(data: bytes, offset: int) -> tuple | None:
    """(struct of the element's values, its tag octets as (position, value) pairs,
    is_structure) for the element at `offset`, or None if it holds anything but scalars and
    short octet-strings. The struct skips the tag octets ("x"): it unpacks values only."""
    tag = data[offset] if offset < len(data) else None
    fmt = [">"]
    tags: list[tuple[int, int]] = []
    position = 0  # of the next octet within the element

    def scalar(at: int) -> int | None:
        nonlocal position
        item_tag = data[at] if at < len(data) else None
        code = _FORMATS.get(item_tag)
        if code is not None:
            size = struct.calcsize(">" + code)
            tags.append((position, item_tag))
            fmt.extend(("x", code))
            position += 1 + size
            return at + 1 + size
        if item_tag == OCTET_STRING and at + 1 < len(data) and data[at + 1] < 0x80:
            size = data[at + 1]
            tags.extend(((position, OCTET_STRING), (position + 1, size)))
            fmt.extend(("xx", f"{size}s"))
            position += 2 + size
            return at + 2 + size
        return None

    if tag == STRUCTURE:
        if offset + 1 >= len(data) or not 0 < data[offset + 1] < 0x80:
            return None
        tags.extend(((0, STRUCTURE), (1, data[offset + 1])))
        fmt.append("xx")
        position = 2
        at = offset + 2
        for _ in range(data[offset + 1]):
            at = scalar(at)
            if at is None:
                return None
        is_structure = True
    else:
        if scalar(offset) is None:
            return None
        is_structure = False
    return struct.Struct("".join(fmt)), tags, is_structure


def _uniform_array(data: bytes, offset: int, count: int) -> tuple[list, int] | None:
    layout = _element_layout(data, offset)
    if layout is None:
        return None
    row, tags, is_structure = layout
    size = row.size
    end = offset + count * size
    if end > len(data):
        return None
    # Each tag octet checked for every element at once: the element's octet at `position`,
    # every `size` octets, must all be the first element's.
    for position, value in tags:
        if data[offset + position:end:size] != bytes((value,)) * count:
            return None
    values = row.iter_unpack(memoryview(data)[offset:end])
    if is_structure:
        return list(map(list, values)), end
    return [value for value, in values], end


# --- encoding: each function gives the bytes of one typed value; compose by nesting -----------

def _encoded_length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = (size.bit_length() + 7) // 8
    return bytes((0x80 | octets,)) + size.to_bytes(octets, "big")


def _fixed(tag: int, value: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"A-XDR type {tag} needs an integer, not {value!r}")
    try:
        return bytes((tag,)) + _FIXED[tag].pack(value)
    except struct.error:
        raise ValueError(f"{value} is out of range for A-XDR type {tag}") from None


def null() -> bytes:
    return bytes((NULL,))


def boolean(value: bool) -> bytes:
    return bytes((BOOLEAN, 1 if value else 0))


def integer(value: int) -> bytes:
    return _fixed(15, value)


def unsigned(value: int) -> bytes:
    return _fixed(17, value)


def long_unsigned(value: int) -> bytes:
    return _fixed(18, value)


def double_long_unsigned(value: int) -> bytes:
    return _fixed(6, value)


def enum(value: int) -> bytes:
    return _fixed(22, value)


def octet_string(value: bytes) -> bytes:
    return bytes((OCTET_STRING,)) + _encoded_length(len(value)) + bytes(value)


def array(items: list[bytes]) -> bytes:
    """An array of already encoded elements (all of one type, as the caller ensures)."""
    return bytes((ARRAY,)) + _encoded_length(len(items)) + b"".join(items)


def structure(items: list[bytes]) -> bytes:
    return bytes((STRUCTURE,)) + _encoded_length(len(items)) + b"".join(items)
