"""The fused MoE's direct path (T <= DIRECT_MAX_TOKENS: one program per assignment) as GEMVs, for dense experts
(bf16/fp16/fp32, format code 0): opt-in through fused_moe.GEMV_DIRECT (MOETANDEM_MOE_GEMV=1), off until measured.

The tl.dot kernels (kernels/fused_moe.py) run a BLOCK_M = 16 tile of which one row is real on the direct path: the
weight tile is staged for the MMA and 15/16 of the A operand and accumulator are padding. Here a program holds its
one activation row x and a weight tile w [BN, BK] in registers, loaded along K (each row's 16-byte vectors
coalesced), and reduces acc [BN] += Σ_k w·x in fp32: no shared-memory staging, BN accumulators instead of 16·BN.
K loop (the model's H or I, a constexpr here): fully unrolled where the config's num_stages is 1 (every tile's loads
in flight at once), else a loop (num_stages goes to Triton, whose 3.6 pipeliner stages no loads that feed no dot: one
tile per iteration); BLOCK_K 0 means the whole K in one tile; acc2d reduces once after the loop, not per tile.

Same contract as the direct tl.dot path: keys in [LO, HI) of the slot table (mapped host experts past NS), biases,
activations through glu, scratch h [T·k, I] in the compute dtype and y [T·k, H] fp32 with the routing weight applied,
idle assignments' y rows written as zeros by the launch with LO == 0; so the sum kernel, fused_moe_parts and
everything downstream are unchanged. Products in fp32 of the operands in the compute dtype (what tl.dot takes)."""
from __future__ import annotations

import torch

from moetandem.kernels.sides import Side
from moetandem.kernels.tuning import KernelConfig

try:
    import triton
    import triton.language as tl

    from moetandem.kernels.align import _keys
    from moetandem.kernels.glu import glu
    from moetandem.kernels.tiles import expert_base
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

