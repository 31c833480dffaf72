"""CUDA graphs for decode steps: one captured forward per (padded batch, KV cache), replayed every token,
so batch-1 decode is not bound by Python and kernel launches. Batches are padded to a power of two with rows
that write into the cache's scratch row, so a handful of graphs serve every batch size."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moetandem.experts.provider import ExpertProvider
from moetandem.models import KVCache, MoEForCausalLM

log = logging.getLogger("moetandem")


@dataclass
class _Entry:
    cache: KVCache
    ids: torch.Tensor  # [Ap, 1] static input
    pos: torch.Tensor  # [Ap, 1]
    rows: torch.Tensor  # [Ap]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [Ap, V] static output


def capture_graph(warm: Callable[[], object], pool: Any, step: Callable[[], torch.Tensor]
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Two warm-up calls of `warm` on a side stream (kernel tuning, compilation, lazy allocations), then `step`
    captured into a new graph drawing on `pool`. Returns the graph (not yet replayed) and the step's static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            warm()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class DecodeGraphs:
    def __init__(self, model: MoEForCausalLM, experts: Mapping[int, ExpertProvider], compile: bool = False) -> None:
        """compile: run the captured step through torch.compile (inductor fuses the norms, RoPE, routing and
        residual adds into few kernels; the fused MoE stays one custom op). Falls back to eager, with a warning
        logged once, if compilation fails."""
        self.model, self.experts = model, experts
        self.forward: Callable[..., torch.Tensor] = torch.compile(model, dynamic=False) if compile else model
        self.entries: dict[tuple[int, int], _Entry] = {}  # (padded batch, id(cache))
        self.pool = torch.cuda.graph_pool_handle()

    def clear(self) -> None:
        self.entries.clear()

    def forget(self, cache: KVCache) -> None:
        """Drop graphs bound to a cache that is being freed."""
        self.entries = {k: e for k, e in self.entries.items() if e.cache is not cache}

    def step(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, cache: KVCache,
             scratch_row: int) -> torch.Tensor:
        """ids/pos [A, 1], rows [A] -> logits [Ap, V] (first A rows are real; valid until the next step)."""
        A = ids.shape[0]
        Ap = min(1 << (A - 1).bit_length(), cache.batch - 1)
        key = (Ap, id(cache))
        e = self.entries.get(key)
        if e is None:
            dev = ids.device
            e = self.entries[key] = _Entry(cache, torch.zeros(Ap, 1, dtype=torch.long, device=dev),
                                           torch.zeros(Ap, 1, dtype=torch.long, device=dev),
                                           torch.full((Ap,), scratch_row, dtype=torch.long, device=dev))
        e.ids[:A].copy_(ids)
        e.pos[:A].copy_(pos)
        e.rows[:A].copy_(rows)
        e.ids[A:].zero_()
        e.pos[A:].zero_()
        e.rows[A:].fill_(scratch_row)
        if e.graph is None:
            self._capture(e)
        else:
            e.graph.replay()
        assert e.logits is not None
        return e.logits

    def _capture(self, e: _Entry) -> None:
        # Warm-up runs compute the real step (same K/V written at the same positions), so they are harmless.
        graph, e.logits = capture_graph(
            lambda: self._warm(e), self.pool,
            lambda: self.forward(e.ids, e.pos, e.cache, e.cache.max_len, self.experts, rows=e.rows)[:, -1])
        graph.replay()
        e.graph = graph

    def _warm(self, e: _Entry) -> None:
        try:
            self.forward(e.ids, e.pos, e.cache, e.cache.max_len, self.experts, rows=e.rows)
        except Exception as err:  # an inductor / dynamo failure must not stop generation
            if self.forward is self.model:
                raise
            log.warning("torch.compile failed for the decode step (%s: %s); decoding with the eager model",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.forward = self.model
            self.model(e.ids, e.pos, e.cache, e.cache.max_len, self.experts, rows=e.rows)


class PieceGraphs:
    """CUDA graphs for pieces of a decode step that run between host work: in split execution, the end's head layers
    (before the frame goes to the cloud) and its tail layers + LM head (after the answer). A piece is a function of
    tensors; each (name, cache, input shapes, providers) is captured once and replayed with new inputs copied into
    its static buffers. capture=False keeps the same static-buffer plumbing but calls the function (CPU tests)."""

    def __init__(self, capture: bool = True) -> None:
        self.capture = capture
        self.entries: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def run(self, name: str, key: tuple, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) -> a new tensor (the captured output is copied out, so a later replay cannot overwrite it).
        key: what else fn depends on (the cache, kv_len, the expert providers); it must not change under a key."""
        full = (name, key, tuple((t.shape, t.dtype) for t in inputs))
        entry = self.entries.get(full)
        if entry is None:
            statics = [t.clone() for t in inputs]
            graph, out = self._capture(fn, statics) if self.capture else (None, None)
            entry = self.entries[full] = (statics, graph, out)
        statics, graph, out = entry
        for s, t in zip(statics, inputs):
            s.copy_(t)
        if graph is None:
            return fn(*statics)
        graph.replay()
        assert out is not None
        return out.clone()

    def _capture(self, fn: Callable[..., torch.Tensor], statics: list[torch.Tensor]
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm-up runs compute the real piece (same K/V written at the same positions): harmless
        return capture_graph(lambda: fn(*statics), self.pool, lambda: fn(*statics))

    def forget(self, cache: object) -> None:
        self.entries = {k: e for k, e in self.entries.items() if k[1][0] != id(cache)}
