"""Importance of every expert, accumulated on the device inside compute (graph-capturable: tensor ops only, no
host counters that advance per call); the host reads scores only when it refreshes the committee.

Kinds: "importance" (PC-MoE: Σ over tokens routed to i of ‖x‖·g_i(x)·‖E_i‖), "count" (routed assignments), both
over a window of the most recent `window` tokens; "ema" (importance, exponentially decayed with a time constant
of `window` tokens).

The window is a device ring of per-call vectors [R, E+1] (last column: the call's token count) with a device
write position; the read keeps the newest calls whose newer neighbours hold fewer than `window` tokens, i.e. the
shortest suffix holding at least `window` tokens, as a host deque would."""
from __future__ import annotations

import torch

from moetandem.errors import InvalidRequestError

SCORES = ("importance", "count", "ema")
MAX_RING = 4096  # calls kept per layer; a window beyond this many decode steps is cut to it


class Scorer:
    def __init__(self, kind: str, window: int, layers: list[int], num_experts: int,
                 norms: dict[int, torch.Tensor], device: torch.device) -> None:
        if kind not in SCORES:
            raise InvalidRequestError(f"unknown committee score {kind!r}; choose one of {', '.join(SCORES)}")
        if window < 1:
            raise InvalidRequestError(f"the importance window must be at least 1 token, got {window}")
        self.kind, self.window, self.E = kind, window, num_experts
        self.R = min(window, MAX_RING)
        self.norms = {l: norms[l].to(device, torch.float32) for l in layers}  # ‖E_i‖ [E] per layer
        if kind == "ema":
            self.ema = {l: torch.zeros(num_experts, device=device) for l in layers}  # [E]
        else:
            self.ring = {l: torch.zeros(self.R, num_experts + 1, device=device) for l in layers}  # [R, E+1]
            self.head = {l: torch.zeros(1, dtype=torch.long, device=device) for l in layers}  # [1] next write

    def observe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Add one call's routing: x [T, H], ids [T, k], w [T, k]. Tensor ops only."""
        T = x.shape[0]
        if T == 0:
            return
        if self.kind == "count":
            contrib = torch.ones(ids.shape, device=x.device)  # [T, k]
        else:  # ‖x‖ · g_i(x) · ‖E_i‖
            contrib = x.float().norm(dim=-1, keepdim=True) * w.float() * self.norms[layer][ids]  # [T, k]
        vec = torch.zeros(self.E + 1, device=x.device)  # [E+1]
        vec.scatter_add_(0, ids.reshape(-1), contrib.reshape(-1))
        if self.kind == "ema":
            self.ema[layer].mul_((1.0 - 1.0 / self.window) ** T).add_(vec[: self.E])
            return
        vec.narrow(0, self.E, 1).fill_(T)  # the call's tokens (a fill: T is fixed for a captured graph)
        head = self.head[layer]
        self.ring[layer].index_copy_(0, head % self.R, vec[None])
        head.add_(1)

    def scores_device(self, layer: int) -> torch.Tensor:
        """[E] float32 on the device: the current scores (no host sync)."""
        if self.kind == "ema":
            return self.ema[layer]
        ring, head = self.ring[layer], self.head[layer]
        age = torch.arange(self.R, device=ring.device)  # 0 = newest
        idx = (head - 1 - age) % self.R  # [R] ring rows, newest first
        rows = ring[idx]  # [R, E+1]
        tokens = rows[:, self.E]  # [R]
        newer = tokens.cumsum(0) - tokens  # tokens in newer calls  [R]
        keep = (age < head) & (newer < self.window)  # [R]
        return (rows[:, : self.E] * keep[:, None]).sum(0)  # [E]

    def scores(self, layer: int) -> torch.Tensor:
        """[E] float32 on the host (syncs: call between steps)."""
        return self.scores_device(layer).cpu()
