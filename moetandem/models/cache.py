"""The static KV cache, per layer kind: each attention component says what it keeps per token (GQA: K and V
[n_kv, D]; multi-head latent attention: the latent c_kv [r] and the shared rotary key [d_rope])."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class CacheLayout(Protocol):
    num_layers: int

    def cache_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of the buffers layer `layer` caches."""


class KVCache:
    """Static per-layer buffers [B, S, *shape]; sequence b's token at position p lives at [b, p].
    `k` / `v` are the first / second buffer of every layer (GQA: keys and values; MLA: c_kv and k_rope)."""

    def __init__(self, args: CacheLayout, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 layers: range | None = None) -> None:
        # layers: allocate only these (split mode: the cloud holds K/V of its layer range); others stay empty
        keep = range(args.num_layers) if layers is None else layers
        empty = torch.zeros(0, device=device, dtype=dtype)
        self.layers: list[tuple[torch.Tensor, ...]] = [
            tuple(torch.zeros((batch, max_len, *s), device=device, dtype=dtype) for s in args.cache_shapes(i))
            if i in keep else (empty, empty) for i in range(args.num_layers)]
        self.batch, self.max_len = batch, max_len

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
    B = pos.shape[0]
    r = torch.arange(B, device=pos.device) if rows is None else rows  # [B]
    out = []
    for buf, t in zip(cache, new):
        buf[r[:, None], pos] = t.to(buf.dtype)
        out.append(buf[:B, :kv_len] if rows is None else buf[rows, :kv_len])
    return out
