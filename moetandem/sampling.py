"""Greedy and temperature / top-p sampling, and the log-probabilities of the tokens drawn."""
from __future__ import annotations

from typing import NamedTuple

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


class TokenLogprob(NamedTuple):
    """One generated token and its log-probability under the model's distribution, with the k most likely
    alternatives (token id, logprob), best first."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """logits [W, V] (the raw rows the tokens were drawn from), tokens (W ids) -> each token's logprob and the top
    k (>= 0) of its row, read back to the host in one transfer."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [W, V]
    ids = torch.tensor(tokens, device=logits.device)[:, None]  # [W, 1]
    chosen = lp.gather(-1, ids)  # [W, 1]
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (chosen[:, :0], ids[:, :0])  # [W, k]
    # one float64 block [W, 1 + 2k]: token ids < 2^53 are exact in float64
    rows = torch.cat([chosen.double(), top_v.double(), top_i.double()], dim=-1).tolist()
    return [TokenLogprob(t, r[0], [(int(i), v) for v, i in zip(r[1: 1 + k], r[1 + k:])])
            for t, r in zip(tokens, rows)]
