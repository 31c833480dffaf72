"""Decode-size linear layers in Triton: y [T, N] = x [T, K] · W [N, K]ᵀ (+ bias) for a few tokens (T <= 16), the
weight streamed once from HBM. Two kernels, each a family of tuning candidates (kernels/linear.py picks among them
and cuBLAS per shape):

- "fma": each program owns BLOCK_N rows of W and walks K in BLOCK_K steps, loading each row's [BLOCK_K] slice
  (contiguous, 16-byte vectors) and multiply-adding it with each token's slice of x in fp32, into one [BN, BK]
  accumulator per token (up to 8), summed over K once at the end. x is loaded broadcast to W's tile shape, so it
  lands in W's register layout (the repeats hit the L1): the loop has no shared memory and no barrier. The next K
  step's W tile is loaded before the current one is used (a register double buffer): two tiles per program in flight.
- "dot": tensor cores with the tokens padded to 16 rows (tl.dot's smallest M): W read as a [BLOCK_K, BLOCK_N] tile
  (K-major, as stored), which Triton's pipeliner streams through shared memory with num_stages async copies.

Both may split K over SPLIT_K programs per row block (more programs in flight where N / BLOCK_N alone would leave SMs
idle): each writes fp32 partial sums [SPLIT_K, T, N] and a second small kernel adds them in a fixed order (+ bias),
so the result is deterministic. Without a split the kernel adds the bias and stores x's dtype itself."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing  # noqa: F401 - do_bench, for kernels/linear.py's search
except ImportError:  # CPU-only installs: F.linear needs none of this
    triton = None

MAX_TOKENS = 16  # tl.dot's M; the fma kernel takes up to 8 (one accumulator per token)


@dataclass(frozen=True)
class GemvConfig:
    kind: str  # "fma" or "dot"
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> GemvConfig:
        return GemvConfig(str(d["kind"]), *(int(d[f]) for f in ("block_n", "block_k", "split_k", "num_warps",
                                                                 "num_stages")))


#: tuning candidates (split_k 1: no second kernel); the fma kernel's running products hold BT * BN * BK fp32 values
#: per program, kept to <= 64 a thread (fits()), so its wide tiles drop out as T grows
CANDIDATES = (
    GemvConfig("fma", 4, 512, 1, 4, 1), GemvConfig("fma", 8, 256, 1, 4, 1), GemvConfig("fma", 8, 512, 1, 4, 1),
    GemvConfig("fma", 16, 256, 1, 4, 1), GemvConfig("fma", 16, 512, 1, 8, 1), GemvConfig("fma", 32, 256, 1, 8, 1),
    GemvConfig("fma", 4, 256, 1, 4, 1), GemvConfig("fma", 8, 256, 1, 8, 1),  # these two also at T = 8
    GemvConfig("fma", 4, 512, 2, 4, 1), GemvConfig("fma", 8, 256, 2, 4, 1), GemvConfig("fma", 16, 256, 4, 4, 1),
    GemvConfig("fma", 32, 256, 4, 8, 1),
    GemvConfig("dot", 16, 256, 1, 4, 4), GemvConfig("dot", 32, 128, 1, 4, 4), GemvConfig("dot", 64, 128, 1, 4, 4),
    GemvConfig("dot", 32, 256, 1, 4, 3), GemvConfig("dot", 32, 128, 2, 4, 4), GemvConfig("dot", 64, 128, 4, 4, 4),
)


def block_t(T: int) -> int:
    """Token rows a launch computes: T rounded up to a power of two (16 for the dot kernel, its smallest M)."""
    return 1 << max(0, (T - 1).bit_length())


def fits(c: GemvConfig, T: int) -> bool:
    """Whether a candidate suits T tokens: the fma kernel's running products stay within 64 fp32 registers a
    thread."""
    if c.kind == "dot":
        return T <= MAX_TOKENS
    return T <= 8 and block_t(T) * c.block_n * c.block_k <= 64 * 32 * c.num_warps


if triton is not None:
    @triton.jit
    def _acc(t: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Token t's running products [BN, BK] (a placeholder [1, 1] past BLOCK_T, never touched)."""
        if t < BLOCK_T:
            a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            a = tl.zeros((1, 1), dtype=tl.float32)
        return a

    @triton.jit
    def _tok(acc, x_ptr, t: tl.constexpr, T, s_xt, offs_k, K, w, BLOCK_T: tl.constexpr):
        """acc [BN, BK] += x [t, offs_k] * w [BN, BK] in fp32 (token t < BLOCK_T; rows past T read 0)."""
        if t < BLOCK_T:
            # x's slice broadcast over the rows: a [BN, BK] load in W's register layout (repeats hit the L1), so
            # the products need no layout conversion (a [BK] load would go through shared memory and a barrier)
            cols = tl.broadcast_to(offs_k[None, :], w.shape)
            xs = tl.load(x_ptr + t * s_xt + cols, mask=(cols < K) & (t < T), other=0.0)  # [BN, BK]
            acc += xs.to(tl.float32) * w.to(tl.float32)
        return acc

    @triton.jit
    def _fma_step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, T, s_xt, offs_k, K, w, BLOCK_T: tl.constexpr):
        """Every token's products with one loaded W tile (one accumulator per token: no layout conversions)."""
        a0 = _tok(a0, x_ptr, 0, T, s_xt, offs_k, K, w, BLOCK_T)
        a1 = _tok(a1, x_ptr, 1, T, s_xt, offs_k, K, w, BLOCK_T)
        a2 = _tok(a2, x_ptr, 2, T, s_xt, offs_k, K, w, BLOCK_T)
        a3 = _tok(a3, x_ptr, 3, T, s_xt, offs_k, K, w, BLOCK_T)
        a4 = _tok(a4, x_ptr, 4, T, s_xt, offs_k, K, w, BLOCK_T)
        a5 = _tok(a5, x_ptr, 5, T, s_xt, offs_k, K, w, BLOCK_T)
        a6 = _tok(a6, x_ptr, 6, T, s_xt, offs_k, K, w, BLOCK_T)
        a7 = _tok(a7, x_ptr, 7, T, s_xt, offs_k, K, w, BLOCK_T)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _store_row(acc, b_ptr, y_ptr, t: tl.constexpr, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_T: tl.constexpr):
        """Token t's sums over K (acc [BN, BK] -> [BN]) stored as _store does."""
        if t < BLOCK_T:
            out = tl.sum(acc, axis=1)  # [BN]
            mask = n_ok & (t < T)
            if SPLIT:
                tl.store(y_ptr + pk * s_yk + t * s_yt + offs_n, out, mask=mask)
            else:
                if HAS_BIAS:
                    out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(y_ptr + t * s_yt + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_fma_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, N, K, K_SPLIT, s_xt, s_wn, s_yt, s_yk,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        tl.static_assert(BLOCK_T <= 8)
        pn, pk = tl.program_id(0), tl.program_id(1)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn  # [BN, 1]
        k_lo = pk * K_SPLIT  # this program's K range: [k_lo, k_lo + K_SPLIT), whole tiles; columns past K read 0
        a0, a1 = _acc(0, BLOCK_T, BLOCK_N, BLOCK_K), _acc(1, BLOCK_T, BLOCK_N, BLOCK_K)
        a2, a3 = _acc(2, BLOCK_T, BLOCK_N, BLOCK_K), _acc(3, BLOCK_T, BLOCK_N, BLOCK_K)
        a4, a5 = _acc(4, BLOCK_T, BLOCK_N, BLOCK_K), _acc(5, BLOCK_T, BLOCK_N, BLOCK_K)
        a6, a7 = _acc(6, BLOCK_T, BLOCK_N, BLOCK_K), _acc(7, BLOCK_T, BLOCK_N, BLOCK_K)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)  # [BN, BK]
        for kt in range(1, K_SPLIT // BLOCK_K):  # the next tile is in flight while one is used
            offs_next = k_lo + kt * BLOCK_K + tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + offs_next[None, :], mask=n_ok[:, None] & (offs_next < K)[None, :], other=0.0)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma_step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, T, s_xt, offs_k, K, w,
                                                       BLOCK_T)
            w, offs_k = w_next, offs_next
        a0, a1, a2, a3, a4, a5, a6, a7 = _fma_step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, T, s_xt, offs_k, K, w,
                                                   BLOCK_T)
        _store_row(a0, b_ptr, y_ptr, 0, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a1, b_ptr, y_ptr, 1, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a2, b_ptr, y_ptr, 2, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a3, b_ptr, y_ptr, 3, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a4, b_ptr, y_ptr, 4, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a5, b_ptr, y_ptr, 5, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a6, b_ptr, y_ptr, 6, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)
        _store_row(a7, b_ptr, y_ptr, 7, T, offs_n, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT, BLOCK_T)

    @triton.jit
    def _gemv_dot_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, N, K, K_SPLIT, s_xt, s_wn, s_yt, s_yk,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        pn, pk = tl.program_id(0), tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok, n_ok = offs_t < T, offs_n < N
        k_lo = pk * K_SPLIT
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for kt in range(0, K_SPLIT // BLOCK_K):
            offs_k = k_lo + kt * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xs = tl.load(x_ptr + offs_t[:, None] * s_xt + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [BT, BK]
            w = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + offs_k[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
            acc = tl.dot(xs, w, acc, input_precision=PRECISION)
        _store(acc, b_ptr, y_ptr, offs_t, offs_n, t_ok, n_ok, pk, s_yt, s_yk, HAS_BIAS, SPLIT)

    @triton.jit
    def _store(acc, b_ptr, y_ptr, offs_t, offs_n, t_ok, n_ok, pk, s_yt, s_yk, HAS_BIAS: tl.constexpr,
               SPLIT: tl.constexpr):
        """Without a split: + bias, in y's dtype, at y [t, n]; with one: the fp32 partial at y [pk, t, n]."""
        mask = t_ok[:, None] & n_ok[None, :]
        if SPLIT:
            tl.store(y_ptr + pk * s_yk + offs_t[:, None] * s_yt + offs_n[None, :], acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_t[:, None] * s_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _split_sum_kernel(p_ptr, b_ptr, y_ptr, TN, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                          BLOCK: tl.constexpr):
        """y [T, N] (flat, contiguous) = Σ_s p [s] in order (+ bias)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < TN
        acc = tl.load(p_ptr + offs, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(p_ptr + s * TN + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: GemvConfig) -> torch.Tensor:
    """x [T, K] (unit column stride), weight [N, K] (unit column stride), bias [N] or None, one dtype ->
    y [T, N] in x's dtype, fp32 accumulation, with candidate `c` (1 <= T <= MAX_TOKENS)."""
    T, K = x.shape
    N = weight.shape[0]
    assert 1 <= T <= MAX_TOKENS and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, x.stride(), weight.stride())
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    bt = max(16, block_t(T)) if c.kind == "dot" else block_t(T)
    k_split = triton.cdiv(triton.cdiv(K, c.split_k), c.block_k) * c.block_k  # whole K tiles per split
    split_k = triton.cdiv(K, k_split)
    out = y if split_k == 1 else torch.empty(split_k, T, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, c.block_n), split_k)
    args = (x, weight, x if bias is None else bias, out, T, N, K, k_split, x.stride(0), weight.stride(0),
            out.stride(-2), out.stride(0) if split_k > 1 else 0)
    meta = dict(HAS_BIAS=bias is not None, SPLIT=split_k > 1, BLOCK_T=bt, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                num_warps=c.num_warps, num_stages=c.num_stages)
    if c.kind == "dot":
        _gemv_dot_kernel[grid](*args, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **meta)
    else:
        _gemv_fma_kernel[grid](*args, **meta)
    if split_k > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(T * N, block),)](out, x if bias is None else bias, y, T * N, N,
                                                        HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block,
                                                        num_warps=4)
    return y