if triton is not None:
    @triton.jit
    def _row(row_ptr, s_k, offs_n, kt, K: tl.constexpr, CDT: tl.constexpr, BLOCK_K: tl.constexpr):
        """Columns kt·BK .. of one activation row, rounded to CDT, as fp32 (0 past K), repeated over the weight
        tile's rows: [BN, BK]. Loaded in that shape (every row the same addresses, L1 hits after the first), so it
        has the weight tile's layout: a [BK] vector broadcast to it would be converted through shared memory, a
        barrier per K tile that keeps the next tile's loads from being issued early (seen in sm90 SASS)."""
        offs = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        ptrs = row_ptr + (offs_n * 0)[:, None] + offs[None, :] * s_k  # [BN, BK]
        return tl.load(ptrs, mask=(offs < K)[None, :], other=0.0).to(CDT).to(tl.float32)

    @triton.jit
    def _zeros(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr):
        """A GEMV accumulator: [BN], or [BN, BK] with ACC2D (reduced over BK by _total after the K loop)."""
        if ACC2D:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        return acc

    @triton.jit
    def _total(acc, ACC2D: tl.constexpr):
        """The accumulator as [BN] sums."""
        if ACC2D:
            acc = tl.sum(acc, axis=1)
        return acc

    @triton.jit
    def _wdotv(acc, xv, w_base, offs_n, mask_n, sw_n, sw_k, kt, K: tl.constexpr, BLOCK_K: tl.constexpr,
               ACC2D: tl.constexpr):
        """acc += W[offs_n, k0:k0+BK] · x[k0:k0+BK] (k0 = kt·BK; xv as _row gives it) in fp32, W's tile [BN, BK]
        loaded along K. ACC2D: the products are summed over K tiles elementwise into acc [BN, BK] and reduced once
        after the loop (no shuffles per tile, nor a barrier where warps split K), at BN·BK/threads fp32 registers;
        else reduced per tile into acc [BN]."""
        offs = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        w = tl.load(w_base + offs_n[:, None] * sw_n + offs[None, :] * sw_k,
                    mask=mask_n[:, None] & (offs < K)[None, :], other=0.0)  # [BN, BK]
        p = w.to(tl.float32) * xv
        if ACC2D:
            acc += p
        else:
            acc += tl.sum(p, axis=1)
        return acc

    @triton.jit
    def _gate_up_gemv_kernel(x_ptr, w_ptr, hw_ptr, b_ptr, hb_ptr, h_ptr, ids_ptr, rw_ptr, table_ptr, M, N, I, TOP_K,
                             NS, LO, HI, sx_m, sx_k, sw_e, shw_e, sw_n, sw_k, sb_e, shb_e, sh_m, alpha, limit,
                             K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr,
                             UNROLL: tl.constexpr, ACC2D: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        a = tl.program_id(0)  # assignment t·k + j
        key = _keys(ids_ptr, rw_ptr, table_ptr, a, M, N, HAS_TABLE)
        if (key < LO) | (key >= HI):  # idle, or the other side's
            return
        w_base = expert_base(w_ptr, hw_ptr, key, NS, sw_e, shw_e)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        row = x_ptr + (a // TOP_K).to(tl.int64) * sx_m
        CDT: tl.constexpr = h_ptr.dtype.element_ty
        KT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        acc_g = _zeros(BLOCK_N, BLOCK_K, ACC2D)
        acc_u = _zeros(BLOCK_N, BLOCK_K, ACC2D)
        if UNROLL:
            for kt in tl.static_range(KT):
                xv = _row(row, sx_k, offs_n, kt, K, CDT, BLOCK_K)
                acc_g = _wdotv(acc_g, xv, w_base, offs_n, mask_n, sw_n, sw_k, kt, K, BLOCK_K, ACC2D)
                acc_u = _wdotv(acc_u, xv, w_base + I * sw_n, offs_n, mask_n, sw_n, sw_k, kt, K, BLOCK_K, ACC2D)
        else:
            for kt in range(0, KT):
                xv = _row(row, sx_k, offs_n, kt, K, CDT, BLOCK_K)
                acc_g = _wdotv(acc_g, xv, w_base, offs_n, mask_n, sw_n, sw_k, kt, K, BLOCK_K, ACC2D)
                acc_u = _wdotv(acc_u, xv, w_base + I * sw_n, offs_n, mask_n, sw_n, sw_k, kt, K, BLOCK_K, ACC2D)
        acc_g = _total(acc_g, ACC2D)  # [BN]
        acc_u = _total(acc_u, ACC2D)
        if HAS_BIAS:  # b13 [2I] (gate; up), rows contiguous
            b_base = expert_base(b_ptr, hb_ptr, key, NS, sb_e, shb_e)
            acc_g += tl.load(b_base + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc_u += tl.load(b_base + I + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        h = glu(acc_g, acc_u, ACT, alpha, limit).to(CDT)  # [BN]
        tl.store(h_ptr + a.to(tl.int64) * sh_m + offs_n, h, mask=mask_n)

    @triton.jit
    def _down_gemv_kernel(h_ptr, w_ptr, hw_ptr, b_ptr, hb_ptr, y_ptr, rw_ptr, ids_ptr, table_ptr, M, NK, H, NS, LO,
                          HI, sh_m, sw_e, shw_e, sw_n, sw_k, sb_e, shb_e, sy_m, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, UNROLL: tl.constexpr,
                          ACC2D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        a = tl.program_id(0)
        key = _keys(ids_ptr, rw_ptr, table_ptr, a, M, NK, HAS_TABLE)  # NK: the keys' bound
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        out = y_ptr + a.to(tl.int64) * sy_m + offs_n
        if (key < LO) | (key >= HI):
            # an idle assignment's row is zeros (the first side's launch writes them): y fully defined
            tl.store(out, tl.zeros((BLOCK_N,), tl.float32), mask=mask_n & (key >= NK) & (LO == 0))
            return
        w_base = expert_base(w_ptr, hw_ptr, key, NS, sw_e, shw_e)
        row = h_ptr + a.to(tl.int64) * sh_m
        CDT: tl.constexpr = h_ptr.dtype.element_ty
        KT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        acc = _zeros(BLOCK_N, BLOCK_K, ACC2D)
        if UNROLL:
            for kt in tl.static_range(KT):
                acc = _wdotv(acc, _row(row, 1, offs_n, kt, K, CDT, BLOCK_K), w_base, offs_n, mask_n, sw_n, sw_k, kt, K,
                             BLOCK_K, ACC2D)
        else:
            for kt in range(0, KT):
                acc = _wdotv(acc, _row(row, 1, offs_n, kt, K, CDT, BLOCK_K), w_base, offs_n, mask_n, sw_n, sw_k, kt, K,
                             BLOCK_K, ACC2D)
        acc = _total(acc, ACC2D)  # [BN]
        if HAS_BIAS:  # b2 [H], before the routing weight
            b_base = expert_base(b_ptr, hb_ptr, key, NS, sb_e, shb_e)
            acc += tl.load(b_base + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc *= tl.load(rw_ptr + a).to(tl.float32)  # routing weight
        tl.store(out, acc, mask=mask_n)


def block_k(c: KernelConfig, K: int) -> int:
    """The config's BLOCK_K for reduction length K: 0 = the whole K in one tile (a power of two)."""
    return c.block_k or triton.next_power_of_2(K)


def gate_up(x: torch.Tensor, sd: Side, h: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, tab: torch.Tensor,
            has_table: bool, top_k: int, n_slots: int, n_keys: int, act: int, has_bias: bool, alpha: float,
            limit: float, c: KernelConfig) -> None:
    """h[a] = glu(gate x, up x) (+ biases) for every assignment a = t·k + j whose key is in [sd.lo, sd.hi):
    x [T, H]; h [T·k, I]; ids, rw [T·k]; tab the slot table (ids when has_table is false; never read then);
    n_slots: the device slots (a key past them reads the mapped host experts); n_keys: the keys' bound N."""
    I, K = h.shape[1], x.shape[1]
    bk = block_k(c, K)
    _gate_up_gemv_kernel[(ids.numel(), triton.cdiv(I, c.block_n))](
        x, sd.w13, sd.hw13, sd.b13, sd.hb13, h, ids, rw, tab, ids.numel(), n_keys, I, top_k, n_slots,
        sd.lo, sd.hi, *x.stride(), sd.w13.stride(0), sd.hw13.stride(0), sd.w13.stride(1), sd.w13.stride(2),
        sd.b13.stride(0), sd.hb13.stride(0), h.stride(0), alpha, limit, K=K, ACT=act, HAS_BIAS=has_bias,
        HAS_TABLE=has_table, UNROLL=c.num_stages == 1, ACC2D=c.acc2d, BLOCK_N=c.block_n, BLOCK_K=bk,
        num_warps=c.num_warps, num_stages=c.num_stages)


def down(h: torch.Tensor, sd: Side, y: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, tab: torch.Tensor,
         has_table: bool, n_slots: int, n_keys: int, has_bias: bool, c: KernelConfig) -> None:
    """y[a] = rw[a] · (down h[a] (+ bias)) in fp32 for every assignment a whose key is in [sd.lo, sd.hi); zeros for
    an assignment without work (no slot, or weight 0) where sd.lo == 0. h [T·k, I]; y [T·k, H]."""
    H, K = y.shape[1], h.shape[1]
    bk = block_k(c, K)
    _down_gemv_kernel[(ids.numel(), triton.cdiv(H, c.block_n))](
        h, sd.w2, sd.hw2, sd.b2, sd.hb2, y, rw, ids, tab, ids.numel(), n_keys, H, n_slots, sd.lo, sd.hi,
        h.stride(0), sd.w2.stride(0), sd.hw2.stride(0), sd.w2.stride(1), sd.w2.stride(2), sd.b2.stride(0),
        sd.hb2.stride(0), y.stride(0), K=K, HAS_BIAS=has_bias, HAS_TABLE=has_table, UNROLL=c.num_stages == 1,
        ACC2D=c.acc2d, BLOCK_N=c.block_n, BLOCK_K=bk, num_warps=c.num_warps, num_stages=c.num_stages)
