"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values come from a per-token latent c_kv of
rank r (kv_lora_rank) plus one rotary key shared by all heads, and only those are cached ([r] + [d_rope] per
token instead of 2·nH·D). Decode steps attend in the latent space (the key up-projection is absorbed into the
query, the value up-projection applied after attention); prefill expands keys and values, which is cheaper when
many queries share them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.models.cache import write_read
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.rope import apply_rope, apply_rope_interleaved


@dataclass(frozen=True)
class MLASpec:
    num_heads: int
    q_lora_rank: int | None  # None: one q_proj (DeepSeek-V2-Lite); else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    interleaved_rope: bool = True
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
    lora_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers uses the default, not rms_norm_eps)

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def num_kv_heads(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        """Cache-equivalent head size: 2 · num_kv_heads · head_dim ≈ the r + d_rope values cached per token."""
        return (self.kv_lora_rank + self.qk_rope_head_dim + 1) // 2

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.kv_lora_rank,), (self.qk_rope_head_dim,)

    def build(self, hidden: int, eps: float) -> "MLAttention":
        return MLAttention(hidden, self)


class MLAttention(nn.Module):
    def __init__(self, hidden: int, s: MLASpec) -> None:
        super().__init__()
        self.s = s
        nH, dq = s.num_heads, s.qk_nope_head_dim + s.qk_rope_head_dim
        if s.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, nH * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, s.q_lora_rank, bias=s.bias)
            self.q_a_layernorm = RMSNorm(s.q_lora_rank, s.lora_eps)
            self.q_b_proj = nn.Linear(s.q_lora_rank, nH * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, s.kv_lora_rank + s.qk_rope_head_dim, bias=s.bias)
        self.kv_a_layernorm = RMSNorm(s.kv_lora_rank, s.lora_eps)
        self.kv_b_proj = nn.Linear(s.kv_lora_rank, nH * (s.qk_nope_head_dim + s.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nH * s.v_head_dim, hidden, bias=s.bias)
        self.rope = apply_rope_interleaved if s.interleaved_rope else apply_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, mask: torch.Tensor, kv_len: int,
                window: int | None = None) -> torch.Tensor:
        # x [B, L, H]; cache (c_kv [R, S, r], k_rope [R, S, dR]); pos [B, L]; mask [B, 1, L, kv_len] (with any
        # sliding window already in it: `window` is taken for the GQA signature and unused)
        s, (B, L, _) = self.s, x.shape
        nope, dR, r = s.qk_nope_head_dim, s.qk_rope_head_dim, s.kv_lora_rank
        q = self.q_proj(x) if s.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, L, nH*(nope+dR)]
        q = q.view(B, L, s.num_heads, nope + dR).transpose(1, 2)  # [B, nH, L, nope+dR]
        q_nope, q_rope = q.split([nope, dR], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, dR], dim=-1)  # [B, L, r], [B, L, dR]
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope = self.rope(q_rope, cos, sin)  # [B, nH, L, dR]
        k_rope = self.rope(k_rope[:, None], cos, sin)[:, 0]  # [B, L, dR]
        c_all, kr_all = write_read(cache, (c_kv, k_rope), rows, pos, kv_len)  # [B, S, r], [B, S, dR]
        w = self.kv_b_proj.weight.view(s.num_heads, nope + s.v_head_dim, r)  # [nH, nope+dv, r]
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [nH, nope, r], [nH, dv, r]
        if L == 1:  # decode: attend over the latents, nothing expanded per cached token
            q_lat = torch.einsum("bhld,hdr->bhlr", q_nope, w_uk)  # [B, nH, 1, r]
            qq = torch.cat([q_lat, q_rope], dim=-1)  # [B, nH, 1, r+dR]
            kk = torch.cat([c_all, kr_all], dim=-1)[:, None]  # [B, 1, S, r+dR]
            o = F.scaled_dot_product_attention(qq, kk, c_all[:, None], attn_mask=mask, scale=s.softmax_scale,
                                               enable_gqa=True)  # [B, nH, 1, r]
            out = torch.einsum("bhlr,hvr->bhlv", o, w_uv)  # [B, nH, 1, dv]
        else:  # prefill: expand keys and values once
            kv = F.linear(c_all, self.kv_b_proj.weight).view(B, -1, s.num_heads, nope + s.v_head_dim)  # [B, S, nH, nope+dv]
            k_nope, v = kv.transpose(1, 2).split([nope, s.v_head_dim], dim=-1)  # [B, nH, S, nope], [B, nH, S, dv]
            k = torch.cat([k_nope, kr_all[:, None].expand(-1, s.num_heads, -1, -1)], dim=-1)  # [B, nH, S, nope+dR]
            qq = torch.cat([q_nope, q_rope], dim=-1)  # [B, nH, L, nope+dR]
            out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=s.softmax_scale)  # [B, nH, L, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, H]
