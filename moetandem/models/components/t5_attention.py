"""T5-style attention (Switch Transformers): no score scaling, no RoPE; positions enter as a learned relative bias
[1, nH, L, S] that the first layer of a stack computes from bucketed distances and every layer adds to its scores.
Self-attention writes K/V into the static cache (decoder) or attends within the call (encoder); cross-attention
reads K/V computed once from the encoder's output."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.models.cache import write_read


def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Relative positions key − query (any shape, long) -> bucket ids: exact for small distances, log-spaced up to
    max_distance, one bucket beyond; bidirectional splits the buckets between earlier and later keys."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -rel.clamp(max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < exact, rel, large)


class RelativeBias(nn.Module):
    """The stack's learned bias table [buckets, nH] (hub name: the first layer's relative_attention_bias)."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """qpos [B, L], kpos [S] -> bias [B, nH, L, S] (fp32 table rows in the table's dtype)."""
        rel = kpos[None, None, :] - qpos[:, :, None]  # [B, L, S]
        b = relative_buckets(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(0, 3, 1, 2)  # [B, nH, L, S]


class T5Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(hidden, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, hidden, bias=False)

    def heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """x [B, L, H] -> [B, L, nH, D]."""
        return proj(x).view(*x.shape[:2], self.n_heads, self.head_dim)

    def cross_kv(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, S, H] -> K, V [B, nH, S, D], computed once per request."""
        return self.heads(enc, self.k).transpose(1, 2), self.heads(enc, self.v).transpose(1, 2)

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] queries over keys/values [B, nH, S, D]; bias [B, 1|nH, L, S] additive (−inf: masked)."""
        B, L, _ = x.shape
        q = self.heads(x, self.q).transpose(1, 2)  # [B, nH, L, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, nH, L, D]
        return self.o(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, H]

    def self_attend(self, x: torch.Tensor, bias: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None,
                    pos: torch.Tensor | None = None, kv_len: int = 0) -> torch.Tensor:
        """Without a cache: attend within x (encoder). With one: write K/V at pos [B, L], attend to < kv_len."""
        k, v = self.heads(x, self.k), self.heads(x, self.v)  # [B, L, nH, D]
        if cache is not None:
            assert pos is not None
            k, v = write_read(cache, (k, v), None, pos, kv_len)  # [B, S, nH, D]
        return self.attend(x, k.transpose(1, 2), v.transpose(1, 2), bias)
