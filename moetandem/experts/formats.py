"""Expert formats: how one routed expert is held as one row of a slot buffer, the unit every provider stores,
pins, swaps and maps.

`bf16` ("dense") is the expert unquantized in the compute dtype: the row is [gate | up | down (| b_gate | b_up |
b_down)] in that dtype, exactly the flat layout the providers have always used (store.flat_views). Every other
format (int8, fp8, int4, mxfp4; moetandem.kernels.quant defines their packed layouts) is a row of raw bytes:

    w13 data [2I, packed_cols(H)] | s13 [2I, H // G13] | w2 data [H, packed_cols(I)] | s2 [H, I // G2]
    (| b13 [2I] | b2 [H])

each piece at a 16-byte aligned offset, biases in the compute dtype. `views` turns a [n, row] buffer into the
kernel's (w13, w2, scales, bias) with dtype views of contiguous column ranges, so a swap stays one copy of one
row and the fused kernel reads the slots in place. The eager path (CPU loop, host misses) dequantizes one expert
at a time to the compute dtype and runs the usual activation FFN."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moetandem.config import EXPERT_FORMATS
from moetandem.errors import InvalidRequestError
from moetandem.experts.store import flat_bias_views, flat_views
from moetandem.kernels.quant import FORMATS, check_format, data_dtype, default_group, dequantize, packed_cols, quantize
from moetandem.kernels.quant import scale_dtype
from moetandem.models.expert_activation import ExpertActivation

CHOICES = EXPERT_FORMATS  # what --expert-format takes
ALIGN = 16


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Piece:
    name: str  # w13, s13, w2, s2, b13, b2
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the row

    @property
    def nbytes(self) -> int:
        return _size(self.dtype) * int(torch.Size(self.shape).numel())


@dataclass
class ExpertViews:
    """What the executor and the fused kernel read: views of a [n, row] buffer (or of one row, without the n)."""

    w13: torch.Tensor  # [n, 2I, packed_cols(H)] (gate; up)
    w2: torch.Tensor  # [n, H, packed_cols(I)]
    scales: tuple[torch.Tensor, torch.Tensor] | None  # s13 [n, 2I, H // G13], s2 [n, H, I // G2]; None for bf16
    bias: tuple[torch.Tensor, torch.Tensor] | None  # b13 [n, 2I], b2 [n, H] in the compute dtype


class ExpertFormat:
    """One expert of shape (inter I, hidden H) in format `name`; `dtype` is the compute dtype (bf16's data, and
    the biases of every format); `group`: columns under one scale (default: quant.default_group per matrix; a
    pre-quantized checkpoint's own, e.g. 128 for block FP8)."""

    def __init__(self, name: str, inter: int, hidden: int, dtype: torch.dtype, bias: bool = False,
                 group: int | None = None, gated: bool = True) -> None:
        self.name, self.inter, self.hidden, self.dtype, self.bias = check_format(name), inter, hidden, dtype, bias
        #: gate + up (SwiGLU-like) experts; False: a plain expert (Switch: wi [I, H], wo [H, I]), bf16 only
        self.gated = gated
        if not gated and name != "bf16":
            raise InvalidRequestError(f"--expert-format {name}: this model's experts are plain (not gated) MLPs, "
                                      "which run in bf16 only; use --expert-format bf16")
        self.group13 = group or default_group(name, hidden)  # along H (w13's input columns)
        self.group2 = group or default_group(name, inter)  # along I (w2's input columns)
        if not self.dense and (hidden % self.group13 or inter % self.group2):
            raise InvalidRequestError(f"{name} experts with group {group} need it to divide the hidden size "
                                      f"{hidden} and the expert intermediate size {inter}")
        self.pieces = self._layout()
        end = self.pieces[-1].offset + self.pieces[-1].nbytes
        #: bytes of one expert (a slot, a swap, the budget's unit)
        self.nbytes = end if self.dense else -(-end // ALIGN) * ALIGN

    @property
    def dense(self) -> bool:
        return self.name == "bf16"

    @property
    def row_dtype(self) -> torch.dtype:
        """Element type of a slot buffer: the compute dtype for bf16, raw bytes otherwise."""
        return self.dtype if self.dense else torch.uint8

    @property
    def row_numel(self) -> int:
        return self.nbytes // _size(self.row_dtype)

    def __repr__(self) -> str:
        return f"ExpertFormat({self.name}, I={self.inter}, H={self.hidden}, {self.nbytes} B)"

    def _layout(self) -> list[Piece]:
        I, H, dt = self.inter, self.hidden, self.dtype
        if self.dense:
            spec = [("w13", dt, ((2 if self.gated else 1) * I, H)), ("w2", dt, (H, I))]
        else:
            dd, sd = data_dtype(self.name), scale_dtype(self.name)
            spec = [("w13", dd, (2 * I, packed_cols(self.name, H))), ("s13", sd, (2 * I, H // self.group13)),
                    ("w2", dd, (H, packed_cols(self.name, I))), ("s2", sd, (H, I // self.group2))]
        if self.bias:
            spec += [("b13", dt, (2 * I,)), ("b2", dt, (H,))]
        out, at = [], 0
        for name, dtype, shape in spec:
            if not self.dense:
                at = -(-at // ALIGN) * ALIGN
            out.append(Piece(name, dtype, shape, at))
            at += out[-1].nbytes
        return out

    # ------------------------------------------------------------------ buffers and views
    def empty(self, n: int, device: torch.device | str = "cpu", pin: bool = False) -> torch.Tensor:
        """A slot buffer of n experts [n, row_numel]."""
        return torch.empty(n, self.row_numel, dtype=self.row_dtype, device=device, pin_memory=pin)

    def _piece(self, b: torch.Tensor, p: Piece) -> torch.Tensor:
        """Piece p of byte rows b [..., nbytes]: a dtype view of its contiguous column range."""
        return b[..., p.offset:p.offset + p.nbytes].view(p.dtype).unflatten(-1, p.shape)

    def views(self, buf: torch.Tensor) -> ExpertViews:
        """buf [..., row_numel] (a slot buffer, a pinned host buffer, or one row) -> the kernel's views."""
        if self.dense:
            w13, w2 = flat_views(buf, self.inter, self.hidden, self.gated)
            bias = flat_bias_views(buf, self.inter, self.hidden) if self.bias else None
            return ExpertViews(w13, w2, None, bias)
        b = buf.view(torch.uint8)  # [..., nbytes]
        v = {p.name: self._piece(b, p) for p in self.pieces}
        return ExpertViews(v["w13"], v["w2"], (v["s13"], v["s2"]), (v["b13"], v["b2"]) if self.bias else None)

    # ------------------------------------------------------------------ packing
    def pack(self, w13: torch.Tensor, w2: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """One expert from dense weights w13 [2I, H] (gate; up), w2 [H, I] (+ b13 [2I], b2 [H]) -> a row
        [row_numel], quantized round-to-nearest, on w13's device."""
        if self.dense:
            parts = [w13, w2, *(bias or ())]
            return torch.cat([p.reshape(-1).to(self.dtype) for p in parts])
        d13, s13 = quantize(w13, self.name, self.group13)
        d2, s2 = quantize(w2, self.name, self.group2)
        return self.pack_parts(d13, s13, d2, s2, bias)

    def pack_parts(self, d13: torch.Tensor, s13: torch.Tensor, d2: torch.Tensor, s2: torch.Tensor,
                   bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """A row from parts already in the format's layout (a pre-quantized checkpoint, or `quantize`)."""
        if self.dense:
            raise InvalidRequestError("bf16 experts have no packed parts; use pack()")
        row = torch.zeros(self.nbytes, dtype=torch.uint8, device=d13.device)
        given = {"w13": d13, "s13": s13, "w2": d2, "s2": s2, **(dict(zip(("b13", "b2"), bias)) if bias else {})}
        for p in self.pieces:
            t = given[p.name]
            if tuple(t.shape) != p.shape:
                raise InvalidRequestError(f"{self.name} expert part {p.name} has shape {tuple(t.shape)}, "
                                          f"the format wants {p.shape}")
            row[p.offset:p.offset + p.nbytes] = t.to(p.dtype).contiguous().reshape(-1).view(torch.uint8)
        return row

    def unpack(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor | None]:
        """One row -> w13 [2I, H], w2 [H, I], b13, b2 in the compute dtype (views for bf16, else dequantized)."""
        v = self.views(row)
        b13, b2 = v.bias if v.bias is not None else (None, None)
        if v.scales is None:
            return v.w13, v.w2, b13, b2
        return (dequantize(v.w13, v.scales[0], self.name).to(self.dtype),
                dequantize(v.w2, v.scales[1], self.name).to(self.dtype), b13, b2)

    def dequantize_slot(self, v: ExpertViews, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [2I, H], w2 [H, I] of slot `slot` of buffer views, in the compute dtype."""
        if v.scales is None:
            return v.w13[slot], v.w2[slot]
        return (dequantize(v.w13[slot], v.scales[0][slot], self.name).to(self.dtype),
                dequantize(v.w2[slot], v.scales[1][slot], self.name).to(self.dtype))

    def ffn(self, act: ExpertActivation, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """One expert (a row) on rows x [T, H] -> [T, H], eagerly in the compute dtype."""
        w13, w2, b13, b2 = self.unpack(row)
        return act.ffn(x, w13, w2, b13, b2)


def resolve(requested: str, store: Any, dtype: torch.dtype, device: torch.device) -> ExpertFormat:
    """--expert-format -> the ExpertFormat of this checkpoint's experts: `auto` keeps a pre-quantized checkpoint's
    own format (its group too), else bf16; an explicit format quantizes on load (or keeps the checkpoint's packed
    experts when it is theirs)."""
    if requested not in CHOICES:
        raise InvalidRequestError(f"--expert-format {requested!r}: choose one of {', '.join(CHOICES)}")
    native = getattr(store, "native_format", None)
    name = (native or "bf16") if requested == "auto" else requested
    check_device(name, device)
    group = getattr(store, "native_group", None) if name == native else None
    return ExpertFormat(name, store.inter, store.hidden, dtype, bias=store.activation.bias, group=group,
                        gated=store.activation.gated)


def check_device(name: str, device: torch.device) -> None:
    """A format the device cannot run is a user error, raised before anything loads."""
    check_format(name)
    if name == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise InvalidRequestError(f"--expert-format fp8 needs a GPU with FP8 support (sm89+: Ada, Hopper); this "
                                  f"one is sm{major}{minor}: use --expert-format int8 (same bytes) or int4")
    if name in ("fp8",) and device.type == "mps":
        raise InvalidRequestError("--expert-format fp8 does not run on MPS; use int8 or int4")


__all__ = ["CHOICES", "FORMATS", "ExpertFormat", "ExpertViews", "check_device", "resolve"]
