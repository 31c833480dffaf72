"""Per-sequence logits processors for the batcher's hook (`Request.logits_processor` / `Request.accept`):
presence / frequency penalties and `logit_bias` here, grammar constraints in `serve/structured.py`; `attach`
chains them onto one request."""
from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch

from moetandem.batcher import Request


class Processor(Protocol):
    def process(self, row: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


class Penalties:
    """OpenAI's penalties over the tokens generated so far, and a fixed bias per token id:
    logit[t] += bias[t] - presence * (count[t] > 0) - frequency * count[t]."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, bias: dict[int, float] | None = None) -> None:
        self.presence, self.frequency = presence, frequency
        self.bias = bias or {}
        self.counts: Counter[int] = Counter()

    def process(self, row: torch.Tensor) -> torch.Tensor:
        row = row.clone()
        if self.bias:
            ids = torch.tensor(list(self.bias), device=row.device)
            row[ids] += torch.tensor(list(self.bias.values()), dtype=row.dtype, device=row.device)
        if self.counts and (self.presence or self.frequency):
            ids = torch.tensor(list(self.counts), device=row.device)
            n = torch.tensor(list(self.counts.values()), dtype=row.dtype, device=row.device)
            row[ids] -= self.presence + self.frequency * n
        return row

    def accept(self, token: int) -> None:
        self.counts[token] += 1


def attach(req: Request, processors: list[Processor]) -> None:
    """Run `processors` in order on `req`'s logits row (a grammar mask last, so nothing re-enables a token it
    forbids), and tell each the token chosen."""
    if not processors:
        return

    def process(row: torch.Tensor) -> torch.Tensor:
        for p in processors:
            row = p.process(row)
        return row

    def accept(token: int) -> None:
        for p in processors:
            p.accept(token)

    req.logits_processor, req.accept = process, accept
