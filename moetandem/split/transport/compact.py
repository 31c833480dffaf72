"""The compact frame header (magic "MTS2"): the same header as the JSON one ({kind, id, meta, tensors}), written
in a few bytes so that it stays under 2% of a one-token frame (JSON: 154 B, 3.6% at hidden size 2048; this:
~55 B, 1.3%). Decoded into the same dict the JSON header gives, and then checked by the same code.

    header  = kind (1 byte: index in KINDS) | id (uvarint) | meta | tensors
    meta    = count (uvarint) | per entry: key (str) | value
    value   = tag (1 byte): 0 None, 1 False, 2 True, 3 int (zigzag uvarint), 4 float (8 bytes, little endian),
              5 str, 6 list (count uvarint, then tagged scalars)
    tensors = count (uvarint) | per tensor: name (str) | dtype (1 byte: index in DTYPES) | ndim (1 byte) | dims
    str     = byte length (uvarint) | UTF-8
Every read is bounds-checked; a truncated, overlong or trailing header raises FrameError."""
from __future__ import annotations

import struct
from typing import Any

_F64 = struct.Struct("<d")
_MAX_VARINT = 10  # bytes: 64-bit values


class CompactError(ValueError):
    """A compact header that does not decode (the caller turns it into a FrameError)."""


def _uvarint(n: int, out: bytearray) -> None:
    if n < 0 or n >= 1 << 64:
        raise CompactError(f"integer {n} out of the 64-bit range")
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return


def _str(s: str, out: bytearray) -> None:
    b = s.encode("utf-8")
    _uvarint(len(b), out)
    out += b


def _value(v: Any, out: bytearray, nested: bool = False) -> None:
    if v is None:
        out.append(0)
    elif isinstance(v, bool):
        out.append(2 if v else 1)
    elif isinstance(v, int):
        if not -(1 << 63) <= v < 1 << 63:
            raise CompactError(f"integer {v} out of the 64-bit range")
        out.append(3)
        _uvarint((v << 1) ^ (v >> 63), out)  # zigzag
    elif isinstance(v, float):
        out.append(4)
        out += _F64.pack(v)
    elif isinstance(v, str):
        out.append(5)
        _str(v, out)
    elif isinstance(v, list) and not nested:
        out.append(6)
        _uvarint(len(v), out)
        for x in v:
            _value(x, out, nested=True)
    else:
        raise CompactError(f"meta value of type {type(v).__name__} cannot be sent")


def encode_header(kind: str, fid: int, meta: dict[str, Any], specs: list[list[Any]], kinds: tuple[str, ...],
           dtypes: tuple[str, ...]) -> bytes:
    out = bytearray([kinds.index(kind)])
    _uvarint(fid, out)
    _uvarint(len(meta), out)
    for k, v in meta.items():
        _str(k, out)
        _value(v, out)
    _uvarint(len(specs), out)
    for name, dtype, shape in specs:
        _str(name, out)
        out.append(dtypes.index(dtype))
        out.append(len(shape))
        for d in shape:
            _uvarint(d, out)
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.i = data, 0

    def byte(self) -> int:
        if self.i >= len(self.data):
            raise CompactError("compact header truncated")
        self.i += 1
        return self.data[self.i - 1]

    def uvarint(self) -> int:
        n = shift = 0
        for _ in range(_MAX_VARINT):
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise CompactError("varint longer than 10 bytes")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.i:
            raise CompactError("compact header truncated")
        self.i += n
        return self.data[self.i - n:self.i]

    def str(self) -> str:
        try:
            return self.take(self.uvarint()).decode("utf-8")
        except UnicodeDecodeError:
            raise CompactError("a string in the header is not UTF-8") from None

    def value(self, nested: bool = False) -> Any:
        tag = self.byte()
        if tag in (0, 1, 2):
            return (None, False, True)[tag]
        if tag == 3:
            z = self.uvarint()
            return (z >> 1) ^ -(z & 1)
        if tag == 4:
            return _F64.unpack(self.take(8))[0]
        if tag == 5:
            return self.str()
        if tag == 6 and not nested:
            n = self.uvarint()
            if n > len(self.data):  # each element takes at least one byte
                raise CompactError("list longer than the header")
            return [self.value(nested=True) for _ in range(n)]
        raise CompactError(f"unknown value tag {tag}")


def decode_header(data: bytes, kinds: tuple[str, ...], dtypes: tuple[str, ...], version: int) -> dict[str, Any]:
    """The header dict {v, kind, id, meta, tensors} of a compact header (CompactError when it does not decode)."""
    r = _Reader(data)
    k = r.byte()
    if k >= len(kinds):
        raise CompactError(f"unknown frame kind index {k}")
    fid = r.uvarint()
    n = r.uvarint()
    if n > len(data):
        raise CompactError("more meta entries than header bytes")
    meta: dict[str, Any] = {}
    for _ in range(n):
        key = r.str()
        if key in meta:
            raise CompactError(f"meta {key[:20]!r} appears twice")
        meta[key] = r.value()
    specs = []
    for _ in range(min(r.uvarint(), len(data) + 1)):
        name, d, ndim = r.str(), r.byte(), r.byte()
        if d >= len(dtypes):
            raise CompactError(f"unknown dtype index {d}")
        specs.append([name, dtypes[d], [r.uvarint() for _ in range(ndim)]])
    if r.i != len(data):
        raise CompactError(f"{len(data) - r.i} bytes after the header")
    return {"v": version, "kind": kinds[k], "id": fid, "meta": meta, "tensors": specs}
