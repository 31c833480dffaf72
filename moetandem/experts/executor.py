"""The one expert executor: Σ_k w·E(x) over stacked expert weights indexed by slot ids.

Every provider runs its experts here. The all-resident provider passes expert ids (its slot table is the
identity); a committee passes the slot ids its miss policy chose. Assignments whose slot is −1 or whose weight is 0
contribute nothing. Two paths:

- `device_moe` (CUDA, graph-safe: no host sync). Today two grouped GEMMs (`torch._grouped_mm`, CUDA bf16); this is
  the one function to change when the fused Triton kernel lands: `kernels.fused_moe(x, slot_ids, weights, w13,
  w2, identity)` with `identity = torch.arange(n, dtype=torch.int32)`, or pass a committee's expert ids and its
  `slot_table` straight through.
- `loop_moe` (CPU and the rest): one expert FFN per slot that has live rows; syncs for the group sizes.

Rows computed elsewhere (a committee's host-computed misses) come in as `HostRows` and are added in.
The experts' activation (`ExpertActivation`: SwiGLU, GELU, gpt-oss's clamped SwiGLU) and their biases
(`bias = (b13 [n, 2I], b2 [n, H])`, gate/up bias before the activation, down bias before the routing weight) are
passed per call; without them every path computes exactly what it did for the SwiGLU families.

Expert formats (moetandem.experts.formats): `fmt` names the slots' layout; a packed one comes with
`scales = (s13 [n, 2I, H // G], s2 [n, H, I // G])` (and `host_scales` for mapped host experts). The device path
hands them to the fused kernel, which reads the packed bytes; the loop dequantizes one slot at a time. Mapped host
experts may have a format of their own (`host_fmt`: a committee's --miss-format beside bf16 slots).
"""
from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetandem.experts.provider import group_by_expert
from moetandem.kernels import fused_moe_op, fused_moe_parts_op, fused_moe_supported
from moetandem.kernels.fused_moe import DIRECT_MAX_TOKENS
from moetandem.kernels.quant import dequantize
from moetandem.models.expert_activation import SWIGLU, ExpertActivation

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

#: MOETANDEM_MOE_SUM=graph (the default since the H200 A/B of 2026-12-01 in docs/benchmarks.md; =kernel: the fused
#: kernel's own sum launch): in a decode step traced by
#: torch.compile (T <= DIRECT_MAX_TOKENS), the fused MoE hands out its per-assignment outputs
#: (`moetandem::fused_moe_parts`, [T, k, H] fp32) and the sum over k is written as a chain of k - 1 adds, which
#: inductor inlines into the kernel that consumes the MoE output (residual add + next RMSNorm): one launch less per
#: MoE layer. Not `y.sum(1)`: inductor unrolls only reductions of fewer than `unroll_reductions_threshold` (8)
#: elements, so at top-8 (OLMoE, Qwen3, DeepSeek-V3) and above (Qwen3-Next's top-10) the sum would stay a reduction
#: kernel of its own and nothing would be saved; the chain stays one fused kernel (seen up to k = 16 in inductor's
#: Triton scheduling, torch 2.13, on the CPU). Same numerics: fp32 adds in k's order, one cast to x's dtype. Eager
#: steps keep the kernel's sum (there the chain would be k launches). Read once at import; dynamo guards on this
#: global, so a test or bench/decode.py may set it between engines and the next trace follows it.
MOE_SUM_GRAPH: bool = os.environ.get("MOETANDEM_MOE_SUM", "graph").strip().lower() == "graph"

#: MOETANDEM_PREFILL_GROUPED_MM=N (off until measured on a GPU; 0 / unset: off): a step of at least N tokens over
#: bf16 SwiGLU slots with nothing mapped runs torch's grouped GEMM (the path transformers' `grouped_mm` experts take)
#: instead of the fused kernel. The H200 measured our 512-token prefill at 0.82x transformers' on the Qwen3 shape
#: (128 experts, ~32 rows each), where cuBLAS's grouped tiles may beat the fused kernel's; decode is untouched.
PREFILL_GROUPED_MM: int = int(os.environ.get("MOETANDEM_PREFILL_GROUPED_MM", "0") or 0)


@dataclass
class HostRows:
    """Outputs of assignments computed outside the slot buffer: y[i] is E(x[token[i]]) for assignment
    (token[i], col[i]); its weight is weights[token[i], col[i]] and its slot id is −1."""

    token: torch.Tensor  # [m] long, on the compute device
    col: torch.Tensor  # [m] long
    y: torch.Tensor  # [m, H] in x's dtype


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """CUDA grouped GEMM (sm80+) wants bf16 and 16-byte aligned rows."""
    return (_grouped_mm is not None and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] >= 8 and all(d % 8 == 0 for d in dims))


def device_path_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...],
                          act: ExpertActivation = SWIGLU) -> bool:
    """The executor's device path runs here: the fused Triton kernel (gated experts), or grouped GEMMs."""
    return (act.gated and fused_moe_supported(device, dtype)) or grouped_mm_supported(device, dtype, dims)


