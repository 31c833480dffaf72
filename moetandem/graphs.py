"""CUDA graphs for decode steps: one captured forward per (batch, cache length), replayed every token,
so batch-1 decode is not bound by Python and kernel launches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moetandem.models import KVCache, MoEForCausalLM


@dataclass
class _Entry:
    cache: KVCache
    ids: torch.Tensor  # [B, 1] static input
    pos: torch.Tensor  # [B, 1] static input
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [B, V] static output


class DecodeGraphs:
    def __init__(self, model: MoEForCausalLM, max_entries: int = 8) -> None:
        self.model, self.max_entries = model, max_entries
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def clear(self) -> None:
        self.entries.clear()

    def cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        """The KV cache bound to the graph for this shape (a graph replays on fixed buffers)."""
        key = (batch, max_len)
        if key not in self.entries:
            if len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            dev = self.model.lm_head.weight.device
            self.entries[key] = _Entry(KVCache(self.model.args, batch, max_len, dev, dtype),
                                       torch.zeros(batch, 1, dtype=torch.long, device=dev),
                                       torch.zeros(batch, 1, dtype=torch.long, device=dev))
        return self.entries[key].cache

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: ids/pos [B, 1] -> logits [B, V] (valid until the next step)."""
        e = self.entries[(cache.batch, cache.max_len)]
        e.ids.copy_(ids)
        e.pos.copy_(pos)
        if e.graph is None:
            self._capture(e)
        else:
            e.graph.replay()
        assert e.logits is not None
        return e.logits

    def _capture(self, e: _Entry) -> None:
        # Warm-up runs compute the real step (same K/V written at the same positions), so they are harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(e.ids, e.pos, e.cache, e.cache.max_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            e.logits = self.model(e.ids, e.pos, e.cache, e.cache.max_len)[:, -1]
        graph.replay()
        e.graph = graph
