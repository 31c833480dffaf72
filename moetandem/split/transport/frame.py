"""The wire format of split execution: one gRPC message = one frame, never pickle.

    frame   = MAGIC (4 bytes) | header length (uint32, little endian) | header | payload
    header  = b"MTS1": UTF-8 JSON object {"v": 1, "kind": str, "id": int, "meta": {str: scalar | list of scalars},
                                          "tensors": [[name, dtype, shape], ...]}
              b"MTS2": the same fields in a compact binary form (transport/compact.py), what pack() writes;
              both are accepted and checked alike
    payload = the tensors' raw bytes (C order, little endian), concatenated in header order

Every received frame is validated before anything is allocated from it: magic and version, header size and
shape, known kind, dtype in a whitelist, shape rank and element count bounded, and
Σ prod(shape) × itemsize == len(payload) exactly. A frame that fails any check raises FrameError."""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moetandem.errors import MoetandemError
from moetandem.split.transport.compact import CompactError, decode_header, encode_header

MAGIC = b"MTS1"  # JSON header
MAGIC_COMPACT = b"MTS2"  # the same header in a few bytes (transport/compact.py): what pack() writes
VERSION = 1
# never reorder: compact ids; append new kinds at the end ("decode": split/decode.py)
KIND_ORDER = ("hello", "alloc", "free", "layers", "experts", "reply", "error", "bye", "decode")
KINDS = frozenset(KIND_ORDER)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
    "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
    "float64": torch.float64}  # float64: a decode frame's sampling parameters, exactly the end's Python floats
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_ORDER = tuple(DTYPES)  # never reorder (compact header ids); append new dtypes at the end
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PREFIX = struct.Struct("<4sI")


class FrameError(MoetandemError):
    """A received frame is malformed, forged or out of bounds."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 256 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_tensors: int = 16
    max_ndim: int = 4
    max_elements: int = 2**28


DEFAULT_LIMITS = Limits()


@dataclass
class Frame:
    kind: str
    id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def pack(frame: Frame) -> bytes:
    """Frame -> bytes. Tensors go as raw bytes of their (contiguous, CPU) storage."""
    specs, blobs = [], []
    for name, t in frame.tensors.items():
        t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
        if t.dtype not in DTYPE_NAMES:
            raise FrameError(f"tensor {name!r} has dtype {t.dtype}, which the wire format does not carry")
        t = t.detach().to("cpu").contiguous()
        specs.append([name, DTYPE_NAMES[t.dtype], list(t.shape)])
        # bytes of any dtype (bfloat16 has no numpy twin): view the storage as uint8
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    try:
        header = encode_header(frame.kind, frame.id, frame.meta, specs, KIND_ORDER, DTYPE_ORDER)
    except (CompactError, ValueError) as e:
        raise FrameError(f"cannot send this frame: {e}") from None
    return b"".join([_PREFIX.pack(MAGIC_COMPACT, len(header)), header, *blobs])


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """bytes -> Frame, validating everything (raises FrameError)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _PREFIX.size:
        raise FrameError("frame shorter than its prefix")
    if len(data) > limits.max_message_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")
    magic, hlen = _PREFIX.unpack_from(data)
    if magic not in (MAGIC, MAGIC_COMPACT):
        raise FrameError("bad magic: not a moetandem split frame")
    if hlen > limits.max_header_bytes or _PREFIX.size + hlen > len(data):
        raise FrameError(f"header length {hlen} is out of bounds")
    raw_head = bytes(data[_PREFIX.size:_PREFIX.size + hlen])
    if magic == MAGIC_COMPACT:
        try:
            head = decode_header(raw_head, KIND_ORDER, DTYPE_ORDER, VERSION)
        except CompactError as e:
            raise FrameError(f"bad compact header: {e}") from None
    else:
        try:
            head = json.loads(raw_head.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FrameError("header is not UTF-8 JSON") from None
    if not isinstance(head, dict) or set(head) != {"v", "kind", "id", "meta", "tensors"}:
        raise FrameError("header must hold exactly v, kind, id, meta, tensors")
    if head["v"] != VERSION:
        raise FrameError(f"protocol version {head['v']!r}, this side speaks {VERSION}: upgrade the older side")
    kind, fid, meta, specs = head["kind"], head["id"], head["meta"], head["tensors"]
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    if not _is_int(fid) or not 0 <= fid < 2**53:
        raise FrameError("frame id must be a non-negative integer")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and _scalar_or_list(v) for k, v in meta.items()):
        raise FrameError("meta must map names to scalars or flat lists of scalars")
    if not isinstance(specs, list) or len(specs) > limits.max_tensors:
        raise FrameError(f"tensors must be a list of at most {limits.max_tensors}")
    tensors: dict[str, torch.Tensor] = {}
    offset = _PREFIX.size + hlen
    for spec in specs:
        name, dtype, shape = _check_spec(spec, limits)
        if name in tensors:
            raise FrameError(f"tensor {name!r} appears twice")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offset + nbytes > len(data):
            raise FrameError(f"tensor {name!r} claims {nbytes} bytes past the end of the frame")
        raw = bytearray(data[offset:offset + nbytes])
        flat = torch.frombuffer(raw, dtype=DTYPES[dtype]) if nbytes else torch.empty(0, dtype=DTYPES[dtype])
        if dtype == "bool" and nbytes:  # only bytes 0 and 1 are booleans
            as_u8 = flat.view(torch.uint8)
            if bool((as_u8 > 1).any()):
                raise FrameError(f"tensor {name!r} holds bytes that are not booleans")
        tensors[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} bytes after the last tensor")
    return Frame(kind, fid, meta, tensors)


def _check_spec(spec: Any, limits: Limits) -> tuple[str, str, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[2], list)):
        raise FrameError("a tensor spec is [name, dtype, shape]")
    name, dtype, shape = spec
    if not _NAME.fullmatch(name):
        raise FrameError(f"bad tensor name {name[:40]!r}")
    if dtype not in DTYPES:
        raise FrameError(f"dtype {str(dtype)[:20]!r} of tensor {name!r} is not allowed")
    if len(shape) > limits.max_ndim or not all(_is_int(d) and 0 <= d <= limits.max_elements for d in shape):
        raise FrameError(f"bad shape for tensor {name!r}")
    if math.prod(shape) > limits.max_elements:
        raise FrameError(f"tensor {name!r} has more than {limits.max_elements} elements")
    return name, dtype, shape


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar_or_list(v: Any) -> bool:
    scalar = (type(None), bool, int, float, str)
    return isinstance(v, scalar) or (isinstance(v, list) and len(v) <= 4096 and all(isinstance(x, scalar) for x in v))


def meta_int(frame: Frame, key: str, lo: int, hi: int) -> int:
    """An integer meta field within [lo, hi], or FrameError."""
    v = frame.meta.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise FrameError(f"{frame.kind}: meta {key!r} must be an integer in [{lo}, {hi}], got {str(v)[:20]}")
    return v


def tensor(frame: Frame, name: str, dtypes: tuple[torch.dtype, ...], ndim: int) -> torch.Tensor:
    """A required tensor of one of `dtypes` and rank `ndim`, or FrameError."""
    t = frame.tensors.get(name)
    if t is None:
        raise FrameError(f"{frame.kind}: tensor {name!r} is missing")
    if t.dtype not in dtypes or t.dim() != ndim:
        raise FrameError(f"{frame.kind}: tensor {name!r} must be {ndim}-d of {[DTYPE_NAMES[d] for d in dtypes]}, "
                         f"got {DTYPE_NAMES[t.dtype]} {list(t.shape)}")
    return t
