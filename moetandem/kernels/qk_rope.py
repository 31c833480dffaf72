"""The decode prologue of grouped-query attention in one launch: for one new token per sequence, the packed qkv
projection's output goes through the q/k RMSNorm (per head or over all heads), RoPE, the K/V cache write and the
decode kernel's lengths, work that inductor otherwise spreads over ~9 small kernels per layer (two norm
reductions, rotate_half's negate + cat for q and k, the cache index_puts, the lengths).

    qkv [B, 1, nH·D | nKV·D | nKV·D] ─► grid (B, 2): program 0 normalises and turns q ─► q [B, nH, D]
                                                     program 1 normalises and turns k ─► k_cache[rows[b], pos[b]]
                                                               copies v              ─► v_cache[rows[b], pos[b]]
                                                               min(pos[b] + 1, kv_len) ─► lengths [B]

The math follows the PyTorch path (components/norm.py's RMSNorm, components/rope.py's apply_rope): the norm in
fp32, its result rounded to the activations' dtype at the point RMSNorm rounds it ("cast": normalise, round, times
the weight, round; "offset": times (1 + w) in fp32, round; "fp32": times w in fp32, round; "none": round), then
x · cos + rotate_half(x) · sin in fp32 with one rounding (as inductor computes it; eager rounds each product:
bf16 results within an ulp or two). RoPE pairs (i, i + D/2) over the whole head (no partial rotary). The normed
value is rounded to qkv's dtype: RMSNorm's "cast" matches it when its weight has that dtype, as a loaded model's
does. rows/pos/lengths are device tensors and the grid depends on shapes only: CUDA-graph safe, no host sync."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

NORMS = ("none", "head", "full")  # no q/k norm, RMSNorm per head over D, RMSNorm over all heads (nH·D / nKV·D)
KINDS = ("cast", "offset", "fp32", "none")  # components/norm.py's RMSNorm kinds, in the kernel's numbering


def _check(qkv: torch.Tensor, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor, norm: str, kind: str) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v caches [R, S, nKV, D] expected, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    nKV, D = k_cache.shape[2], k_cache.shape[3]
    B = qkv.shape[0]
    if qkv.dim() != 3 or qkv.shape[1] != 1 or qkv.shape[2] != (num_heads + 2 * nKV) * D or D % 2:
        raise ValueError(f"qkv [B, 1, (nH + 2 nKV)·D] with an even D expected, got {tuple(qkv.shape)} for nH = "
                         f"{num_heads}, nKV = {nKV}, D = {D}")
    if cos.shape != (B, 1, D) or sin.shape != (B, 1, D):
        raise ValueError(f"cos/sin [B, 1, D={D}] expected (full rotary), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if pos.shape != (B, 1) or (rows is not None and rows.shape != (B,)):
        raise ValueError(f"pos [B={B}, 1] and rows [B] expected, got {tuple(pos.shape)}")
    if norm not in NORMS or kind not in KINDS:
        raise ValueError(f"norm must be one of {NORMS} and kind one of {KINDS}, got {norm!r}, {kind!r}")


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim of fp32 x, rounded to dtype as components/norm.py rounds it; fp32 out."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "cast":
        assert w is not None
        return (h.to(dtype).float() * w.float()).to(dtype).float()
    if kind == "none":
        return h.to(dtype).float()
    assert w is not None
    return (h * (1.0 + w.float() if kind == "offset" else w.float())).to(dtype).float()


def decode_qk_rope_reference(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                             eps: float, norm: str, kind: str, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None,
                             pos: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in PyTorch (any device); arguments and results as decode_qk_rope."""
    _check(qkv, num_heads, k_cache, v_cache, cos, sin, rows, pos, norm, kind)
    B, nKV, D = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
    nq = num_heads * D
    x = qkv[:, 0].float()  # [B, (nH + 2 nKV)·D]
    q, k, v = x[:, :nq], x[:, nq:nq + nKV * D], qkv[:, 0, nq + nKV * D:]
    if norm == "full":
        q, k = _rms(q, q_weight, eps, kind, qkv.dtype), _rms(k, k_weight, eps, kind, qkv.dtype)
    q, k = q.view(B, num_heads, D), k.view(B, nKV, D)
    if norm == "head":
        q, k = _rms(q, q_weight, eps, kind, qkv.dtype), _rms(k, k_weight, eps, kind, qkv.dtype)
    c, s = cos.float(), sin.float()  # [B, 1, D]: one row per sequence, shared by its heads

    def turn(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return t * c + torch.cat([-t2, t1], dim=-1) * s

    r = torch.arange(B, device=qkv.device) if rows is None else rows.long()
    p = pos[:, 0].long()
    k_cache[r, p] = turn(k).to(qkv.dtype).to(k_cache.dtype)
    v_cache[r, p] = v.reshape(B, nKV, D).to(v_cache.dtype)
    return turn(q).to(qkv.dtype), (pos[:, 0] + 1).clamp(max=kv_len)


def decode_qk_rope_triton(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                          eps: float, norm: str, kind: str, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor,
                          kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (CUDA, or the CPU under TRITON_INTERPRET=1); arguments and results as decode_qk_rope."""
    assert triton is not None, "decode_qk_rope_triton needs triton"
    _check(qkv, num_heads, k_cache, v_cache, cos, sin, rows, pos, norm, kind)
    if any(t.stride(-1) != 1 for t in (qkv, cos, sin, k_cache, v_cache)):
        raise ValueError("qkv, cos/sin and the caches need a unit stride over the last dim")
    if norm != "none" and (kind != "none") != (q_weight is not None and k_weight is not None):
        raise ValueError(f"norm kind {kind!r} needs q and k weights exactly when it scales")
    B, nKV, D = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
    q = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)  # [B, nH, D]
    lengths = torch.empty(B, dtype=pos.dtype, device=pos.device)  # [B]
    block_hq, block_hk = triton.next_power_of_2(num_heads), triton.next_power_of_2(nKV)
    block_d = triton.next_power_of_2(D)
    wq = q_weight if q_weight is not None else qkv  # unused pointers when there is no weight
    wk = k_weight if k_weight is not None else qkv
    s_rows = rows.stride(0) if rows is not None else 0
    _qk_rope_kernel[(B, 2)](
        qkv, wq, wk, cos, sin, k_cache, v_cache, rows if rows is not None else pos, pos, q, lengths,
        qkv.stride(0), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), pos.stride(0), s_rows, num_heads, nKV, D, kv_len,
        float(eps), NORM=NORMS.index(norm), KIND=KINDS.index(kind), HAS_ROWS=rows is not None,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=max(4, min(16, block_hq * block_d // 256)))
    return q, lengths


def decode_qk_rope(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                   norm: str, kind: str, num_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor,
                   kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per sequence: qkv [B, 1, nH·D + 2·nKV·D] (q | k | v, the packed projection's output);
    q/k_weight the norms' weights ([nH·D]/[nKV·D] for norm "full", [D] for "head"; None for norm "none" or kind
    "none"); norm in NORMS, kind in KINDS (components/norm.py); cos/sin [B, 1, D] (the token's row of the tables, as
    the model hands them to apply_rope); k/v_cache [R, S, nKV, D]; rows [B] (None: row b); pos [B, 1].
    Writes the turned k and the raw v at cache[rows[b], pos[b]] and returns (q turned [B, nH, D] in qkv's dtype,
    lengths = min(pos + 1, kv_len) [B]): decode_attention's q and lengths. Triton on CUDA (and under
    TRITON_INTERPRET=1), the PyTorch reference elsewhere."""
    use_triton = triton is not None and (qkv.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    fn = decode_qk_rope_triton if use_triton else decode_qk_rope_reference
    return fn(qkv, q_weight, k_weight, eps, norm, kind, num_heads, cos, sin, k_cache, v_cache, rows, pos, kv_len)


@torch.library.custom_op("moetandem::decode_qk_rope", mutates_args=("k_cache", "v_cache"))
def decode_qk_rope_op(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                      norm: str, kind: str, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor,
                      kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_qk_rope as a custom op: torch.compile keeps it one opaque call that writes the caches in place."""
    return decode_qk_rope(qkv, q_weight, k_weight, eps, norm, kind, num_heads, cos, sin, k_cache, v_cache, rows, pos,
                          kv_len)


@decode_qk_rope_op.register_fake
def _(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, norm: str,
      kind: str, num_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      rows: torch.Tensor | None, pos: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[3]), pos.new_empty(pos.shape[0])


if triton is not None:
    @triton.jit
    def _normed_turned(x_ptr, w_ptr, cos_ptr, sin_ptr, nheads, D, eps, NORM: tl.constexpr, KIND: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """nheads heads of D at x_ptr, normalised (NORM 1: per head, 2: over all) and turned -> fp32
        [BLOCK_H, BLOCK_D]. Each element's rotate_half partner (i ± D/2) is loaded and normalised alongside it."""
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        half = D // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        m = (offs_h < nheads)[:, None] & (offs_d < D)[None, :]
        idx = offs_h[:, None] * D + offs_d[None, :]  # [BH, BD] into the nheads·D vector
        pidx = offs_h[:, None] * D + partner[None, :]
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + pidx, mask=m, other=0.0).to(tl.float32)
        dt = x_ptr.dtype.element_ty
        if NORM != 0:
            if NORM == 1:
                rstd = (1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / D + eps))[:, None]  # [BH, 1]
                widx, wpidx = offs_d[None, :], partner[None, :]
            else:
                rstd = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(x * x, 1), 0) / (nheads * D) + eps)
                widx, wpidx = idx, pidx
            x, xp = x * rstd, xp * rstd
            if KIND == 0:  # cast: round, times the weight, round
                w = tl.load(w_ptr + widx, mask=m, other=0.0).to(tl.float32)
                wp = tl.load(w_ptr + wpidx, mask=m, other=0.0).to(tl.float32)
                x, xp = x.to(dt).to(tl.float32) * w, xp.to(dt).to(tl.float32) * wp
            elif KIND == 1:  # offset: times (1 + w) in fp32
                x = x * (1.0 + tl.load(w_ptr + widx, mask=m, other=0.0).to(tl.float32))
                xp = xp * (1.0 + tl.load(w_ptr + wpidx, mask=m, other=0.0).to(tl.float32))
            elif KIND == 2:  # fp32: times w in fp32
                x = x * tl.load(w_ptr + widx, mask=m, other=0.0).to(tl.float32)
                xp = xp * tl.load(w_ptr + wpidx, mask=m, other=0.0).to(tl.float32)
            x, xp = x.to(dt).to(tl.float32), xp.to(dt).to(tl.float32)
        c = tl.load(cos_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]  # [1, BD]
        s = tl.load(sin_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        return x * c + tl.where(first[None, :], -xp, xp) * s

    @triton.jit
    def _qk_rope_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, rows_ptr, pos_ptr, q_ptr, len_ptr,
                        s_qkv, s_cos, s_sin, sk_r, sk_s, sk_h, sv_r, sv_s, sv_h, s_pos, s_rows, NH, NKV, D,
                        kv_len, eps, NORM: tl.constexpr, KIND: tl.constexpr, HAS_ROWS: tl.constexpr,
                        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)  # 0: q, 1: k, v and the length
        x_ptr = qkv_ptr + b * s_qkv
        cos_b = cos_ptr + b * s_cos
        sin_b = sin_ptr + b * s_sin
        offs_d = tl.arange(0, BLOCK_D)
        dmask = (offs_d < D)[None, :]
        if part == 0:
            offs_q = tl.arange(0, BLOCK_HQ)
            q = _normed_turned(x_ptr, wq_ptr, cos_b, sin_b, NH, D, eps, NORM, KIND, BLOCK_HQ, BLOCK_D)
            tl.store(q_ptr + b * NH * D + offs_q[:, None] * D + offs_d[None, :], q.to(q_ptr.dtype.element_ty),
                     mask=(offs_q < NH)[:, None] & dmask)
        else:
            p = tl.load(pos_ptr + b * s_pos).to(tl.int64)
            if HAS_ROWS:
                row = tl.load(rows_ptr + b * s_rows).to(tl.int64)
            else:
                row = b
            offs_h = tl.arange(0, BLOCK_HK)
            hmask = (offs_h < NKV)[:, None] & dmask
            k = _normed_turned(x_ptr + NH * D, wk_ptr, cos_b, sin_b, NKV, D, eps, NORM, KIND, BLOCK_HK, BLOCK_D)
            k = k.to(qkv_ptr.dtype.element_ty)  # the PyTorch path's k, then the cache's dtype
            tl.store(k_ptr + row * sk_r + p * sk_s + offs_h[:, None] * sk_h + offs_d[None, :],
                     k.to(k_ptr.dtype.element_ty), mask=hmask)
            v = tl.load(x_ptr + (NH + NKV) * D + offs_h[:, None] * D + offs_d[None, :], mask=hmask, other=0.0)
            tl.store(v_ptr + row * sv_r + p * sv_s + offs_h[:, None] * sv_h + offs_d[None, :],
                     v.to(v_ptr.dtype.element_ty), mask=hmask)
            tl.store(len_ptr + b, tl.minimum(p + 1, kv_len).to(len_ptr.dtype.element_ty))
