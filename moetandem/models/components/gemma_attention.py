"""Gemma-4 attention: per-head RMSNorm of q and k (weights scaled in fp32) and of v (no weight), RoPE after the
norms, softmax scale 1 (the norms carry it); full-attention layers may have their own head size and KV heads and
take values from the key projection (`attention_k_eq_v`: no v_proj). Decode steps on CUDA take the decode kernel
(components/attention.py: decode_step), as GQA does."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.kernels.decode_attention import decode_attention_supported
from moetandem.models.cache import write_read
from moetandem.models.components.attention import decode_step
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.rope import apply_rope


@dataclass(frozen=True)
class GemmaAttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_eq_v: bool = False
    bias: bool = False

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def build(self, hidden: int, eps: float) -> "GemmaAttention":
        return GemmaAttention(hidden, self, eps)


class GemmaAttention(nn.Module):
    def __init__(self, hidden: int, s: GemmaAttentionSpec, eps: float) -> None:
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(hidden, s.num_heads * s.head_dim, bias=s.bias)
        self.k_proj = nn.Linear(hidden, s.num_kv_heads * s.head_dim, bias=s.bias)
        self.v_proj = None if s.k_eq_v else nn.Linear(hidden, s.num_kv_heads * s.head_dim, bias=s.bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, hidden, bias=s.bias)
        self.q_norm, self.k_norm = RMSNorm(s.head_dim, eps, "fp32"), RMSNorm(s.head_dim, eps, "fp32")
        self.v_norm = RMSNorm(s.head_dim, eps, "none")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, mask: torch.Tensor, kv_len: int,
                window: int | None = None) -> torch.Tensor:
        # x [B, L, H]; cos/sin [B, L, D] (this layer type's table); mask [B, 1, L, kv_len]; window: the mask's
        # sliding window (None: full), for the decode kernel
        s, (B, L, _) = self.s, x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, s.num_heads, s.head_dim))  # [B, L, nH, D]
        k = self.k_proj(x).view(B, L, s.num_kv_heads, s.head_dim)  # [B, L, nKV, D]
        v = k if self.v_proj is None else self.v_proj(x).view(B, L, s.num_kv_heads, s.head_dim)
        k, v = self.k_norm(k), self.v_norm(v)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, nH, L, D]
        k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, L, nKV, D]
        if L == 1 and decode_attention_supported(x.device, cache[0].dtype, s.head_dim):
            return self.o_proj(decode_step(q, k, v, cache, rows, pos, kv_len, 1.0, window))  # [B, 1, H]
        keys, values = write_read(cache, (k, v), rows, pos, kv_len)  # [B, S, nKV, D] each
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                                             scale=1.0, enable_gqa=s.num_kv_heads != s.num_heads)  # [B, nH, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, H]