Bias = tuple[torch.Tensor, torch.Tensor]  # b13 [n, 2I] (gate; up), b2 [n, H]
Scales = tuple[torch.Tensor, torch.Tensor]  # s13 [n, 2I, H // G], s2 [n, H, I // G]


def device_format_supported(fmt: str, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """The device path runs experts in `fmt`: bf16 as device_path_supported; packed formats need the fused kernel."""
    return device_path_supported(device, dtype, dims) if fmt == "bf16" else fused_moe_supported(device, dtype)


def run_experts(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, grouped: bool, host: HostRows | None = None,
                mapped: tuple[torch.Tensor, ...] | None = None, act: ExpertActivation = SWIGLU,
                bias: Bias | None = None, fmt: str = "bf16", scales: Scales | None = None,
                host_scales: Scales | None = None, host_fmt: str | None = None) -> torch.Tensor:
    """x [T, H]; slot_ids [T, k] (−1: nothing on the device; n + e: expert e read zero-copy from `mapped`, its
    pinned host weights [E, 2I, H] / [E, H, I] (+ biases [E, 2I] / [E, H] for biased experts), in `host_fmt`
    (default fmt) with `host_scales`); weights [T, k];
    w13 [n, 2I, H] (gate; up), w2 [n, H, I] (packed formats: their data, with `scales`); act, bias, fmt: see the
    module docstring -> [T, H] in x's dtype. grouped: the device path (no host sync), else the per-slot loop."""
    if act.bias != (bias is not None):
        raise ValueError(f"expert activation {act} {'needs' if act.bias else 'takes no'} biases")
    if (fmt != "bf16") != (scales is not None):
        raise ValueError(f"{fmt} experts {'need' if fmt != 'bf16' else 'take no'} scales")
    if grouped and fmt != "bf16":
        out = packed_moe(x, slot_ids, weights, w13, w2, mapped, act, bias, fmt, scales, host_scales,
                         host_fmt)  # [T, H]
        if host is not None and host.token.numel():
            g = weights[host.token, host.col].to(host.y.dtype)  # [m]
            out.index_add_(0, host.token, host.y * g[:, None])
        return out
    if grouped:
        out = device_moe(x, slot_ids, weights, w13, w2, mapped, act, bias, host_scales, host_fmt)  # [T, H]
        if host is not None and host.token.numel():
            g = weights[host.token, host.col].to(host.y.dtype)  # [m]
            out.index_add_(0, host.token, host.y * g[:, None])
        return out
    return loop_moe(x, slot_ids, weights, w13, w2, host, act, bias, fmt, scales)


def packed_moe(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, mapped: tuple[torch.Tensor, ...] | None, act: ExpertActivation, bias: Bias | None,
               fmt: str, scales: Scales, host_scales: Scales | None, host_fmt: str | None = None) -> torch.Tensor:
    """The device path over packed slots: the fused kernel (as the custom op, for torch.compile) reads data +
    scales in place, and mapped host experts zero-copy (graph-safe)."""
    hw13, hw2, hb13, hb2 = (*mapped, None, None)[:4] if mapped is not None else (None, None, None, None)
    b13, b2 = bias if bias is not None else (None, None)
    hs13, hs2 = host_scales if host_scales is not None else (None, None)
    return _fused_moe(x, slot_ids, weights, w13, w2, None, act.kind, hw13, hw2, b13, b2, hb13, hb2, act.alpha,
                      act.limit, fmt=fmt, s13=scales[0], s2=scales[1], host_s13=hs13, host_s2=hs2,
                      host_fmt=host_fmt)  # [T, H]


def _fused_moe(x: torch.Tensor, slot_ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """fused_moe_op(x, slot_ids, ...) -> [T, H] in x's dtype; with MOE_SUM_GRAPH in a compiled decode step, its
    per-assignment op and the sum over k as pointwise adds that inductor fuses into the consumer."""
    if not (MOE_SUM_GRAPH and x.shape[0] <= DIRECT_MAX_TOKENS and torch.compiler.is_compiling()):
        return fused_moe_op(x, slot_ids, *args, **kwargs)
    y = fused_moe_parts_op(x, slot_ids, *args, **kwargs)  # [T, k, H] fp32, zeros where nothing ran
    return functools.reduce(operator.add, y.unbind(1)).to(x.dtype)  # [T, H]


def device_moe(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, mapped: tuple[torch.Tensor, ...] | None = None, act: ExpertActivation = SWIGLU,
               bias: Bias | None = None, host_scales: Scales | None = None,
               host_fmt: str | None = None) -> torch.Tensor:
    """The CUDA path, graph-safe (nothing waits on the host): the fused Triton kernel over the slot buffers
    (slot ids as expert ids, identity table; −1 and weight 0 read nothing). Without Triton: grouped GEMMs where
    every assignment runs (slot −1 on slot 0) and outputs of slot −1 are masked out. host_fmt / host_scales: the
    mapped host experts' own packed format (a committee's --miss-format)."""
    if act.gated and (fused_moe_supported(x.device, w13.dtype) or mapped is not None) and not _prefill_grouped(
            x, w13, mapped, act, bias):  # (reference off CUDA)
        hw13, hw2, hb13, hb2 = (*mapped, None, None)[:4] if mapped is not None else (None, None, None, None)
        if host_fmt not in (None, "bf16"):  # packed misses beside bf16 slots
            b13, b2 = bias if bias is not None else (None, None)
            hs13, hs2 = host_scales if host_scales is not None else (None, None)
            return _fused_moe(x, slot_ids, weights, w13, w2, None, act.kind, hw13, hw2, b13, b2, hb13, hb2,
                              act.alpha, act.limit, host_s13=hs13, host_s2=hs2, host_fmt=host_fmt)  # [T, H]
        if act == SWIGLU:  # the SwiGLU families' call, unchanged
            return _fused_moe(x, slot_ids, weights, w13, w2, None, "silu", hw13, hw2)  # [T, H]
        b13, b2 = bias if bias is not None else (None, None)
        return _fused_moe(x, slot_ids, weights, w13, w2, None, act.kind, hw13, hw2, b13, b2, hb13, hb2,
                          act.alpha, act.limit)  # [T, H]
    n = w13.shape[0]
    I = w2.shape[-1]
    T, k = slot_ids.shape
    valid = slot_ids >= 0  # [T, k]
    groups = group_by_expert(slot_ids.clamp_min(0).long(), n)
    xs = x[groups.token]  # [T*k, H] rows sorted by slot
    offs = groups.counts.cumsum(0, dtype=torch.int32)  # [n]
    h = _grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [T*k, 2I]
    if act == SWIGLU:
        ys = _grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(1, 2), offs=offs)  # [T*k, H]; h [T*k, 2I]
    else:
        slot = slot_ids.clamp_min(0).long().reshape(-1)[groups.order]  # [T*k] slot of each sorted row
        if bias is not None:
            h = h + bias[0][slot]  # [T*k, 2I]
        ys = _grouped_mm(act.hidden(h).to(h.dtype), w2.transpose(1, 2), offs=offs)  # [T*k, H]
        if bias is not None:
            ys = ys + bias[1][slot]
    y = torch.empty_like(ys)
    y[groups.order] = ys
    y = y.view(T, k, -1).masked_fill(~valid[..., None], 0)  # [T, k, H]; a slot in transit may hold anything
    return (y * weights.to(y.dtype)[..., None]).sum(dim=1)


def _prefill_grouped(x: torch.Tensor, w13: torch.Tensor, mapped: tuple[torch.Tensor, ...] | None,
                     act: ExpertActivation, bias: Bias | None) -> bool:
    """PREFILL_GROUPED_MM: this step takes the grouped-GEMM path instead of the fused kernel."""
    return (0 < PREFILL_GROUPED_MM <= x.shape[0] and mapped is None and bias is None and act == SWIGLU
            and grouped_mm_supported(x.device, w13.dtype, (w13.shape[1] // 2, w13.shape[2])))


def loop_moe(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, host: HostRows | None = None, act: ExpertActivation = SWIGLU,
             bias: Bias | None = None, fmt: str = "bf16", scales: Scales | None = None) -> torch.Tensor:
    """One expert FFN per slot on its live rows (slot ≥ 0, weight ≠ 0); host rows slot in before the weighted sum,
    so a committee with exact policies matches the all-resident provider bit for bit. Packed slots are
    dequantized to x's dtype one at a time."""
    n = w13.shape[0]
    T, k = slot_ids.shape
    live = (slot_ids >= 0) & (weights != 0)  # [T, k]
    groups = group_by_expert(torch.where(live, slot_ids.long(), n), n + 1)  # dead rows sort last
    xs = x[groups.token]  # [T*k, H]
    ys = torch.zeros_like(xs)
    start = 0
    for s, c in enumerate(groups.counts[:n].tolist()):
        if c:
            b13, b2 = (bias[0][s], bias[1][s]) if bias is not None else (None, None)
            a, b = w13[s], w2[s]
            if scales is not None:
                a = dequantize(a, scales[0][s], fmt).to(x.dtype)  # [2I, H]
                b = dequantize(b, scales[1][s], fmt).to(x.dtype)  # [H, I]
            ys[start:start + c] = act.ffn(xs[start:start + c], a, b, b13, b2)
            start += c
    y = torch.empty_like(ys)
    y[groups.order] = ys
    y = y.view(T, k, -1)  # [T, k, H]
    if host is not None and host.token.numel():
        y[host.token, host.col] = host.y.to(y.dtype)
    return (y * weights.to(y.dtype)[..., None]).sum(dim=1)
