"""Decode attention over the static KV cache: one new query token per sequence, read straight from the cache
buffers (flash-decoding, in Triton; own code after the idea of FlashDecoding / vLLM's and SGLang's decode kernels).

    q [B, nH, D] ─► partial kernel, grid (B, nKV, splits): the G = nH/nKV query heads of one KV head in one
                    program (K/V read once), over 1/splits of the sequence's live positions; online softmax in fp32
                 ─► (m, l, acc) per split ─► reduce kernel, grid (B, nH): merge the splits (+ the sink) ─► [B, nH, D]

Sequence b reads cache row rows[b] (None: row b) at positions [start, lengths[b]), start = max(0, lengths[b] - W)
with a sliding window W, else 0: lengths is a device tensor, the grid depends only on shapes, so a step is
CUDA-graph safe and never waits on the host. Each split takes an equal share of the sequence's own live range, so a
short sequence in a long cache leaves most splits empty (they exit at once) instead of reading masked positions.
Attention sinks (gpt-oss): a per-head logit that joins the softmax and carries no value. With one split the
partial kernel writes the output itself. Head dims up to 512 (any size; powers of two waste nothing)."""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 512
_LOG2E = 1.4426950408889634


def decode_attention_supported(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """True where the Triton path runs: CUDA, Triton importable, a bf16 (sm80+), fp16 or fp32 cache, head_dim <= 512."""
    device = torch.device(device)
    if (triton is None or device.type != "cuda" or not torch.cuda.is_available() or dtype not in _DTYPES
            or head_dim > MAX_HEAD_DIM):
        return False
    return dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] >= 8


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None,
           lengths: torch.Tensor, sinks: torch.Tensor | None) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q [B, nH, D] and k/v caches [R, S, nKV, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    (B, nH, D), nKV = q.shape, k_cache.shape[2]
    if k_cache.shape[3] != D or nH % nKV:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {nKV} KV heads of size {k_cache.shape[3]}")
    if lengths.shape != (B,) or (rows is not None and rows.shape != (B,)):
        raise ValueError(f"lengths and rows must be [B={B}]")
    if sinks is not None and sinks.shape != (nH,):
        raise ValueError(f"sinks must be [nH={nH}], got {tuple(sinks.shape)}")


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               rows: torch.Tensor | None, lengths: torch.Tensor, scale: float | None = None,
                               window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The definition in PyTorch (fp32, any device): q [B, nH, D]; k/v_cache [R, S, nKV, D]; rows [B] (None: row b);
    lengths [B] >= 1 -> [B, nH, D] in q's dtype. Reads the batch's rows [B, S, ...] (a gather): a test oracle."""
    _check(q, k_cache, v_cache, rows, lengths, sinks)
    B, nH, D = q.shape
    S, nKV = k_cache.shape[1], k_cache.shape[2]
    r = torch.arange(B, device=q.device) if rows is None else rows.long()
    keys = k_cache[r].float().repeat_interleave(nH // nKV, dim=2)  # [B, S, nH, D]
    values = v_cache[r].float().repeat_interleave(nH // nKV, dim=2)  # [B, S, nH, D]
    s = torch.einsum("bhd,bshd->bhs", q.float(), keys) * (D ** -0.5 if scale is None else scale)  # [B, nH, S]
    kpos = torch.arange(S, device=q.device)
    end = lengths.long()[:, None]  # [B, 1]
    live = kpos[None] < end  # [B, S]
    if window:
        live &= kpos[None] >= end - window
    s = s.masked_fill(~live[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float()[None, :, None].expand(B, nH, 1)], dim=-1)  # [B, nH, S+1]
    p = torch.softmax(s, dim=-1)[..., :S]  # [B, nH, S] (a sink's share dropped)
    return torch.einsum("bhs,bshd->bhd", p, values).to(q.dtype)  # [B, nH, D]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_choices(B: int, nH: int, nKV: int, D: int, max_len: int, device: torch.device,
                   use_dot: bool | None = None, block_n: int | None = None,
                   splits: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_G, BLOCK_D, BLOCK_N, splits) for a launch; a given choice is kept. BLOCK_G: the query heads of a KV
    head padded to a tensor-core tile, or 1 (FMAs) for one head per KV head. BLOCK_N: K and V tiles of 16 KiB in
    bf16 (half on the FMA path, which holds both in registers). Splits: about two programs per SM, each split at
    least 4 blocks of a full cache."""
    G = nH // nKV
    block_g = max(16, triton.next_power_of_2(G)) if (use_dot if use_dot is not None else G > 1) else 1
    if block_g < G:
        raise ValueError("use_dot=False needs one query head per KV head")
    block_d = max(16, triton.next_power_of_2(D))
    block_n = block_n or max(16, (64 if block_d <= 128 else 32 if block_d <= 256 else 16) // (2 if block_g == 1 else 1))
    if splits is None:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 16
        splits = max(1, min(-(-2 * sms // (B * nKV)), -(-max_len // (4 * block_n)), 64))
    return block_g, block_d, block_n, splits


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            rows: torch.Tensor | None, lengths: torch.Tensor, scale: float | None = None,
                            window: int | None = None, sinks: torch.Tensor | None = None, splits: int | None = None,
                            block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                            max_len: int | None = None, use_dot: bool | None = None) -> torch.Tensor:
    """The Triton path (CUDA, or the CPU under TRITON_INTERPRET=1); arguments as decode_attention_reference.
    splits / block_n / num_warps / num_stages: launch choices (None: chosen from the shapes); max_len: an upper
    bound on lengths that sizes the splits (default: the cache length S, or the window); use_dot: tensor-core
    dots over the query heads padded to 16 (default: unless there is one query head per KV head)."""
    assert triton is not None, "decode_attention_triton needs triton"
    _check(q, k_cache, v_cache, rows, lengths, sinks)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a unit stride over the head dim")
    B, nH, D = q.shape
    S, nKV = k_cache.shape[1], k_cache.shape[2]
    G = nH // nKV
    block_g, block_d, block_n, splits = launch_choices(B, nH, nKV, D, min(max_len or S, window or S), q.device,
                                                       use_dot, block_n, splits)
    out = torch.empty(B, nH, D, dtype=q.dtype, device=q.device)  # [B, nH, D]
    ml = torch.empty(B, nH, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out  # (m, l)
    acc = torch.empty(B, nH, splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    scale = D ** -0.5 if scale is None else scale
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _partial_kernel[(B, nKV, splits)](
        q, k_cache, v_cache, rows if rows is not None else lengths, lengths, sinks if sinks is not None else q, out,
        ml, acc, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), G, D, nH, S,
        int(window or 0), float(scale) * _LOG2E, HAS_ROWS=rows is not None, HAS_SINK=sinks is not None,
        HAS_WINDOW=bool(window), SPLITS=splits, PRECISION=precision, BLOCK_G=block_g,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        block_s = max(2, triton.next_power_of_2(splits))
        _reduce_kernel[(B, nH)](
            ml, acc, sinks if sinks is not None else q, out, out.stride(0), out.stride(1), nH, D,
            HAS_SINK=sinks is not None, SPLITS=splits, BLOCK_S=block_s, BLOCK_D=block_d,
            num_warps=8 if block_s * block_d > 8192 else 4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None,
                     lengths: torch.Tensor, scale: float | None = None, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·K^T · scale [+ sink]) · V for one query token per sequence over its cache row's positions
    [max(0, lengths[b] - window), lengths[b]): q [B, nH, D] (any strides, unit over D); k/v_cache [R, S, nKV, D]
    (nH a multiple of nKV: grouped-query); rows [B] cache row of each sequence (None: row b); lengths [B] >= 1 on
    q's device; scale default D^-0.5; window None/0 = all; sinks [nH] -> [B, nH, D] in q's dtype.
    Triton on CUDA (and under TRITON_INTERPRET=1), the PyTorch reference elsewhere."""
    use_triton = triton is not None and (decode_attention_supported(q.device, k_cache.dtype, q.shape[-1])
                                         or os.environ.get("TRITON_INTERPRET") == "1")
    fn = decode_attention_triton if use_triton else decode_attention_reference
    return fn(q, k_cache, v_cache, rows, lengths, scale, window, sinks)


@torch.library.custom_op("moetandem::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None,
                        lengths: torch.Tensor, scale: float, window: int = 0,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """decode_attention as a custom op: torch.compile keeps it one opaque call; CUDA graphs capture it."""
    return decode_attention(q, k_cache, v_cache, rows, lengths, scale, window, sinks)


@decode_attention_op.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor | None,
      lengths: torch.Tensor, scale: float, window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    return q.new_empty(q.shape)


if triton is not None:
    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, len_ptr, sink_ptr, o_ptr, ml_ptr, acc_ptr, sq_b, sq_h, sk_r,
                        sk_s, sk_h, sv_r, sv_s, sv_h, so_b, so_h, G, D, NH, S, window, scale_log2,
                        HAS_ROWS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        SPLITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b.to(tl.int64)
        length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S)  # never past the cache
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(length - window, 0)
        chunk = tl.cdiv(tl.cdiv(length - start, SPLITS), BLOCK_N) * BLOCK_N  # this sequence's share, whole blocks
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, length)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < G
        dmask = offs_d < D
        heads = kvh * G + offs_g  # [BG] query heads of this KV head
        q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(k_ptr.dtype.element_ty)  # [BG, BD]
        k_base = k_ptr + row * sk_r + kvh * sk_h
        v_base = v_ptr + row * sv_r + kvh * sv_h
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
            v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)  # both in flight
            if BLOCK_G == 1:  # one query head per KV head (MHA): FMAs, no padded MMA
                s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1)[None, :] * scale_log2  # [1, BN] log2 units
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BG, BN] log2 units
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # [BG, BN]
            l_i = l_i * alpha + tl.sum(p, 1)
            if BLOCK_G == 1:
                acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if SPLITS == 1:
            sink = tl.full([BLOCK_G], float("-inf"), tl.float32)  # no sink: a logit of -inf adds nothing
            if HAS_SINK:
                sink = tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            out = acc * alpha[:, None] / (l_i * alpha + tl.exp2(sink - m_f))[:, None]
            tl.store(o_ptr + b.to(tl.int64) * so_b + heads[:, None] * so_h + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
        else:
            idx = (b.to(tl.int64) * NH + heads) * SPLITS + split  # [BG] into [B, nH, SPLITS]
            tl.store(ml_ptr + idx * 2, m_i, mask=gmask)
            tl.store(ml_ptr + idx * 2 + 1, l_i, mask=gmask)
            tl.store(acc_ptr + idx[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _reduce_kernel(ml_ptr, acc_ptr, sink_ptr, o_ptr, so_b, so_h, NH, D, HAS_SINK: tl.constexpr,
                       SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        smask = offs_s < SPLITS
        dmask = offs_d < D
        idx = (b.to(tl.int64) * NH + h) * SPLITS + offs_s  # [BS]
        m = tl.load(ml_ptr + idx * 2, mask=smask, other=float("-inf"))  # [BS] empty splits: -inf
        l = tl.load(ml_ptr + idx * 2 + 1, mask=smask, other=0.0)
        sink = float("-inf")  # no sink: a logit of -inf adds nothing
        if HAS_SINK:
            sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(tl.max(m, 0), sink)
        w = tl.exp2(m - m_max)  # [BS]
        total = tl.sum(l * w, 0) + tl.exp2(sink - m_max)
        acc = tl.load(acc_ptr + idx[:, None] * D + offs_d[None, :], mask=smask[:, None] & dmask[None, :],
                      other=0.0)  # [BS, BD]
        out = tl.sum(acc * w[:, None], 0) / total  # [BD]
        tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + offs_d, out.to(o_ptr.dtype.element_ty), mask=dmask)
