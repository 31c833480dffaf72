"""CUDA graphs for decode steps: one captured forward per (padded batch, KV cache), replayed every token,
so batch-1 decode is not bound by Python and kernel launches. Batches are padded to a power of two with rows
that write into the cache's scratch row, so a handful of graphs serve every batch size."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moetandem.experts.provider import ExpertProvider
from moetandem.models import KVCache, MoEForCausalLM

log = logging.getLogger("moetandem")


def allow_layer_frames(layers: int) -> None:
    """Let dynamo compile one frame per layer. A graph break inside a layer (a committee's host-side bookkeeping)
    makes the rest of it a frame of its own, specialised on the layer's index; past dynamo's default of 8
    recompiles the later layers would silently run eagerly. Process-wide and only ever raised."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * layers + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * layers + 64)


class StaticInput:
    """An int64 device tensor a captured step reads, fed from the host only when its contents change (one pinned
    staging buffer, one H2D copy per change). A step that writes its own next inputs (its argmax, position + 1)
    says so with `holds`, and the next `feed` of those values copies nothing."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, fill: int = 0) -> None:
        self.tensor = torch.full(shape, fill, dtype=torch.long, device=device)
        self.staging = torch.zeros(shape, dtype=torch.long, pin_memory=device.type == "cuda")
        self.held: Any = None  # the key of what `tensor` holds for the next step (None: its initial fill)
        self.copies = 0  # feeds that had to copy from the host

    def feed(self, key: Any, fill: Callable[[torch.Tensor], None]) -> None:
        """Make `tensor` hold `key`'s contents: if it does not already, fill(staging) writes them and they travel."""
        if key == self.held:
            return
        fill(self.staging)
        self.tensor.copy_(self.staging, non_blocking=True)  # the step's host sync orders the staging's next reuse
        self.copies += 1
        self.held = key

    def holds(self, key: Any) -> None:
        self.held = key


@dataclass
class _Entry:
    cache: KVCache
    inputs: StaticInput  # [3, Ap, 1]: token ids, positions, cache rows; keyed by the real rows' (ids, pos, rows)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [Ap, V] static output
    greedy: torch.Tensor | None = None  # [Ap] static output: argmax of each row's logits


def bucket(rows: int, max_rows: int) -> int:
    """The batch size a decode step of `rows` sequences runs at: the next power of two, at most `max_rows` (a
    graph per bucket; the rows above `rows` are padding)."""
    return min(1 << (rows - 1).bit_length(), max_rows)


def buckets(max_rows: int) -> list[int]:
    """Every bucket a batch of 1..max_rows sequences can fall in."""
    return sorted({bucket(a, max_rows) for a in range(1, max_rows + 1)})


#: the warm-up stream of each device, one per process: torch gives every stream that runs a cuBLAS call its own
#: workspace (32 MiB on Hopper) and keeps it until the process ends, so a new stream per capture leaked that much per
#: graph (per engine loaded, per batch size captured, per seq2seq generate call)
_WARM_STREAMS: dict[int, torch.cuda.Stream] = {}


def warm_stream() -> torch.cuda.Stream:
    """The current device's warm-up side stream (created on first use)."""
    dev = torch.cuda.current_device()
    if dev not in _WARM_STREAMS:
        _WARM_STREAMS[dev] = torch.cuda.Stream()
    return _WARM_STREAMS[dev]


def capture_graph(warm: Callable[[], object], pool: Any, step: Callable[[], torch.Tensor]
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Two warm-up calls of `warm` on the side stream (kernel tuning, compilation, lazy allocations), then `step`
    captured into a new graph drawing on `pool`. Returns the graph (not yet replayed) and the step's static output."""
    side = warm_stream()
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
    def __init__(self, model: MoEForCausalLM, experts: Mapping[int, ExpertProvider], compile: bool = False,
                 capture: bool = True) -> None:
        """compile: run the captured step through torch.compile (inductor fuses the norms, RoPE, routing and
        residual adds into few kernels; the fused MoE stays one custom op). Falls back to eager, with a warning
        logged once, if compilation fails. capture=False runs the same static-buffer bookkeeping eagerly (CPU)."""
        self.model, self.experts, self.capture = model, experts, capture
        if compile:
            allow_layer_frames(len(model.model.layers))
        self.forward: Callable[..., torch.Tensor] = torch.compile(model, dynamic=False) if compile else model
        self.entries: dict[tuple[int, int], _Entry] = {}  # (padded batch, id(cache))
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def input_copies(self) -> int:
        """Steps whose inputs had to travel from the host (the rest reused what the last step left)."""
        return sum(e.inputs.copies for e in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()

    def forget(self, cache: KVCache) -> None:
        """Drop graphs bound to a cache that is being freed."""
        self.entries = {k: e for k, e in self.entries.items() if e.cache is not cache}

    def step(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int], cache: KVCache,
             scratch_row: int) -> tuple[torch.Tensor, list[int]]:
        """One decode step of A sequences: their last tokens, those tokens' positions and their cache rows ->
        (logits [Ap, V], the first A rows real, valid until the next step; each real row's argmax token).
        Padding rows (up to a power of two) write into `scratch_row`. The inputs travel to the device only when
        they differ from what the previous replay left for this one (sampled tokens, a changed batch)."""
        A = len(tokens)
        Ap = bucket(A, cache.batch - 1)
        key = (Ap, id(cache))
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry(cache, StaticInput((3, Ap, 1), cache.device))

        def fill(staging: torch.Tensor) -> None:  # padding rows: token 0 at position 0 of the scratch row
            staging.zero_()
            staging[2].fill_(scratch_row)
            staging[0, :A, 0] = torch.tensor(tokens)
            staging[1, :A, 0] = torch.tensor(positions)
            staging[2, :A, 0] = torch.tensor(rows)
        want = (tuple(tokens), tuple(positions), tuple(rows))
        e.inputs.feed(want, fill)
        if e.graph is None:
            self._capture(e, scratch_row)
        else:
            e.graph.replay()
        assert e.logits is not None and e.greedy is not None
        greedy = e.greedy[:A].tolist()  # the step's one host sync
        e.inputs.holds((tuple(greedy), tuple(p + 1 for p in positions), want[2]))
        return e.logits, greedy

    def _step(self, e: _Entry, scratch_row: int) -> torch.Tensor:
        """The captured work: the forward, its argmax, and the next step's inputs for a greedy batch that keeps
        its rows (token = argmax, position + 1; padding rows stay at position 0 of the scratch row)."""
        ids, pos, rows = e.inputs.tensor[0], e.inputs.tensor[1], e.inputs.tensor[2, :, 0]
        logits = self.forward(ids, pos, e.cache, e.cache.max_len, self.experts, rows=rows)[:, -1]  # [Ap, V]
        greedy = logits.argmax(dim=-1)  # [Ap]
        ids.copy_(greedy[:, None])
        pos.copy_(torch.where(rows[:, None] == scratch_row, 0, pos + 1))
        e.greedy = greedy
        return logits

    def _capture(self, e: _Entry, scratch_row: int) -> None:
        if not self.capture:  # eager: the same bookkeeping, no graph
            e.logits = self._step(e, scratch_row)
            return
        # Warm-up runs compute the real step (same K/V written at the same positions), so they are harmless.
        graph, e.logits = capture_graph(lambda: self._warm(e), self.pool, lambda: self._step(e, scratch_row))
        graph.replay()
        e.graph = graph

    def _warm(self, e: _Entry) -> None:
        ids, pos, rows = e.inputs.tensor[0], e.inputs.tensor[1], e.inputs.tensor[2, :, 0]
        try:
            self.forward(ids, pos, e.cache, e.cache.max_len, self.experts, rows=rows)
        except Exception as err:  # an inductor / dynamo failure must not stop generation
            if self.forward is self.model:
                raise
            log.warning("torch.compile failed for the decode step (%s: %s); decoding with the eager model",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.forward = self.model
            self.model(ids, pos, e.cache, e.cache.max_len, self.experts, rows=rows)


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


class Seq2SeqStep:
    """One encoder-decoder decode step over static buffers, for one generate call: every row is at the same
    position, attends over the whole self-attention cache (kv_len = cache.max_len; keys at or past its position
    are masked, which gives the logits of kv_len = position + 1) and reads that call's cross-attention K/V and
    source mask. capture=True records it as a CUDA graph on the first step and replays it after; the graph is bound
    to this call's cache, cross K/V and mask, so each generate call captures anew (two warm-up steps and one
    capture: a few steps' time, small against a generation). capture=False runs the same bookkeeping eagerly."""

    def __init__(self, model: Any, experts: Mapping[int, ExpertProvider], cache: KVCache,
                 cross: list[tuple[torch.Tensor, torch.Tensor]], enc_mask: torch.Tensor, start_token: int,
                 capture: bool) -> None:
        self.model, self.experts, self.cache, self.cross, self.enc_mask = model, experts, cache, cross, enc_mask
        self.capture, dev = capture, cache.device
        B = cache.batch
        self.inputs = StaticInput((B, 1), dev, fill=start_token)  # the tokens (held key None: the start tokens)
        self.tokens = self.inputs.tensor  # [B, 1] static input
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)  # static input: every row at the same position
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B, V] static output
        self.greedy: torch.Tensor | None = None  # [B] static output: each row's argmax

    @property
    def input_copies(self) -> int:
        """Steps whose tokens had to travel from the host (the rest fed the step's argmax)."""
        return self.inputs.copies

    def step(self, tokens: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Decode the next position from `tokens` (one per row; None: what the buffer holds, the start tokens on
        the first step) -> (logits [B, V], valid until the next step; each row's argmax). After a step the buffer
        holds the argmax tokens, so a greedy batch copies nothing in."""
        if tokens is not None:
            self.inputs.feed(list(tokens), lambda staging: staging[:, 0].copy_(torch.tensor(list(tokens))))
        if not self.capture:
            self.logits = self._step()
        elif self.graph is None:
            # warm-ups compute the real step (the same K/V written at the same position): harmless
            self.graph, self.logits = capture_graph(self._forward, None, self._step)
            self.graph.replay()
        else:
            self.graph.replay()
        assert self.logits is not None and self.greedy is not None
        greedy = self.greedy.tolist()  # the step's one host sync
        self.inputs.holds(greedy)
        return self.logits, greedy

    def _forward(self) -> torch.Tensor:
        return self.model.decode(self.tokens, self.pos, self.cache, self.cache.max_len, self.cross, self.enc_mask,
                                 self.experts)[:, -1]  # [B, V]

    def _step(self) -> torch.Tensor:
        """The captured work: the forward, its argmax, and the next step's inputs (argmax tokens, position + 1)."""
        logits = self._forward()
        self.greedy = logits.argmax(dim=-1)  # [B]
        self.tokens.copy_(self.greedy[:, None])
        self.pos.add_(1)
        return logits
