"""Packed expert-weight layouts: the one definition every format user (loaders, committee slots, kernels) follows.

A weight matrix W [..., N, K] (N output rows, K input columns, as in nn.Linear) is held as (data, scale):

| fmt   | data                              | scale                          | W ≈                                   |
|-------|-----------------------------------|--------------------------------|---------------------------------------|
| bf16  | bf16 [..., N, K]                  | None                           | data                                  |
| int8  | int8 [..., N, K]                  | fp32 [..., N, K // G]          | data · s[n, k // G]                   |
| fp8   | float8_e4m3fn [..., N, K]         | fp32 [..., N, K // G]          | data · s[n, k // G]                   |
| int4  | uint8 [..., N, K // 2]            | fp32 [..., N, K // G]          | (nibble − 8) · s[n, k // G]           |
| mxfp4 | uint8 [..., N, K // 2]            | uint8 e8m0 [..., N, K // 32]   | FP4[nibble] · 2^(s[n, k // 32] − 127) |

Nibbles: byte j of a row holds column 2j in its low 4 bits and column 2j + 1 in its high 4 bits (gpt-oss's own
MXFP4 order). G (the group along K) is per-channel (G = K) for int8/fp8 by default, 128 for int4 (the largest of
128/64/32 dividing K), 32 for mxfp4 (fixed by the format). Block-wise FP8 checkpoints (128×128 scales) expand their
scales along N to this row-wise form exactly. Quantization is round-to-nearest, symmetric, no calibration data;
int4 picks each group's scale among amax / d for d in INT4_CLIP, the one of least squared error (d > 7 clips the
group's largest values to give the rest finer steps: a quarter less error on Gaussian weights than amax / 7)."""
from __future__ import annotations

import torch

from moetandem.errors import InvalidRequestError

FORMATS = ("bf16", "int8", "fp8", "int4", "mxfp4")
PACKED = ("int4", "mxfp4")  # two columns per byte
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_MAX = 448.0
INT4_CLIP = (7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0)  # amax / scale candidates for int4 (see the docstring)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown expert format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def default_group(fmt: str, k: int) -> int:
    """The group size along K the format uses for a matrix with K input columns."""
    check_format(fmt)
    if fmt == "mxfp4":
        if k % 32:
            raise InvalidRequestError(f"mxfp4 needs the input dimension to be a multiple of 32, got {k}")
        return 32
    if fmt == "int4":
        if k % 2:
            raise InvalidRequestError(f"int4 needs an even input dimension, got {k}")
        return next((g for g in (128, 64, 32) if k % g == 0), k)
    return k


def packed_cols(fmt: str, k: int) -> int:
    """Columns of `data` for K input columns."""
    return k // 2 if fmt in PACKED else k


def data_dtype(fmt: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8,
            "mxfp4": torch.uint8}[check_format(fmt)]


def scale_dtype(fmt: str) -> torch.dtype | None:
    return None if fmt == "bf16" else torch.uint8 if fmt == "mxfp4" else torch.float32


def matrix_bytes(fmt: str, n: int, k: int, group: int | None = None) -> int:
    """Bytes of one packed [N, K] matrix: data plus scales."""
    g = group or default_group(fmt, k)
    data = n * packed_cols(fmt, k) * torch.empty((), dtype=data_dtype(fmt)).element_size()
    sd = scale_dtype(fmt)
    return data + (0 if sd is None else n * (k // g) * torch.empty((), dtype=sd).element_size())


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] integers 0..15 -> uint8 [..., K // 2] (column 2j low, 2j + 1 high)."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> long [..., K] nibbles."""
    lo, hi = (data & 0x0F).long(), (data >> 4).long()
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize(w: torch.Tensor, fmt: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [..., N, K] (any float dtype) -> (data, scale) in `fmt`'s layout (module docstring)."""
    check_format(fmt)
    k = w.shape[-1]
    if fmt == "bf16":
        return w.to(torch.bfloat16), None
    g = group or default_group(fmt, k)
    if k % g:
        raise InvalidRequestError(f"group {g} does not divide the input dimension {k}")
    wg = w.float().reshape(*w.shape[:-1], k // g, g)  # [..., N, K/G, G]
    amax = wg.abs().amax(dim=-1)  # [..., N, K/G]
    if fmt == "mxfp4":
        # shared power-of-two scale: the block's largest value lands in FP4's top binade (max 6 = 1.5·2^2)
        e = torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2  # [..., N, K/32]
        e = e.clamp(-127, 127)
        x = wg / torch.exp2(e)[..., None]  # [..., N, K/32, 32]
        grid = torch.tensor(FP4_VALUES[:8], device=w.device)  # magnitudes
        idx = (x.abs()[..., None] - grid).abs().argmin(dim=-1)  # [..., N, K/32, 32] nearest magnitude
        q = idx + 8 * (x < 0).long()
        return _pack_nibbles(q.reshape(w.shape)), (e + 127).to(torch.uint8)
    if fmt == "int4":
        s, q = _int4_search(wg, amax)  # [..., N, K/G], [..., N, K/G, G]
        return _pack_nibbles(q.reshape(w.shape) + 8), s  # nibble = q + 8
    s = (amax / (127.0 if fmt == "int8" else FP8_MAX)).clamp_min(torch.finfo(torch.float32).tiny)  # [..., N, K/G]
    x = wg / s[..., None]
    if fmt == "fp8":
        return x.reshape(w.shape).to(torch.float8_e4m3fn), s
    return x.round().clamp(-127, 127).reshape(w.shape).to(torch.int8), s


def _int4_search(wg: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wg [..., G] groups -> (per group the scale amax / d, d in INT4_CLIP, whose int4 round trip has the least
    squared error; the groups' values in [-8, 7] at that scale)."""
    best = None
    for d in INT4_CLIP:
        s = (amax / d).clamp_min(torch.finfo(torch.float32).tiny)
        q = (wg / s[..., None]).round().clamp(-8, 7)
        e = (q * s[..., None] - wg).square().sum(dim=-1)
        if best is None:
            best = (s, q, e)
        else:
            better = e < best[2]
            best = (torch.where(better, s, best[0]), torch.where(better[..., None], q, best[1]),
                     torch.where(better, e, best[2]))
    return best[0], best[1]


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """(data, scale) in `fmt`'s layout -> float32 W [..., N, K]."""
    check_format(fmt)
    if fmt == "bf16":
        return data.float()
    if fmt == "mxfp4":
        vals = torch.tensor(FP4_VALUES, device=data.device)[unpack_nibbles(data)]  # [..., N, K]
        s = torch.exp2(scale.float() - 127)
    elif fmt == "int4":
        vals = (unpack_nibbles(data) - 8).float()
        s = scale.float()
    else:
        vals, s = data.float(), scale.float()
    g = vals.shape[-1] // s.shape[-1]
    return vals * s.repeat_interleave(g, dim=-1)
