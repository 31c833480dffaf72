"""The static cache, per layer kind: each attention component says what it keeps per token (GQA: K and V
[n_kv, D]; multi-head latent attention: the latent c_kv [r] and the shared rotary key [d_rope]) and what it keeps
per sequence (linear attention: the conv state and the recurrent state). Both are row-addressed: sequence b of a
forward uses cache row rows[b], so the batcher's slots hold either kind.

Per-sequence state is kept twice, by position parity ([R, 2, ...]): a forward whose tokens start at position p reads
the state at [row, p % 2] (zeros when p == 0: a new sequence) and writes the state after its last real token at
position e to [row, (e + 1) % 2]. Running a step twice at the same position (CUDA-graph warm-up, a rewound step)
therefore gives the same result, as re-writing the same K/V does, and a new sequence never sees a stale row."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class CacheLayout(Protocol):
    num_layers: int

    def cache_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of the buffers layer `layer` caches."""

    def state_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """Per-sequence shapes of the state layer `layer` keeps (fp32, two copies by position parity)."""


class KVCache:
    """Static per-layer buffers: per token [B, S, *shape] (sequence b's token at position p lives at [b, p]), then
    per sequence [B, 2, *shape] fp32. `k` / `v` are the first / second buffer of every layer (GQA: keys and values;
    MLA: c_kv and k_rope; linear attention: conv and recurrent state)."""

    def __init__(self, args: CacheLayout, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 layers: range | None = None) -> None:
        # layers: allocate only these (split mode: the cloud holds K/V of its layer range); others stay empty
        keep = range(args.num_layers) if layers is None else layers
        empty = torch.zeros(0, device=device, dtype=dtype)
        self.layers: list[tuple[torch.Tensor, ...]] = [
            self._alloc(args, i, batch, max_len, device, dtype) if i in keep else (empty, empty)
            for i in range(args.num_layers)]
        self.batch, self.max_len, self.device = batch, max_len, torch.device(device)

    @staticmethod
    def _alloc(args: CacheLayout, i: int, batch: int, max_len: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        tokens = [torch.zeros((batch, max_len, *s), device=device, dtype=dtype) for s in args.cache_shapes(i)]
        states = [torch.zeros((batch, 2, *s), device=device, dtype=torch.float32) for s in args.state_shapes(i)]
        return tuple(tokens + states)

    @property
    def k(self) -> list[torch.Tensor]:
        return [bufs[0] for bufs in self.layers]

    @property
    def v(self) -> list[torch.Tensor]:
        return [bufs[1] for bufs in self.layers]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self.layers for t in bufs)


def write_read(cache: Sequence[torch.Tensor], new: Sequence[torch.Tensor], rows: torch.Tensor | None,
               pos: torch.Tensor, kv_len: int) -> list[torch.Tensor]:
    """Write each new [B, L, ...] at cache[rows[b], pos[b, l]], then return this batch's [B, kv_len, ...] of each
    buffer. rows None: sequence b owns cache row b (a view, no copy); else the batch's rows are gathered."""
    write(cache, new, rows, pos)
    B = pos.shape[0]
    return [buf[:B, :kv_len] if rows is None else buf[rows, :kv_len] for buf in cache[:len(new)]]


def write(cache: Sequence[torch.Tensor], new: Sequence[torch.Tensor], rows: torch.Tensor | None,
          pos: torch.Tensor) -> None:
    """Write each new [B, L, ...] at cache[rows[b], pos[b, l]] (rows None: row b)."""
    r = torch.arange(pos.shape[0], device=pos.device) if rows is None else rows  # [B]
    for buf, t in zip(cache, new):
        buf[r[:, None], pos] = t.to(buf.dtype)


def read_state(buf: torch.Tensor, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The state of each sequence before its first token at position start [B]: buf[rows[b], start[b] % 2], or
    zeros for a sequence that starts here (start 0). buf [R, 2, *s] -> [B, *s] fp32."""
    st = buf[rows, start % 2]  # [B, *s]
    fresh = (start == 0).view(-1, *([1] * (st.dim() - 1)))
    return torch.where(fresh, torch.zeros_like(st), st)


def write_state(buf: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, end: torch.Tensor) -> None:
    """Store each sequence's state after its token at position end[b] - 1 at buf[rows[b], end[b] % 2]."""
    buf[rows, end % 2] = new.to(buf.dtype)
