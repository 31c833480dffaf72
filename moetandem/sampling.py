"""Greedy and temperature / top-p sampling."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. temperature 0 means greedy."""
    if temperature < 1e-5:  # below this, sampling is greedy anyway and the division would overflow
        return logits.argmax(dim=-1)
    z = logits.float()
    probs = torch.softmax((z - z.max(dim=-1, keepdim=True).values) / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
