"""The weight side of the fused MoE's two GEMMs: where an expert's bytes are (a device slot or a mapped host
expert), and one K step of `acc += a · Wᵀ` that dequantizes the packed tile as it is loaded (layouts: quant.py).

Formats by code (FMTS): 0 bf16/fp16/fp32 read as they are; 1 int8 and 2 fp8, one value per byte; 3 int4 and
4 mxfp4, two columns per byte (column 2j in the low nibble), unpacked by bit operations into the K-ordered tile
(kernels/nibbles.py): a byte is one (k, k + 1) pair, so the activation tile is used as loaded. Scales: where a group
spans whole K tiles (GROUP % BLOCK_K == 0, e.g. per-channel int8/fp8, int4 groups of 128 with BLOCK_K ≤ 128), the dot
runs on the raw values and its [BM, BN] result is scaled once per tile; otherwise each weight element is scaled
before the dot (mxfp4's groups of 32, for one), from a [BK/G, BN] scale tile spread over its rows where whole groups
fit the tile, else gathered per row; with bf16 activations that product is taken in bf16 (exact for mxfp4's powers
of two; for int4 bf16(s) · (n - 8), one more rounding than bf16((n - 8) · s)), else in fp32. Values convert exactly
to bf16 (int8 ≤ 127, e4m3, int4, FP4), so the tile scale path rounds nothing but the products."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

FMTS = {"bf16": 0, "int8": 1, "fp8": 2, "int4": 3, "mxfp4": 4}  # codes 3 and up: two columns per byte

if triton is not None:
    from moetandem.kernels.nibbles import unpack

    @triton.jit
    def expert_base(dev_ptr, host_ptr, slot, NS, s_dev, s_host):
        """Base pointer of `slot`'s tensor: device slot `slot` (< NS), else mapped host expert `slot - NS`."""
        if slot < NS:
            base = dev_ptr + slot.to(tl.int64) * s_dev
        else:  # zero-copy over the bus
            base = host_ptr + (slot - NS).to(tl.int64) * s_host
        return base

    @triton.jit
    def _scale(s, FMT: tl.constexpr, DT: tl.constexpr):
        """Loaded scales -> multipliers in DT. mxfp4's e8m0 s is 2^(s - 127), built as bits: s << 23 in fp32, s << 7
        in bf16 (s = 0, 2^-127, is a subnormal in both)."""
        if FMT == 4:
            e = s.to(tl.uint32)
            if DT == tl.bfloat16:
                r = tl.where(e == 0, 0x40, e << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                r = tl.where(e == 0, 0x00400000, e << 23).to(tl.float32, bitcast=True).to(DT)
        else:
            r = s.to(tl.float32).to(DT)
        return r

    @triton.jit
    def load_a(rows, sa_k, kt, KP, mask_m, CDT: tl.constexpr, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
        """rows [BM] row pointers -> the activation tile of K tile kt (columns k0 = kt·BK ..) in CDT, twice: (a, a)
        [BM, BK] (every format's wdot takes the tile as loaded; the pair keeps the callers' form). KP: the weights'
        packed columns (K, or K/2 for a packed format: its own argument, so the compiler knows its alignment);
        columns past K read 0."""
        PACK: tl.constexpr = 2 if FMT >= 3 else 1
        offs = tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs < PACK * (KP - kt * (BLOCK_K // PACK)))[None, :]
        a = tl.load(rows[:, None] + (kt * BLOCK_K + offs)[None, :] * sa_k, mask=mask, other=0.0).to(CDT)  # [BM, BK]
        return a, a

    @triton.jit
    def _tile_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, FMT: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """fp32 scales [BN] of K tile kt where one group spans whole tiles (GROUP % BLOCK_K == 0)."""
        g = kt // (GROUP // BLOCK_K)
        return _scale(tl.load(s_base + offs_n * ss_n + g * ss_k, mask=mask_n, other=0), FMT, tl.float32)

    @triton.jit
    def _row_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_K: tl.constexpr, DT: tl.constexpr):
        """Scales of K tile kt for each row of its (unpacked) weight tile: [BK, BN] in DT; K: the columns. Where whole
        groups fit the tile, each is loaded and converted once and spread over its rows."""
        BN: tl.constexpr = offs_n.shape[0]
        if BLOCK_K % GROUP == 0:
            NG: tl.constexpr = BLOCK_K // GROUP
            g = kt * NG + tl.arange(0, NG)  # [NG]
            m = (g * GROUP < K)[:, None] & mask_n[None, :]
            s = _scale(tl.load(s_base + offs_n[None, :] * ss_n + g[:, None] * ss_k, mask=m, other=0), FMT, DT)
            r = tl.reshape(tl.broadcast_to(s[:, None, :], (NG, GROUP, BN)), (BLOCK_K, BN))  # [NG, BN] spread
        else:  # groups straddle tiles: one gathered scale per row
            offs = tl.arange(0, BLOCK_K)
            g = (kt * BLOCK_K + offs) // GROUP  # [BK]
            m = (offs < K - kt * BLOCK_K)[:, None] & mask_n[None, :]
            r = _scale(tl.load(s_base + offs_n[None, :] * ss_n + g[:, None] * ss_k, mask=m, other=0), FMT, DT)
        return r

    @triton.jit
    def wdot(acc, a0, a1, w_base, s_base, offs_n, mask_n, sw_n, sw_k, ss_n, ss_k, kt, KP, FMT: tl.constexpr,
             GROUP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc [BM, BN] += a [BM, k0:k0+BK] · W[offs_n, k0:k0+BK]ᵀ for K tile kt (k0 = kt·BK), W read from w_base
        (+ scales from s_base) in format FMT with scale groups of GROUP along K; a0 (= a1) and KP as load_a gives
        and takes them.
        (Offsets and bounds are products of kt or arguments, never quotients, so the compiler sees their alignment
        and vectorizes the weight loads.)"""
        k0 = kt * BLOCK_K
        if FMT < 3:
            offs = tl.arange(0, BLOCK_K)
            mask = (offs < KP - k0)[:, None] & mask_n[None, :]
            w_ptrs = w_base + offs_n[None, :] * sw_n + (k0 + offs)[:, None] * sw_k  # [BK, BN]
            if FMT == 1:
                w = tl.load(w_ptrs, mask=mask, other=0)
            else:
                w = tl.load(w_ptrs, mask=mask, other=0.0)
            if FMT == 0:
                acc = tl.dot(a0, w, acc, input_precision=PRECISION)
            elif GROUP % BLOCK_K == 0:
                s = _tile_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, FMT, GROUP, BLOCK_K)  # [BN]
                acc += tl.dot(a0, w.to(a0.dtype), input_precision=PRECISION) * s[None, :]
            else:
                s = _row_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, KP, FMT, GROUP, BLOCK_K, tl.float32)
                acc = tl.dot(a0, (w.to(tl.float32) * s).to(a0.dtype), acc, input_precision=PRECISION)
        else:
            offs = tl.arange(0, BLOCK_K // 2)  # bytes
            mask = (offs < KP - kt * (BLOCK_K // 2))[:, None] & mask_n[None, :]
            q = tl.load(w_base + offs_n[None, :] * sw_n + (kt * (BLOCK_K // 2) + offs)[:, None] * sw_k, mask=mask,
                        other=0)  # [BK/2, BN] uint8
            w = unpack(q, FMT, a0.dtype)  # [BK, BN] values in K order (bf16 or fp32)
            if GROUP % BLOCK_K == 0:
                s = _tile_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, FMT, GROUP, BLOCK_K)  # [BN]
                acc += tl.dot(a0, w.to(a0.dtype), input_precision=PRECISION) * s[None, :]
            else:  # in w's dtype: bf16 (the narrow product) or fp32
                s = _row_scales(s_base, offs_n, mask_n, ss_n, ss_k, kt, 2 * KP, FMT, GROUP, BLOCK_K, w.dtype)
                acc = tl.dot(a0, (w * s).to(a0.dtype), acc, input_precision=PRECISION)
        return acc
