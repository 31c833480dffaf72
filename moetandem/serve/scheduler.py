"""The scheduler: which sequences wait, which run next, and when each one is finished.

Admission (`submit`: all of a request's sequences or none; 400 when it can never fit, 429 when it could later,
503 while draining), cancellation (`cancel`, applied on the engine thread), and `finish`: the one place where a
sequence ends (stop string, length, end-of-sequence, cancel, engine error, shutdown) and its KV-cache slot is given
back. HTTP handlers call submit / cancel from their threads; everything else runs on the engine thread."""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from moetandem.batcher import Request
from moetandem.serve.metrics import ServerMetrics
from moetandem.serve.runner import TokenEvent
from moetandem.serve.sequence import Event, Job


class QueueFull(Exception):
    """More sequences than free slots plus queue room right now: the caller answers 429 (retry later)."""


class NeverFits(Exception):
    """More sequences than slots plus queue, even with an empty server: the caller answers 400."""


class EngineDead(Exception):
    """The engine thread has stopped (crashed or shut down): the caller answers 503."""


class Draining(EngineDead):
    """The server is shutting down and admits nothing new: the caller answers 503."""


SHUTDOWN = "the server is shutting down"


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int, metrics: ServerMetrics,
                 release: Callable[[Request], None], tokenizer_lock: threading.Lock) -> None:
        self.max_batch, self.max_waiting, self.metrics = max_batch, max_waiting, metrics
        self.release, self.tokenizer_lock = release, tokenizer_lock
        self.cv = threading.Condition()  # guards the fields below; the engine thread waits on it
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[Job, None] = {}  # insertion-ordered set
        self.draining = False
        self._cancels: list[Job] = []
        self._abort: str | None = None  # set by abort(): end every sequence at the next turn

    # ---------------------------------------------------------------- any thread
    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's sequences, all or none. Raises NeverFits / QueueFull / Draining."""
        capacity = self.max_batch + self.max_waiting
        if len(jobs) > capacity:
            raise NeverFits(f"this request needs {len(jobs)} sequences (prompts x n) but the server runs at most "
                            f"{self.max_batch} and queues at most {self.max_waiting}; send fewer prompts or a "
                            "smaller n")
        with self.cv:
            if self.draining:
                raise Draining(f"{SHUTDOWN} and accepts no new requests")
            if len(self.running) + len(self.waiting) + len(jobs) > capacity:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.running)} sequences running and {len(self.waiting)} waiting; "
                                "the queue is full, retry shortly")
            self.waiting.extend(jobs)
            self.metrics.sequences_submitted.inc(len(jobs))
            self.cv.notify_all()

    def cancel(self, jobs: Iterable[Job]) -> None:
        """Drop sequences (client gone): ended before the next step. Finished ones are ignored."""
        with self.cv:
            self._cancels.extend(j for j in jobs if j.finish is None)
            self.cv.notify_all()

    def close(self) -> None:
        """Admit nothing more (drain); what is queued or running goes on."""
        with self.cv:
            self.draining = True

    def abort(self, message: str) -> None:
        """End every queued and running sequence with an error at the engine thread's next turn."""
        with self.cv:
            self._abort = message
            self.cv.notify_all()

    def has_work(self) -> bool:
        with self.cv:
            return bool(self._cancels or self.waiting or self.running or self._abort)

    def empty(self) -> bool:
        with self.cv:
            return not (self.waiting or self.running or self._cancels)

    # ---------------------------------------------------------------- the engine thread
    def schedule(self, free_slots: int) -> list[Job]:
        """Apply cancellations (and an abort), then move up to `free_slots` waiting sequences to running, in
        arrival order; returns them for prefill."""
        with self.cv:
            cancels, self._cancels = self._cancels, []
            for j in cancels:
                self.finish(j, "cancelled")
            if self._abort is not None:
                message, self._abort = self._abort, None
                for j in [*self.waiting, *self.running]:
                    self.finish(j, "error", message, code="server_shutting_down")
            admit = [self.waiting.popleft() for _ in range(min(free_slots, len(self.waiting)))]
            for j in admit:
                self.running[j] = None
        now = time.perf_counter()
        for j in admit:
            self.metrics.queue_time.observe(now - j.arrival)
            self.metrics.prompt_tokens.inc(len(j.req.prompt))
            self.metrics.request_prompt_tokens.observe(len(j.req.prompt))
        return admit

    def on_tokens(self, events: list[TokenEvent], jobs: list[Job]) -> None:
        """Hand each sequence's new token to its handler and end the sequences that are done."""
        by_req = {id(j.req): j for j in jobs}
        now = time.perf_counter()
        for req, tok in events:
            j = by_req.get(id(req))
            if j is not None and j.finish is None:
                self._on_token(j, tok, now)

    def _on_token(self, j: Job, tok: int, now: float) -> None:
        m = self.metrics
        if j.tokens == 0:
            m.ttft.observe(now - j.arrival)
        else:
            m.itl.observe(now - j.last)
        j.last = now
        j.tokens += 1
        m.generation_tokens.inc()
        req = j.req
        # j.tokens, not len(req.out): one step may have made several tokens of this sequence (split/decode.py)
        reason = "stop" if tok in req.stop_ids else "length" if j.tokens >= req.max_new_tokens else None
        with self.tokenizer_lock:
            j.add_text(tok, final=reason is not None)
        piece, hit = j.take(final=reason is not None)
        if hit:
            reason = "stop"
        if reason is None:
            if piece:
                j.emit(Event(j.index, piece, logprobs=j.new_logprobs()))
        else:
            self.finish(j, reason, piece=piece)

    def fail(self, jobs: list[Job], message: str) -> None:
        """An engine error hit these sequences' batch."""
        for j in jobs:
            self.finish(j, "error", message)

    def finish(self, j: Job, reason: str, error: str | None = None, piece: str = "",
               code: str = "engine_error") -> None:
        """End a sequence: the one place that does. Frees its KV-cache slot and queue entry, counts it, and
        sends its last event (its handler may be gone already: then nobody reads it)."""
        if j.finish is not None:
            return
        j.finish = reason
        if j.req.finish_reason is None:
            j.req.finish_reason = reason
        self.release(j.req)
        with self.cv:
            self.running.pop(j, None)
            try:
                self.waiting.remove(j)
            except ValueError:
                pass
        if reason in ("stop", "length"):
            self.metrics.e2e.observe(time.perf_counter() - j.arrival)
            self.metrics.request_generation_tokens.observe(j.tokens)
        self.metrics.sequences_finished.labels(reason).inc()
        if reason != "cancelled":
            j.emit(Event(j.index, piece, reason, error, code, j.new_logprobs()))

    def finish_all(self, message: str, code: str) -> None:
        """The engine thread is leaving: end everything still queued or running."""
        with self.cv:
            cancels, self._cancels = self._cancels, []
            leftovers = [*self.waiting, *self.running]
        for j in cancels:
            self.finish(j, "cancelled")
        for j in leftovers:
            self.finish(j, "error", message, code=code)
