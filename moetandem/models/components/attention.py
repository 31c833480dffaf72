"""Grouped-query attention over the static cache, with the variants families add: q/k RMSNorm (per head or over
all heads), QKV clipping, biases, partial rotary, sliding windows (the model passes the layer's mask) and
attention sinks (gpt-oss: a learned per-head logit that joins the softmax and takes no value) and an output gate
(Qwen3-Next / Qwen3.5: q_proj also yields a per-head gate g, and the output is attn · sigmoid(g)).

Decode steps (one token per sequence) on CUDA write the new K/V into the cache and run the flash-decoding kernel
(moetandem.kernels.decode_attention) over each sequence's cache row up to its position: no gather of the cache, no
mask; everything else (prefill, the CPU) goes through the mask and SDPA. With QK_ROPE_FUSED, such a step also
runs its q/k norm, RoPE, K/V write and lengths as one kernel (moetandem.kernels.qk_rope)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.kernels.decode_attention import decode_attention_op, decode_attention_supported
from moetandem.kernels.qk_rope import decode_qk_rope_op
from moetandem.models.cache import write, write_read
from moetandem.models.components.linear import DecodeLinear
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.rope import apply_rope

#: MOETANDEM_QK_ROPE=fused (the default since the H200 A/B of 2026-12-01; =ops: the PyTorch ops): a decode step that
#: takes the decode-attention kernel (one token per sequence, CUDA) runs the prologue between the qkv projection and
#: that kernel (q/k RMSNorm, RoPE, the K/V cache write, the lengths: ~9 small inductor kernels per layer) as one Triton
#: launch, `moetandem::decode_qk_rope`, where the layer allows it (Attention.fusable_prologue). Read once at import;
#: dynamo guards on this global, so a test or bench/decode.py may set it between engines.
QK_ROPE_FUSED: bool = os.environ.get("MOETANDEM_QK_ROPE", "fused").strip().lower() == "fused"


@dataclass(frozen=True)
class GQASpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (per head: Qwen3, GLM-4.5) or "full" (all heads: OLMoE)
    clip_qkv: float | None = None
    sinks: bool = False
    output_gate: bool = False  # q_proj gives [q | gate] per head; out = attn * sigmoid(gate)
    norm_kind: str = "cast"  # how the q/k norms scale (components/norm.py); "offset": zero-centred (1 + w)

    @property
    def rope_dim(self) -> int:
        """Head dims the rotary tables are built for (a family's partial_rotary_factor shortens them)."""
        return self.head_dim

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def build(self, hidden: int, eps: float) -> "Attention":
        return Attention(hidden, self, eps)


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, kv_len: int, scale: float, window: int | None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence, on the decode kernel: q [B, nH, 1, D]; k/v [B, 1, nKV, D] are written into the cache
    at pos [B, 1], then q attends to the positions the causal (and window) mask would allow,
    [max(0, pos - window + 1), min(pos, kv_len - 1)] of the sequence's cache row -> [B, 1, nH*D]."""
    write(cache, (k, v), rows, pos)
    lengths = (pos[:, 0] + 1).clamp(max=kv_len)  # [B]
    out = decode_attention_op(q[:, :, 0], cache[0], cache[1], rows, lengths, scale, window or 0, sinks)  # [B, nH, D]
    return out.reshape(q.shape[0], 1, -1)


class Attention(nn.Module):
    def __init__(self, hidden: int, s: GQASpec, eps: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.gated = s.output_gate
        nq, nk = s.num_heads * s.head_dim * (2 if s.output_gate else 1), s.num_kv_heads * s.head_dim
        self.qkv_sizes = [nq, nk, nk]
        # one projection for q, k and v (one GEMV reading 3 matrices at a time instead of three launches);
        # the checkpoint's q/k/v_proj fill its rows (the loader reads `packed`)
        self.qkv_proj = DecodeLinear(hidden, nq + 2 * nk, bias=s.qkv_bias)  # tuned GEMV at decode
        rows = {"q_proj": (0, nq), "k_proj": (nq, nq + nk), "v_proj": (nq + nk, nq + 2 * nk)}
        kinds = ("weight", "bias") if s.qkv_bias else ("weight",)
        self.packed = {f"{n}.{w}": (f"qkv_proj.{w}", a, b) for n, (a, b) in rows.items() for w in kinds}
        self.o_proj = DecodeLinear(s.num_heads * s.head_dim, hidden, bias=s.o_bias)
        self.qk_norm, self.clip_qkv = s.qk_norm, s.clip_qkv
        if s.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(s.head_dim, eps, s.norm_kind), RMSNorm(s.head_dim, eps, s.norm_kind)
        elif s.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(s.num_heads * s.head_dim, eps), RMSNorm(s.num_kv_heads * s.head_dim, eps)
        self.sinks = nn.Parameter(torch.zeros(s.num_heads)) if s.sinks else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, mask: torch.Tensor, kv_len: int,
                window: int | None = None) -> torch.Tensor:
        # x [B, L, H]; cache k/v [R, S, n_kv, D]; rows [B] = cache row of each sequence (None: row b);
        # pos [B, L]; mask [B, 1, L, kv_len] (True = may attend); window: the sliding window the mask applies
        # (None: full attention), which the decode kernel applies itself
        B, L, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, L, nH*D + 2 nKV*D]
        if (L == 1 and QK_ROPE_FUSED and self.fusable_prologue(cos)
                and decode_attention_supported(x.device, cache[0].dtype, self.head_dim)):
            return self.o_proj(self._fused_decode(qkv, cos, sin, cache, rows, pos, kv_len, window))
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)  # [B, L, nH*D], [B, L, nKV*D] x2
        gate = None
        if self.gated:  # per head [q | gate]
            q, gate = q.view(B, L, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [B, L, nH, D] each
            q, gate = q.reshape(B, L, -1), gate.reshape(B, L, -1)  # [B, L, nH*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, L, self.n_heads, self.head_dim)
        k = k.view(B, L, self.n_kv, self.head_dim)
        v = v.view(B, L, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, nH, L, D]
        k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, L, nKV, D]
        if L == 1 and decode_attention_supported(x.device, cache[0].dtype, self.head_dim):
            out = decode_step(q, k, v, cache, rows, pos, kv_len, self.head_dim ** -0.5, window, self.sinks)  # [B, 1, nH*D]
        else:
            out = self._attend(q, k, v, cache, rows, pos, mask, kv_len)  # [B, L, nH*D]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)  # [B, L, H]

    def fusable_prologue(self, cos: torch.Tensor) -> bool:
        """Whether decode_qk_rope computes this layer's prologue: no output gate, no QKV clipping, RoPE over the
        whole head (cos [B, L, D])."""
        return not self.gated and self.clip_qkv is None and cos.shape[-1] == self.head_dim

    def _fused_decode(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                      rows: torch.Tensor | None, pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
        """decode_step with its prologue in one kernel: qkv [B, 1, nH*D + 2 nKV*D] -> [B, 1, nH*D]."""
        qn, kn = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        eps, kind = (0.0, "none") if qn is None else (qn.eps, qn.kind)
        q, lengths = decode_qk_rope_op(qkv, getattr(qn, "weight", None), getattr(kn, "weight", None), eps,
                                       self.qk_norm or "none", kind, self.n_heads, cos, sin, cache[0], cache[1], rows,
                                       pos, kv_len)  # [B, nH, D]
        out = decode_attention_op(q, cache[0], cache[1], rows, lengths, self.head_dim ** -0.5, window or 0, self.sinks)
        return out.reshape(qkv.shape[0], 1, -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Through the mask: q [B, nH, L, D]; k/v [B, L, nKV, D] -> [B, L, nH*D]."""
        B, L = q.shape[0], q.shape[2]
        keys, values = write_read(cache, (k, v), rows, pos, kv_len)  # [B, S, nKV, D] each
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, nKV, S, D]
        if self.sinks is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            out = self._with_sinks(q, keys, values, mask)
        return out.transpose(1, 2).reshape(B, L, -1)  # [B, L, nH*D]

    def _with_sinks(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """Softmax over [scores | sink] with the sink's probability dropped: one extra key of zeros (its logit
        q·0 = 0) whose additive mask is the sink logit, and a zero value."""
        assert self.sinks is not None
        B, nH, L, _ = q.shape
        pad = keys.new_zeros(*keys.shape[:2], 1, keys.shape[-1])  # [B, nKV, 1, D]
        keys, values = torch.cat([keys, pad], dim=2), torch.cat([values, pad], dim=2)  # [B, nKV, S+1, D]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))  # [B, 1, L, S]
        sink = self.sinks.to(q.dtype)[None, :, None, None].expand(B, nH, L, 1)  # [B, nH, L, 1]
        bias = torch.cat([bias.expand(B, nH, L, -1), sink], dim=-1)  # [B, nH, L, S+1]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=self.n_kv != self.n_heads)
