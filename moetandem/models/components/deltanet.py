"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): a short causal depthwise convolution over [q | k | v],
then the gated delta rule (components/delta_rule.py) with a per-head decay g and write strength β, and a gated
RMSNorm of the output. What it keeps per sequence, instead of K/V per token: the last kernel-1 conv inputs and the
recurrent state [nV, dk, dv] (models/cache.py: row-addressed, two copies by position parity)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.models.cache import read_state, write_state
from moetandem.models.components.delta_rule import gated_delta_rule
from moetandem.models.components.norm import GatedRMSNorm


@dataclass(frozen=True)
class GatedDeltaNetSpec:
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    #: Qwen3-Next: one in_proj_qkvz + in_proj_ba, grouped per key head; Qwen3.5: in_proj_qkv / _z / _b / _a
    fused_proj: bool = True

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per sequence: conv state [C, K-1], recurrent state [nV, dk, dv]."""
        return (self.conv_dim, self.conv_kernel - 1), (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def build(self, hidden: int, eps: float) -> "GatedDeltaNet":
        return GatedDeltaNet(hidden, self, eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden: int, s: GatedDeltaNetSpec, eps: float) -> None:
        super().__init__()
        self.s = s
        nV, kd, vd = s.num_v_heads, s.num_k_heads * s.head_k_dim, s.num_v_heads * s.head_v_dim
        if s.fused_proj:
            self.in_proj_qkvz = nn.Linear(hidden, 2 * kd + 2 * vd, bias=False)
            self.in_proj_ba = nn.Linear(hidden, 2 * nV, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden, 2 * kd + vd, bias=False)
            self.in_proj_z = nn.Linear(hidden, vd, bias=False)
            self.in_proj_b = nn.Linear(hidden, nV, bias=False)
            self.in_proj_a = nn.Linear(hidden, nV, bias=False)
        self.conv1d = nn.Conv1d(s.conv_dim, s.conv_dim, s.conv_kernel, groups=s.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(nV))
        self.A_log = nn.Parameter(torch.zeros(nV))
        self.norm = GatedRMSNorm(s.head_v_dim, eps)
        self.out_proj = nn.Linear(vd, hidden, bias=False)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, L, H] -> mixed q|k|v [B, L, C], z [B, L, nV, dv], b and a [B, L, nV]."""
        s, (B, L, _) = self.s, x.shape
        if not s.fused_proj:
            z = self.in_proj_z(x).view(B, L, s.num_v_heads, s.head_v_dim)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        r = s.num_v_heads // s.num_k_heads  # value heads per key head; the fused layout groups by key head
        qkvz = self.in_proj_qkvz(x).view(B, L, s.num_k_heads, 2 * s.head_k_dim + 2 * r * s.head_v_dim)
        q, k, v, z = qkvz.split([s.head_k_dim, s.head_k_dim, r * s.head_v_dim, r * s.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(B, L, s.num_k_heads, 2 * r).split([r, r], dim=-1)  # [B, L, nK, r] each
        mixed = torch.cat([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], dim=-1)  # [B, L, C]
        return (mixed, z.reshape(B, L, s.num_v_heads, s.head_v_dim), b.reshape(B, L, -1), a.reshape(B, L, -1))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...], rows: torch.Tensor | None,
                pos: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        # x [B, L, H]; cache (conv [R, 2, C, K-1], recurrent [R, 2, nV, dk, dv]); rows [B] (None: row b);
        # pos [B, L] (consecutive per sequence); valid [B, L]: real tokens, right-padded (None: all real)
        s, (B, L, _) = self.s, x.shape
        r = torch.arange(B, device=x.device) if rows is None else rows  # [B]
        start = pos[:, 0]  # [B]
        n = torch.full_like(start, L) if valid is None else valid.sum(dim=1)  # [B] real tokens
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        mixed, z, b, a = self._project(x)
        # causal depthwise conv over [previous K-1 inputs | this forward's inputs]
        conv_buf, rec_buf = cache
        prev = read_state(conv_buf, r, start).to(mixed.dtype)  # [B, C, K-1]
        xcat = torch.cat([prev, mixed.transpose(1, 2)], dim=-1)  # [B, C, K-1+L]
        h = F.silu(F.conv1d(xcat, self.conv1d.weight, groups=s.conv_dim))  # [B, C, L]
        idx = n[:, None] + torch.arange(s.conv_kernel - 1, device=x.device)  # [B, K-1]: last K-1 real inputs
        write_state(conv_buf, xcat.gather(2, idx[:, None].expand(-1, s.conv_dim, -1)), r, start + n)
        kd = s.num_k_heads * s.head_k_dim
        q, k, v = h.transpose(1, 2).split([kd, kd, s.num_v_heads * s.head_v_dim], dim=-1)
        q = q.reshape(B, L, s.num_k_heads, s.head_k_dim)  # [B, L, nK, dk]
        k = k.reshape(B, L, s.num_k_heads, s.head_k_dim)
        v = v.reshape(B, L, s.num_v_heads, s.head_v_dim)  # [B, L, nV, dv]
        beta = b.sigmoid()  # [B, L, nV]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [B, L, nV], log decay ≤ 0
        if valid is not None:  # padding: no decay, no write, so the state after the last real token is kept
            beta, g = beta * valid[..., None], g * valid[..., None]
        out, state = gated_delta_rule(q, k, v, g, beta, read_state(rec_buf, r, start))  # [B, L, nV, dv]
        write_state(rec_buf, state, r, start + n)
        out = self.norm(out, z)  # [B, L, nV, dv]
        return self.out_proj(out.reshape(B, L, -1))  # [B, L, H]
