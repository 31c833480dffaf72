"""Fused MoE in Triton over a slot table: y = Σ_j w_j · down(act(gate x) ⊙ (up x)), one launch per GEMM for all
experts (the design of vLLM/SGLang's fused_moe; own code).

    align (1 launch; none at T ≤ 2) ─► gate+up GEMM, act ⊙ mul in the epilogue ─► h [T*k, I]
                    ─► down GEMM, routing weight in the epilogue ─► y [T*k, H] fp32 ─► Σ over k, no atomics

Weights are read through a slot table (expert -> slot, -1 = not resident) and arbitrary strides, so the
committee's flat slot buffers (w13/w2 views of one [N, 3IH] buffer) are used in place. Assignments whose slot is
-1 or whose weight is exactly 0 read nothing (on the direct path their y rows are written as zeros, so
fused_moe_parts can hand y itself out and leave the sum over k to torch.compile; aligned: left unwritten). No host
sync and fixed grids: CUDA-graph safe once tuned.
Optional per-expert biases (gpt-oss): the gate/up bias is added to the accumulators before the activation, the
down bias in the down epilogue before the routing weight; read through the same slot table.
Experts in bf16/fp16/fp32 are read as they are; quantized ones (int8, fp8, int4, mxfp4: kernels/quant.py) are
read packed, with their scales, and dequantized tile by tile at the weight loads of the two GEMMs (kernels/tiles.py),
so the bytes a decode step reads are the packed bytes."""
from __future__ import annotations

from typing import Callable

import functools
import os

import torch

from moetandem.kernels import fused_moe_gemv, quant, tuning
from moetandem.kernels.align import Aligned, align, triton_cdiv
from moetandem.kernels.reference import (ACTIVATIONS, Pair, check_args, compute_dtype, fused_moe_reference,
                                         fused_moe_reference_parts, scale_groups)
from moetandem.kernels.sides import Side, sides
from moetandem.kernels.tiles import FMTS  # noqa: F401 (format codes; bench/fused_moe_sass.py)

try:
    import triton
    import triton.language as tl
    import triton.testing

    from moetandem.kernels.align import _keys
    from moetandem.kernels.glu import glu
    from moetandem.kernels.tiles import expert_base, load_a, wdot
except ImportError:
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: up to this many tokens the direct path runs (no alignment launch; one program row per assignment): batch-1/2
#: decode, where two tokens rarely share an expert, so reading an expert once per assignment costs little
DIRECT_MAX_TOKENS = 2
#: MOETANDEM_MOE_GEMV=1 (off until measured on a GPU): the direct path of dense (bf16/fp16/fp32) experts runs the
#: GEMV kernels of kernels/fused_moe_gemv.py (one activation row and a weight tile in registers, no tl.dot on a
#: 16-row tile of which one row is real), tuned under keys of their own (",gemv"); quantized formats, and plans with
#: host experts in a format of their own, keep the tl.dot kernels. Set from the environment at import; the attribute
#: is looked up at each call, so a test or bench/fused_moe.py --gemv may set it in between (a captured graph keeps
#: the kernels it was captured with).
GEMV_DIRECT: bool = os.environ.get("MOETANDEM_MOE_GEMV", "").strip().lower() in ("1", "on")
_QUANT_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)  # int8; int4 and mxfp4; fp8


def fused_moe_supported(device: torch.device | str, dtype: torch.dtype, fmt: str | None = None) -> bool:
    """True where the Triton path runs: CUDA, Triton importable, and the experts' data dtype: bf16 (sm80+), fp16 or
    fp32 weights, or a quantized format's data (int8, uint8 for int4/mxfp4: sm80+; float8_e4m3fn: sm89+).
    fmt, when given, must be the format that dtype holds (quant.data_dtype; any float dtype for bf16)."""
    device = torch.device(device)
    if fmt is not None and fmt != "bf16" and dtype != quant.data_dtype(fmt):
        return False
    if (triton is None or device.type != "cuda" or not torch.cuda.is_available()
            or dtype not in _DTYPES + _QUANT_DTYPES or fmt == "bf16" and dtype not in _DTYPES):
        return False
    cap = torch.cuda.get_device_capability(device)
    return cap >= (8, 9) if dtype == torch.float8_e4m3fn else dtype in (torch.float16, torch.float32) or cap[0] >= 8


