"""The model runner: one step at a time on the engine's continuous batcher. It prefills sequences into free
KV-cache slots, runs one decode step, and returns raw token events; it knows nothing about HTTP requests, stop
strings or when a sequence is finished (the scheduler decides that and calls `release`)."""
from __future__ import annotations

from typing import Any

from moetandem.batcher import Batcher, Request

TokenEvent = tuple[Request, int]  # (sequence, the token it just produced)


class Runner:
    """Owns the Batcher (and so the KV cache and its slots). Not thread-safe: only the engine thread calls it."""

    def __init__(self, engine: Any, max_batch: int, max_len: int) -> None:
        self.batcher = Batcher(engine, max_batch, max_len)

    def free_slots(self) -> int:
        return self.batcher.free_slots()

    @property
    def active(self) -> list[Request]:
        """Sequences holding a KV-cache slot."""
        return self.batcher.active

    def prefill(self, seqs: list[Request]) -> list[TokenEvent]:
        """Prefill `seqs` (at most free_slots()) into free slots, one padded batch; their first tokens."""
        return self.batcher.add(seqs)

    def step(self) -> list[TokenEvent]:
        """One decode step of every sequence holding a slot; one token each (or several, in order, with split
        option cloud_decode_tokens)."""
        return self.batcher.step() if self.batcher.active else []

    def release(self, seq: Request) -> None:
        """Free the slot of `seq` (no-op when it holds none, e.g. the batcher already freed it at its end)."""
        self.batcher.cancel(seq)
