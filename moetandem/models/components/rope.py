"""Rotary position embeddings: the cos/sin tables of a model, and the two ways families turn a head with them."""
from __future__ import annotations

import os

import torch

#: MOETANDEM_ROPE=flip (the default since the H200 A/B of 2026-12-01; =cat: the concatenation): in a step traced by
#: torch.compile, rotate_half as a flip of the two halves times (-1, +1) instead of cat(-x2, x1). Same values bit for
#: bit (negation is exact either way). Inductor materialises that cat (its inputs have other users: x * cos) into a
#: buffer written by one kernel per half, and the q/k norm reductions stay kernels of their own: 5-6 launches per layer
#: of a decode step more than with the flip, an index remap fused into the RoPE kernels (bench/kernel_census.py). Eager
#: steps keep the cat (one launch). Read once at import; dynamo guards on this global, so a test or bench/decode.py may
#: set it between engines.
ROPE_FLIP: bool = os.environ.get("MOETANDEM_ROPE", "flip").strip().lower() == "flip"


def rope_at(pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin at positions pos [...] (integers, on inv_freq's device): [..., D] fp32, the arithmetic of
    transformers' rotary embedding. Computed per step rather than gathered from a table over every position: for
    262,144 positions the tables of Gemma-4's three rotary kinds held 2 GiB of GPU memory."""
    freqs = pos.float()[..., None] * inv_freq.float()  # [..., D/2]
    # [f, f] as an expand, not a cat: inductor fuses the index remap into cos / sin (a cat is a kernel of its own
    # in the compiled decode step: tests/test_decode_switches.py counts them)
    emb = freqs.unsqueeze(-2).expand(*freqs.shape[:-1], 2, freqs.shape[-1]).flatten(-2)  # [..., D]
    return emb.cos() * scaling, emb.sin() * scaling


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, max_pos): [P, D], fp32 (rope_at over every position: for tests and tools)."""
    return rope_at(torch.arange(max_pos, device=inv_freq.device), inv_freq, scaling)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) for x = cat(x1, x2) along the last dim (under torch.compile with ROPE_FLIP: _flip_half)."""
    if ROPE_FLIP and torch.compiler.is_compiling():
        return _flip_half(x)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _flip_half(x: torch.Tensor) -> torch.Tensor:
    """_rotate_half as the two halves swapped (a flip) times (-1, +1): an index remap plus a multiply, which inductor
    fuses into its consumer (eagerly it would be three launches where the cat is one)."""
    sign = torch.arange(2, device=x.device, dtype=x.dtype)[:, None] * 2 - 1  # [[-1], [+1]]
    return (x.unflatten(-1, (2, -1)).flip(-2) * sign).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split pairs (x_i, x_{i+D/2}), Llama style. x [B, h, L, D]; cos/sin [B, L, d]. Partial rotary: only
    the first d dims turn (GLM-4.5, d = D/2)."""
    cos, sin = cos[:, None], sin[:, None]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (x_{2i}, x_{2i+1}), DeepSeek style; the result is de-interleaved ([evens | odds] turned),
    as transformers does: queries and keys share the layout, so their dot products are the model's.
    x [B, h, L, D]; cos/sin [B, L, D] (the cat(freqs, freqs) tables: the first half holds each pair's angle)."""
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]  # [B, 1, L, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