if triton is not None:
    @triton.jit
    def _program_rows(pid_m, sorted_ptr, bslot_ptr, brows_ptr, ids_ptr, rw_ptr, table_ptr, M, N, LO, HI,
                      HAS_TABLE: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr):
        """GEMM program pid_m's (slot, or -1 when it has no work; row mask [BM]; assignment index t·k + j of each
        row [BM]; idle: no launch has work for it). DIRECT: program = assignment, one row (no alignment), idle when
        its key is N (not resident, not mapped, or weight 0); else block pid_m of the aligned layout, never idle.
        Only keys in [LO, HI) are this launch's work (a launch per expert format: device slots, mapped host)."""
        offs_m = tl.arange(0, BLOCK_M)
        if DIRECT:
            key = _keys(ids_ptr, rw_ptr, table_ptr, pid_m, M, N, HAS_TABLE)
            slot = tl.where((key >= LO) & (key < HI), key, -1)
            idle = key >= N  # not the other side's key either
            mask_m = offs_m < 1
            a_id = tl.full((BLOCK_M,), 0, tl.int64) + pid_m
        else:
            slot = tl.load(bslot_ptr + pid_m)
            slot = tl.where((slot >= LO) & (slot < HI), slot, -1)
            idle = slot < -1  # (never)
            mask_m = offs_m < tl.load(brows_ptr + pid_m)  # 0 rows in a block without work
            a_id = tl.load(sorted_ptr + pid_m * BLOCK_M + offs_m, mask=mask_m, other=0).to(tl.int64)
        return slot, mask_m, a_id, idle

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, hw_ptr, s_ptr, hs_ptr, b_ptr, hb_ptr, h_ptr, sorted_ptr, bslot_ptr, brows_ptr,
                        ids_ptr, rw_ptr, table_ptr, M, N, K, KP, I, TOP_K, NS, LO, HI, sx_m, sx_k, sw_e, shw_e, sw_n,
                        sw_k, ss_e, shs_e, ss_n, ss_k, sb_e, shb_e, sh_m, alpha, limit, ACT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                        DIRECT: tl.constexpr, HAS_TABLE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        slot, mask_m, a_id, _ = _program_rows(tl.program_id(0), sorted_ptr, bslot_ptr, brows_ptr, ids_ptr, rw_ptr,
                                              table_ptr, M, N, LO, HI, HAS_TABLE, DIRECT, BLOCK_M)
        if slot < 0:
            return
        w_base = expert_base(w_ptr, hw_ptr, slot, NS, sw_e, shw_e)
        s_base = expert_base(s_ptr, hs_ptr, slot, NS, ss_e, shs_e)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        rows = x_ptr + (a_id // TOP_K) * sx_m  # [BM]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a0, a1 = load_a(rows, sx_k, kt, KP, mask_m, h_ptr.dtype.element_ty, FMT, BLOCK_K)
            acc_g = wdot(acc_g, a0, a1, w_base, s_base, offs_n, mask_n, sw_n, sw_k, ss_n, ss_k, kt, KP, FMT, GROUP,
                         PRECISION, BLOCK_K)
            acc_u = wdot(acc_u, a0, a1, w_base + I * sw_n, s_base + I * ss_n, offs_n, mask_n, sw_n, sw_k, ss_n,
                         ss_k, kt, KP, FMT, GROUP, PRECISION, BLOCK_K)
        if HAS_BIAS:  # b13 [2I] (gate; up), rows contiguous
            b_base = expert_base(b_ptr, hb_ptr, slot, NS, sb_e, shb_e)
            acc_g += tl.load(b_base + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_base + I + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        h = glu(acc_g, acc_u, ACT, alpha, limit).to(h_ptr.dtype.element_ty)  # [BM, BN]
        tl.store(h_ptr + a_id[:, None] * sh_m + offs_n[None, :], h, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, hw_ptr, s_ptr, hs_ptr, b_ptr, hb_ptr, y_ptr, rw_ptr, sorted_ptr, bslot_ptr,
                     brows_ptr, ids_ptr, table_ptr, M, NK, K, KP, N, NS, LO, HI, sh_m, sw_e, shw_e, sw_n, sw_k, ss_e,
                     shs_e, ss_n, ss_k, sb_e, shb_e, sy_m, HAS_BIAS: tl.constexpr, FMT: tl.constexpr,
                     GROUP: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr, HAS_TABLE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        slot, mask_m, a_id, idle = _program_rows(tl.program_id(0), sorted_ptr, bslot_ptr, brows_ptr, ids_ptr,
                                                 rw_ptr, table_ptr, M, NK, LO, HI, HAS_TABLE, DIRECT,
                                                 BLOCK_M)  # NK: keys' bound
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if slot < 0:
            if DIRECT:  # an idle assignment's row is zeros (the first side's launch writes them): y fully defined
                tl.store(y_ptr + a_id[:, None] * sy_m + offs_n[None, :], tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                         mask=mask_m[:, None] & mask_n[None, :] & (idle & (LO == 0)))
            return
        w_base = expert_base(w_ptr, hw_ptr, slot, NS, sw_e, shw_e)
        s_base = expert_base(s_ptr, hs_ptr, slot, NS, ss_e, shs_e)
        rows = h_ptr + a_id * sh_m  # [BM]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a0, a1 = load_a(rows, 1, kt, KP, mask_m, h_ptr.dtype.element_ty, FMT, BLOCK_K)
            acc = wdot(acc, a0, a1, w_base, s_base, offs_n, mask_n, sw_n, sw_k, ss_n, ss_k, kt, KP, FMT, GROUP,
                       PRECISION, BLOCK_K)
        if HAS_BIAS:  # b2 [H], before the routing weight
            b_base = expert_base(b_ptr, hb_ptr, slot, NS, sb_e, shb_e)
            acc += tl.load(b_base + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc *= tl.load(rw_ptr + a_id, mask=mask_m, other=0.0).to(tl.float32)[:, None]  # routing weight
        tl.store(y_ptr + a_id[:, None] * sy_m + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _sum_kernel(y_ptr, ids_ptr, rw_ptr, table_ptr, out_ptr, H, N, sy_m, so_t,
                    TOP_K: tl.constexpr, HAS_TABLE: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):  # fixed order over k: deterministic
            a = t * TOP_K + j
            busy = _keys(ids_ptr, rw_ptr, table_ptr, a, a + 1, N, HAS_TABLE) < N
            acc += tl.load(y_ptr + a * sy_m + offs, mask=mask & busy, other=0.0)
        tl.store(out_ptr + t * so_t + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


class _Plan:
    """One call's tensors, alignment and scratch; the launches below run on it (a pair per side: one when every
    expert has the slots' format, two when the mapped host experts have their own, both into the same scratch)."""

    def __init__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, slot_table: torch.Tensor | None, activation: str, block_m: int,
                 host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None, alpha: float = 1.702,
                 limit: float = 7.0, fmt: str = "bf16", scales: Pair | None = None,
                 host_scales: Pair | None = None, direct: bool | None = None, host_fmt: str | None = None,
                 gemv: bool | None = None) -> None:
        self.x, self.table = x, slot_table
        self.has_bias, self.alpha, self.limit = bias is not None, float(alpha), float(limit)
        self.T, self.k = expert_ids.shape
        self.NS, self.H, self.I = w13.shape[0], x.shape[1], w13.shape[1] // 2
        self.N = self.NS + (host[0].shape[0] if host is not None else 0)  # keys: device slots, then host experts
        self.sides = sides(x, w13, w2, host, bias, fmt, scales, host_scales, host_fmt or fmt, self.N)
        self.act = ACTIVATIONS[activation]
        self.ids = expert_ids.reshape(-1).contiguous()  # [T*k]
        self.rw = weights.reshape(-1).contiguous()  # [T*k]
        self.tab = slot_table.contiguous() if slot_table is not None else self.ids  # (never read without a table)
        m = self.T * self.k
        #: direct: one program per assignment in both GEMMs (no alignment launch), for decode-sized batches; else
        #: aligned: assignments bucketed by slot, so a slot's rows share its weight reads
        self.direct = self.T <= DIRECT_MAX_TOKENS if direct is None else direct
        #: gemv (default GEMV_DIRECT): the direct path's GEMV kernels, where every side is dense
        self.gemv = (GEMV_DIRECT if gemv is None else gemv) and _gemv_applies(self.direct, fmt, host_fmt or fmt)
        self.al: Aligned | None = None if self.direct else align(self.ids, self.rw, slot_table, self.N, block_m)
        self.block_m = block_m
        cdt = compute_dtype(x, w13, fmt)
        self.h = torch.empty(m, self.I, dtype=cdt, device=x.device)  # [T*k, I]
        self.y = torch.empty(m, self.H, dtype=torch.float32, device=x.device)  # [T*k, H]
        self.precision = "ieee" if cdt == torch.float32 else "tf32"

    @staticmethod
    def _strides(sd: Side, w: torch.Tensor, hw: torch.Tensor, s: torch.Tensor, hs: torch.Tensor,
                 b: torch.Tensor, hb: torch.Tensor) -> tuple[int, ...]:
        """(sw_e, shw_e, sw_n, sw_k, ss_e, shs_e, ss_n, ss_k, sb_e, shb_e) as the GEMM kernels take them."""
        ss = (s.stride(0), hs.stride(0), s.stride(1), s.stride(2)) if sd.fmt else (0, 0, 0, 0)
        return (w.stride(0), hw.stride(0), w.stride(1), w.stride(2), *ss, b.stride(0), hb.stride(0))

    def up(self, c: tuning.KernelConfig) -> None:
        nb, *blocks = self._blocks()
        for sd in self.sides:
            if self.gemv:
                fused_moe_gemv.gate_up(self.x, sd, self.h, self.ids, self.rw, self.tab, self.table is not None,
                                       self.k, self.NS, self.N, self.act, self.has_bias, self.alpha, self.limit, c)
                continue
            _gate_up_kernel[(nb, triton_cdiv(self.I, c.block_n))](
                self.x, sd.w13, sd.hw13, sd.s13, sd.hs13, sd.b13, sd.hb13, self.h, *blocks, self.ids, self.rw,
                self.tab, self.T * self.k, self.N, self.H, sd.w13.shape[2], self.I, self.k, self.NS, sd.lo, sd.hi,
                *self.x.stride(), *self._strides(sd, sd.w13, sd.hw13, sd.s13, sd.hs13, sd.b13, sd.hb13),
                self.h.stride(0), self.alpha, self.limit, ACT=self.act, HAS_BIAS=self.has_bias, FMT=sd.fmt,
                GROUP=sd.groups[0], PRECISION=self.precision, DIRECT=self.al is None,
                HAS_TABLE=self.table is not None, BLOCK_M=self.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                num_warps=c.num_warps, num_stages=c.num_stages)

    def _blocks(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(programs along M, sorted ids, block slots, block rows); direct: one program per assignment and the
        three never read."""
        al = self.al
        if al is None:
            return self.T * self.k, self.ids, self.ids, self.ids
        return al.num_blocks, al.sorted_ids, al.block_slot, al.block_rows

    def down(self, c: tuning.KernelConfig) -> None:
        nb, *blocks = self._blocks()
        for sd in self.sides:
            if self.gemv:
                fused_moe_gemv.down(self.h, sd, self.y, self.ids, self.rw, self.tab, self.table is not None,
                                    self.NS, self.N, self.has_bias, c)
                continue
            _down_kernel[(nb, triton_cdiv(self.H, c.block_n))](
                self.h, sd.w2, sd.hw2, sd.s2, sd.hs2, sd.b2, sd.hb2, self.y, self.rw, *blocks, self.ids,
                self.tab, self.T * self.k, self.N, self.I, sd.w2.shape[2], self.H, self.NS, sd.lo, sd.hi,
                self.h.stride(0), *self._strides(sd, sd.w2, sd.hw2, sd.s2, sd.hs2, sd.b2, sd.hb2),
                self.y.stride(0), HAS_BIAS=self.has_bias, FMT=sd.fmt, GROUP=sd.groups[1],
                PRECISION=self.precision, DIRECT=self.al is None, HAS_TABLE=self.table is not None,
                BLOCK_M=self.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
                num_stages=c.num_stages)

    def reduce(self) -> torch.Tensor:
        out = torch.empty(self.T, self.H, dtype=self.x.dtype, device=self.x.device)  # [T, H]
        bh = min(1024, triton.next_power_of_2(self.H))
        _sum_kernel[(self.T, triton_cdiv(self.H, bh))](
            self.y, self.ids, self.rw, self.tab, out, self.H, self.N, self.y.stride(0), out.stride(0),
            TOP_K=self.k, HAS_TABLE=self.table is not None, BLOCK_H=bh, num_warps=4)
        return out


def _gemv_applies(direct: bool, fmt: str, host_fmt: str) -> bool:
    """Whether the GEMV kernels can run this plan: the direct path with dense experts on every side."""
    return direct and fmt == "bf16" and host_fmt == "bf16"


def _timer(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=3, rep=15)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _call_shape(expert_ids: torch.Tensor, w13: torch.Tensor, host: tuple[torch.Tensor, ...] | None, fmt: str,
                host_fmt: str | None) -> tuple[int, int, int, bool]:
    """(tokens, top-k, slot ids incl. the miss copies', gemv) of a call, as _Plan decides gemv."""
    T, k = expert_ids.shape
    N = w13.shape[0] + (host[0].shape[0] if host is not None else 0)
    return T, k, N, GEMV_DIRECT and _gemv_applies(T <= DIRECT_MAX_TOKENS, fmt, host_fmt or fmt)


def config_key(x: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, host: tuple[torch.Tensor, ...] | None,
               fmt: str, scales: Pair | None, host_fmt: str | None = None) -> str:
    """The tuning cache's key of a call: its shape bucket, formats, and where the miss copies live ("tier": in
    device memory, --miss-tier device). Misses read over the bus tie every config at the bus's speed, so a config
    tuned there is noise for the same copies in HBM (gpt-oss int8: 1.7x slower than the best, bench/zero_copy.py)."""
    T, k, N, gemv = _call_shape(expert_ids, w13, host, fmt, host_fmt)
    I, H = w13.shape[1] // 2, x.shape[1]
    dtype = str(compute_dtype(x, w13, fmt)).removeprefix("torch.")
    return tuning.cache_key(fmt, dtype, N, H, I, k, T, scale_groups(x, w13, scales)) + (
        ",direct" if T <= DIRECT_MAX_TOKENS else "") + (f",host={host_fmt}" if host_fmt not in (None, fmt) else "") + (
        ",tier" if host is not None and host[0].device.type != "cpu" else "") + (",gemv" if gemv else "")


def _config(x: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, host: tuple[torch.Tensor, ...] | None,
            fmt: str, scales: Pair | None, prepare: Callable[[int], _Plan], host_fmt: str | None = None
            ) -> tuning.MoEConfig:
    """The cached config of this call's shape bucket, else a search over `prepare(block_m)` plans (or the default
    while capturing a graph or with tuning off)."""
    T, k, N, gemv = _call_shape(expert_ids, w13, host, fmt, host_fmt)
    gpu = _gpu_name(x.device.index if x.device.index is not None else torch.cuda.current_device())
    key = config_key(x, expert_ids, w13, host, fmt, scales, host_fmt)
    cfg = tuning.CACHE.get(gpu, key)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing() or not tuning.tuning_enabled():
        return tuning.default_config(T * k, N, gemv)
    cfg = tuning.search([16] if gemv else tuning.block_m_choices(T * k, N), prepare, _Plan.up, _Plan.down, _timer,
                        tuning.GEMV_CANDIDATES if gemv else tuning.CANDIDATES)
    if cfg is None:  # no memory to time the candidates in: the default, for this process only
        cfg = tuning.default_config(T * k, N, gemv)
        tuning.CACHE.remember(gpu, key, cfg)
        return cfg
    tuning.CACHE.put(gpu, key, cfg)
    return cfg


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              slot_table: torch.Tensor | None = None, activation: str = "silu",
              host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None, alpha: float = 1.702,
              limit: float = 7.0, fmt: str = "bf16", scales: Pair | None = None,
              host_scales: Pair | None = None, host_fmt: str | None = None) -> torch.Tensor:
    """x [T, H]; expert_ids [T, k] (model ids 0..E-1); weights [T, k]; w13 [N, 2I, H] (gate; up); w2 [N, H, I]
    (any strides, e.g. views of flat slot buffers); slot_table [E] int (expert -> slot, -1 = not resident; None =
    identity) -> [T, H] = Σ_j w_j · down(act(gate x) ⊙ up x) (+ biases) over assignments with a slot and a non-zero
    weight.
    host: (w13 [E', 2I, H], w2 [E', H, I]) in pinned host memory, same inner strides: a slot-table entry N + e reads
    expert e from there, zero-copy over the bus (exact misses without a copy or a host sync); with biases, also their
    (b13 [E', 2I], b2 [E', H]). bias: (b13 [N, 2I] (gate; up), b2 [N, H]), rows contiguous (views of flat slot
    buffers); activation "clamped_swiglu" takes alpha and limit (gpt-oss).
    fmt: the experts' layout (kernels/quant.py): for a quantized one w13 is [N, 2I, packed_cols(fmt, H)] and w2
    [N, H, packed_cols(fmt, I)] of quant.data_dtype(fmt), scales = (s13 [N, 2I, H // G13], s2 [N, H, I // G2]) of
    quant.scale_dtype(fmt) (any strides; the groups follow from the shapes), host_scales the same for the host
    experts. They are dequantized at the weight loads and never expanded in memory; GEMMs in x's dtype.
    host_fmt: the host experts' own format (default: fmt), e.g. int8 misses beside bf16 slots; host / host_scales
    then have its layout, and the GEMMs run twice, once per format (the device slots', then the host experts'
    assignments only), into one scratch before the one sum over k.
    Triton on CUDA (tuned at first use per shape bucket, never during graph capture); the reference elsewhere."""
    args = (x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, alpha, limit, fmt, scales,
            host_scales, host_fmt or fmt)
    plan = _gemms(*args, zero_idle=False)
    return fused_moe_reference(*args) if plan is None else plan.reduce()


def fused_moe_parts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                    host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None, alpha: float = 1.702,
                    limit: float = 7.0, fmt: str = "bf16", scales: Pair | None = None,
                    host_scales: Pair | None = None, host_fmt: str | None = None) -> torch.Tensor:
    """fused_moe's arguments -> [T, k, H] float32: each assignment's w_j · down(...), zeros where it has no work;
    summed over k in fp32 and cast to x's dtype once it is fused_moe's result. The two GEMMs without the sum's
    launch, so a caller under torch.compile can fuse the sum into what consumes it (experts/executor.py). Meant for
    decode (T <= DIRECT_MAX_TOKENS: the direct path, whose down kernel writes the zeros); above that y is zeroed
    first (one memset more); the reference's per-assignment outputs where fused_moe runs the reference."""
    args = (x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, alpha, limit, fmt, scales,
            host_scales, host_fmt or fmt)
    plan = _gemms(*args, zero_idle=True)
    if plan is None:
        return fused_moe_reference_parts(*args)
    return plan.y.view(plan.T, plan.k, plan.H)


def _gemms(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           slot_table: torch.Tensor | None, activation: str, host: tuple[torch.Tensor, ...] | None,
           bias: Pair | None, alpha: float, limit: float, fmt: str, scales: Pair | None, host_scales: Pair | None,
           host_fmt: str, zero_idle: bool) -> _Plan | None:
    """Checks the arguments, then None where the reference runs (off CUDA, a dtype Triton cannot take, no tokens);
    else this call's plan on its tuned config with both GEMMs run: y holds each assignment's output. zero_idle: rows
    of assignments without work are zeros on the aligned path too (the direct one always writes them)."""
    check_args(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, fmt, scales, host_scales,
               host_fmt)
    if (not fused_moe_supported(x.device, w13.dtype, fmt) or x.shape[0] == 0
            or host is not None and not fused_moe_supported(x.device, host[0].dtype, host_fmt)):
        return None

    def prepare(block_m: int) -> _Plan:
        return _Plan(x, expert_ids, weights, w13, w2, slot_table, activation, block_m, host, bias, alpha, limit, fmt,
                     scales, host_scales, host_fmt=host_fmt)

    cfg = _config(x, expert_ids, w13, host, fmt, scales, prepare, host_fmt)
    plan = prepare(cfg.block_m)
    if zero_idle and plan.al is not None:
        plan.y.zero_()
    plan.up(cfg.up)
    plan.down(cfg.down)
    return plan
