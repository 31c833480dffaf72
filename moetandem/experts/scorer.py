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
import torch.nn.functional as F

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
        self.layers = list(layers)
        self._index = {l: i for i, l in enumerate(self.layers)}
        # every layer's state in one tensor, so a refresh reads all due layers with one set of ops (scores_many);
        # each layer's compute writes its own view
        L = len(self.layers)
        if kind == "ema":
            self._emas = torch.zeros(L, num_experts, device=device)  # [L, E]
            self.ema = {l: self._emas[i] for i, l in enumerate(self.layers)}  # [E] views
        else:
            self._rings = torch.zeros(L, self.R, num_experts + 1, device=device)  # [L, R, E+1]
            self._heads = torch.zeros(L, 1, dtype=torch.long, device=device)  # [L, 1] next write
            self.ring = {l: self._rings[i] for i, l in enumerate(self.layers)}  # [R, E+1] views
            self.head = {l: self._heads[i] for i, l in enumerate(self.layers)}  # [1] views

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
        return self.scores_many([layer])[0]

    def scores_many(self, layers: list[int]) -> torch.Tensor:
        """[len(layers), E] float32 on the device: the current scores of these layers, in one set of ops."""
        sel = [self._index[l] for l in layers]

        def pick(t: torch.Tensor) -> torch.Tensor:  # views for all layers or one, a gather for other subsets
            return t if layers == self.layers else t.narrow(0, sel[0], 1) if len(sel) == 1 else t[sel]
        if self.kind == "ema":
            return pick(self._emas)
        rings, heads = pick(self._rings), pick(self._heads)  # [L', R, E+1], [L', 1] writes so far
        # in ring order (no reordering copy): the tokens of the calls newer than slot j are those of slots
        # j+1 .. h-1, wrapping past the end when j >= h (h: the next write's slot), from one prefix sum
        tokens = rings[..., self.E]  # [L', R]
        P = F.pad(tokens.cumsum(1), (1, 0))  # [L', R+1]: P[:, i] = tokens of slots < i
        j = torch.arange(self.R, device=rings.device)  # [R]
        h = heads % self.R  # [L', 1]
        before_h = P.gather(1, h)  # [L', 1]
        newer = torch.where(j < h, before_h - P[:, 1:], P[:, -1:] - P[:, 1:] + before_h)  # [L', R]
        keep = (j < heads) & (newer < self.window)  # written, and within the window of newer tokens
        return (rings[..., : self.E] * keep[..., None]).sum(1)  # [L', E]

    def scores(self, layer: int) -> torch.Tensor:
        """[E] float32 on the host (syncs: call between steps)."""
        return self.scores_device(layer).cpu()
