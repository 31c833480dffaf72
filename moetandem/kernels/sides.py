"""The fused MoE's sides: which weights one pair of GEMM launches reads. Usually one side covers every key (device
slots [0, NS) and mapped host experts [NS, N) in one format); with host experts in a format of their own (a
committee's --miss-format: bf16 slots, int8 / int4 misses) two sides, each with its own format and key range,
write their rows of the same scratch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moetandem.kernels.reference import Pair, scale_groups
from moetandem.kernels.tiles import FMTS


@dataclass
class Side:
    """What one pair of GEMM launches reads: weights (+ scales, biases) of the device slots and of the mapped host
    experts in one format, and the keys [lo, hi) it computes. Where the host experts have a format of their own,
    each side's pointers are all its own (the other's are never read)."""

    w13: torch.Tensor
    w2: torch.Tensor
    hw13: torch.Tensor
    hw2: torch.Tensor
    s13: torch.Tensor
    s2: torch.Tensor
    hs13: torch.Tensor
    hs2: torch.Tensor
    b13: torch.Tensor
    b2: torch.Tensor
    hb13: torch.Tensor
    hb2: torch.Tensor
    fmt: int  # FMTS code
    groups: tuple[int, int]  # scale groups of w13 and w2
    lo: int
    hi: int


def sides(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, host: tuple[torch.Tensor, ...] | None,
           bias: Pair | None, fmt: str, scales: Pair | None, host_scales: Pair | None, host_fmt: str,
           N: int) -> list[Side]:
    """One side over every key (the host experts, if any, in the slots' format), or two: device slots [0, NS) in
    `fmt`, then mapped host experts [NS, N) in `host_fmt`."""
    b13, b2 = bias if bias is not None else (w13, w2)  # (never read without biases)
    s13, s2 = scales if scales is not None else (w13, w2)  # (never read for bf16)
    dev = (w13, w2, s13, s2, b13, b2)
    hw13, hw2 = host[:2] if host is not None else (w13, w2)
    hb13, hb2 = host[2:4] if host is not None and bias is not None else (b13, b2)
    hs13, hs2 = host_scales if host is not None and host_scales is not None else (s13, s2)
    hst = (hw13, hw2, hs13, hs2, hb13, hb2)
    g_dev = scale_groups(x, w13, scales)
    if host is None or host_fmt == fmt:
        return [Side(*interleave(dev, hst), FMTS[fmt], g_dev, 0, N)]
    g_host = scale_groups(x, host[0], host_scales)
    NS = w13.shape[0]
    return [Side(*interleave(dev, dev), FMTS[fmt], g_dev, 0, NS),
            Side(*interleave(hst, hst), FMTS[host_fmt], g_host, NS, N)]


def interleave(dev: tuple[torch.Tensor, ...], hst: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(w13, w2, s13, s2, b13, b2) of the slots and of the host -> _Side's field order."""
    w13, w2, s13, s2, b13, b2 = dev
    hw13, hw2, hs13, hs2, hb13, hb2 = hst
    return w13, w2, hw13, hw2, s13, s2, hs13, hs2, b13, b2, hb13, hb2
