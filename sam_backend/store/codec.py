"""Values for the state store: named numpy arrays plus a small JSON object, packed into bytes and checked.

Layout: MAGIC, a 4-byte big-endian header length, the header (JSON: `meta`, and per array its name, dtype,
shape and byte length, in order), the arrays' bytes (C order, in header order), and a CRC-32 of everything
before it. `unpack` refuses anything that does not add up (`CorruptEntry`): a truncated, overwritten or foreign
value is a miss, never a wrong array. Arrays come back read-only, without a copy.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"SAMSTATE1\n"
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")


class CorruptEntry(ValueError):
    """A stored value that is not a whole, intact packed value."""


def pack(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """`arrays` (name -> array of a numeric or bool dtype) and `meta` (JSON-able) as one value."""
    parts, described = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} holds Python objects; only numeric arrays can be stored")
        described.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                          "nbytes": array.nbytes})
        parts.append(array.tobytes())
    header = json.dumps({"meta": dict(meta or {}), "arrays": described}, separators=(",", ":")).encode()
    body = b"".join([MAGIC, _LENGTH.pack(len(header)), header, *parts])
    return body + _CRC.pack(zlib.crc32(body))


def unpack(value: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by name, meta) of a packed value; raises CorruptEntry."""
    view = memoryview(value)
    if len(view) < len(MAGIC) + _LENGTH.size + _CRC.size or bytes(view[:len(MAGIC)]) != MAGIC:
        raise CorruptEntry("not a packed state value")
    body = view[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack(view[-_CRC.size:])[0]:
        raise CorruptEntry("checksum mismatch")
    start = len(MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack(view[len(MAGIC):start])
    try:
        header = json.loads(bytes(view[start:start + length]))
        offset = start + length
        arrays = {}
        for item in header["arrays"]:
            dtype, shape, nbytes = np.dtype(item["dtype"]), tuple(item["shape"]), int(item["nbytes"])
            if dtype.hasobject or offset + nbytes > len(body):
                raise CorruptEntry(f"array {item['name']!r} runs past the value")
            arrays[item["name"]] = np.frombuffer(body[offset:offset + nbytes], dtype=dtype).reshape(shape)
            offset += nbytes
        if offset != len(body):
            raise CorruptEntry("trailing bytes")
        return arrays, header["meta"]
    except (ValueError, KeyError, TypeError) as error:
        if isinstance(error, CorruptEntry):
            raise
        raise CorruptEntry(f"unreadable header: {error}") from None


def pack_json(value: Any) -> bytes:
    """A JSON-able value, packed (checked like arrays)."""
    return pack({}, {"value": value})


def unpack_json(value: bytes) -> Any:
    return unpack(value)[1]["value"]
