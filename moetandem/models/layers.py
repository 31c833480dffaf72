"""Layers shared by every family: RMSNorm, RoPE, GQA attention over a static KV cache, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); weights in nn.Linear layout [out, in]."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU with gate and up stacked: w13 [2I, H] (gate; up), w2 [H, I]. Two matmuls, not three."""
    g, u = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers, Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, max_pos): [P, D], fp32, same arithmetic as transformers."""
    freqs = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, L, D]; cos/sin [B, L, D]. Partial rotary: only the first cos.shape[-1] dims turn."""
    cos, sin = cos[:, None], sin[:, None]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


class Attention(nn.Module):
    """GQA self-attention. qk_norm: None, "head" (per head, Qwen3) or "full" (over all heads, OLMoE)."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, eps: float, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: str | None = None, clip_qkv: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(n_heads * head_dim, eps), RMSNorm(n_kv * head_dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                rows: torch.Tensor | None, pos: torch.Tensor, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        # x [B, L, H]; cache k/v [R, S, n_kv, D]; rows [B] = cache row of each sequence (None: row b);
        # pos [B, L]; mask [B, 1, L, kv_len]
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, L, self.n_heads, self.head_dim)
        k = k.view(B, L, self.n_kv, self.head_dim)
        v = v.view(B, L, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, h, L, D]
        k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, L, n_kv, D]
        k_cache, v_cache = cache
        r = torch.arange(B, device=pos.device) if rows is None else rows  # [B]
        k_cache[r[:, None], pos] = k.to(k_cache.dtype)
        v_cache[r[:, None], pos] = v.to(v_cache.dtype)
        if rows is None:  # sequences own cache rows 0..B-1: a view, no copy
            keys, values = k_cache[:B, :kv_len], v_cache[:B, :kv_len]
        else:  # gather this batch's rows
            keys, values = k_cache[rows, :kv_len], v_cache[rows, :kv_len]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, n_kv, S, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))
