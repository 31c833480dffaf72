"""Pre-quantized checkpoints: which scheme a config.json declares, and the dense read of one of its tensors (the
non-expert weights, and experts wherever a dense copy is wanted: similarity, gating, `--expert-format bf16`).

Read natively (the experts stay packed with `--expert-format auto`, see moetandem.experts.native):
- mxfp4: gpt-oss's `*_blocks` / `*_scales` experts (everything else is bf16);
- fp8: block-wise FP8 (DeepSeek-V3, the Qwen3 FP8 releases): `quantization_config.weight_block_size` [bn, bk],
  `X.weight` float8_e4m3fn [N, K] with `X.weight_scale_inv` fp32 [⌈N/bn⌉, ⌈K/bk⌉], W = w · s[n // bn, k // bk];
- int4: compressed-tensors W4A16 `pack-quantized` (llm-compressor): `X.weight_packed` int32 [N, K/8] (eight
  values per word, value + 8 in bits 4i..4i+3), `X.weight_scale` [N, K/G], `X.weight_shape` [2]; symmetric,
  group-wise, no activation quantization; W = (nibble − 8) · s[n, k // G]."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetandem.errors import UnsupportedModelError


@dataclass(frozen=True)
class Scheme:
    method: str  # "mxfp4" | "fp8" | "int4"
    block: tuple[int, int] | None = None  # fp8: rows, columns under one scale
    group: int | None = None  # int4: columns under one scale


def scheme(c: dict[str, Any], path: Path | str = "") -> Scheme | None:
    """The checkpoint's quantization (None: plain bf16/fp16/fp32 weights); a scheme moetandem cannot read is an
    UnsupportedModelError that says what to do."""
    q = c.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "mxfp4":
        return Scheme("mxfp4", group=32)
    if method == "fp8" and isinstance(q.get("weight_block_size"), list) and len(q["weight_block_size"]) == 2:
        bn, bk = (int(v) for v in q["weight_block_size"])
        return Scheme("fp8", block=(bn, bk))
    if method == "compressed-tensors":
        return _compressed_tensors(q, path)
    raise UnsupportedModelError(
        f"{path} is quantized ({method or 'unknown method'})"
        f"{'' if method != 'fp8' else ' without weight_block_size'}; moetandem reads bf16/fp16/fp32 weights, "
        "gpt-oss MXFP4, block-wise FP8 and compressed-tensors W4A16: use one of those releases, or dequantize it")


def _compressed_tensors(q: dict[str, Any], path: Path | str) -> Scheme:
    groups = list((q.get("config_groups") or {}).values())
    w = groups[0].get("weights") or {} if len(groups) == 1 else {}
    ok = (q.get("format") == "pack-quantized" and w.get("num_bits") == 4 and w.get("type", "int") == "int"
          and w.get("symmetric", True) and w.get("strategy") == "group" and w.get("group_size")
          and not groups[0].get("input_activations"))
    if not ok:
        raise UnsupportedModelError(f"{path}: compressed-tensors checkpoints are read only as W4A16 pack-quantized "
                                    "(4-bit symmetric group-wise weights, one config group); use such a release "
                                    "or the bf16 one")
    return Scheme("int4", group=int(w["group_size"]))


def fp8_row_scales(scale_inv: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales [⌈N/bn⌉, ⌈K/bk⌉] -> row-wise group scales [N, K // bk] fp32 (exact: a row repeats its block's)."""
    bn, bk = block
    if k % bk:
        raise UnsupportedModelError(f"a block-FP8 matrix with {k} input columns is not a whole number of {bk}-blocks")
    return scale_inv.float().repeat_interleave(bn, dim=0)[:n]


def int4_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """compressed-tensors int32 [..., N, ⌈K/8⌉] -> nibbles (value + 8) long [..., N, K]."""
    shifts = torch.arange(8, dtype=torch.int64) * 4
    q = (packed.long()[..., None] >> shifts) & 0xF  # [..., N, K/8, 8]
    return q.flatten(-2)[..., :k]


def dense(ckpt: Any, sch: Scheme | None, name: str) -> torch.Tensor:
    """Tensor `name` of the checkpoint, dequantized to fp32 when the scheme stores it quantized (fp8 `X.weight`
    with `X.weight_scale_inv`; int4 `X.weight_packed`), else as stored."""
    t = ckpt.tensor(name)
    if sch is None:
        return t
    if sch.method == "fp8" and t.dtype == torch.float8_e4m3fn and ckpt.has(name + "_scale_inv"):
        n, k = t.shape
        bn, bk = sch.block
        s = ckpt.tensor(name + "_scale_inv").float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return t.float() * s
    if sch.method == "int4" and name.endswith(".weight_packed"):
        base = name.removesuffix("_packed")
        n, k = (int(v) for v in ckpt.tensor(base + "_shape").tolist())
        s = ckpt.tensor(base + "_scale").float()  # [N, K/G]
        return (int4_nibbles(t, k) - 8).float() * s.repeat_interleave(k // s.shape[-1], dim=-1)
    return t


def param_name(sch: Scheme | None, name: str) -> str:
    """The parameter a (renamed) quantized tensor fills: compressed-tensors' X.weight_packed -> X.weight."""
    if sch is not None and sch.method == "int4" and name.endswith(".weight_packed"):
        return name.removesuffix("_packed")
    return name
