"""The engine thread: one thread owns the Batcher (which is not thread-safe) and runs continuous batching.

Each turn it applies cancellations, admits waiting sequences into free KV-cache slots (one prefill), runs one
decode step for every active sequence, and hands each sequence's new text to its HTTP handler through an asyncio
queue (``loop.call_soon_threadsafe``). Stop strings are matched here, on the decoded text, so a sequence leaves the
batch on the very token that completes one."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from moetandem.batcher import Batcher, Request
from moetandem.serve.metrics import ServerMetrics
from moetandem.streaming import TextStream

log = logging.getLogger("moetandem.serve")


class QueueFull(Exception):
    """More sequences than free slots plus queue room: the caller answers 429."""


class EngineDead(Exception):
    """The engine thread has stopped (crashed or shut down): the caller answers 503."""


class Event(NamedTuple):
    """What a handler receives: new text of choice `choice`; `finish` is set on the last event of that choice."""
    choice: int
    text: str
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One sequence (one choice of one HTTP request) and where its output goes."""
    req: Request
    index: int
    queue: "asyncio.Queue[Any]"
    aloop: asyncio.AbstractEventLoop
    stops: list[str] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    stream: TextStream | None = None
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` already handed out
    tokens: int = 0  # tokens counted as generated (up to the one that completed a stop string)
    finish: str | None = None
    last: float = 0.0

    def emit(self, event: Event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the handler's event loop is gone (server shutting down)
            pass


class EngineLoop:
    #: this many engine exceptions in a row (no successful step between) and the loop reports itself broken
    MAX_CONSECUTIVE_ERRORS = 5

    def __init__(self, engine: Any, max_batch: int = 8, max_waiting: int = 64, max_len: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        ctx = int(engine.args.max_position_embeddings)
        self.max_len = min(ctx, max_len) if max_len else ctx
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.batcher = Batcher(engine, max_batch, self.max_len)
        self.metrics = metrics or ServerMetrics()
        self.metrics.bind_gauges(lambda: len(self.running), lambda: len(self.waiting), max_batch)
        if hasattr(engine, "expert_stats"):
            self.metrics.bind_expert_stats(engine.expert_stats)
        if getattr(engine, "split", None) is not None:  # split execution (moetandem/split/end.py)
            self.metrics.bind_split_stats(engine.split.split_stats)
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers must not be used from two threads at once
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[Job, None] = {}  # insertion-ordered set
        self._cancels: list[Job] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.error: str | None = None
        self.consecutive_errors = 0
        self.last_engine_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="moetandem-engine", daemon=True)

    # ---------------------------------------------------------------- called from any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self.failing

    @property
    def failing(self) -> bool:
        return self.consecutive_errors >= self.MAX_CONSECUTIVE_ERRORS

    def status(self) -> str | None:
        """None when healthy, else why not."""
        if self.error is not None:
            return self.error
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        if self.failing:
            return f"the engine failed {self.consecutive_errors} times in a row; last: {self.last_engine_error}"
        return None

    def submit(self, jobs: list[Job]) -> None:
        """Queue sequences (all or none). Raises QueueFull / EngineDead."""
        with self._cv:
            if not self.alive or self._stopping:
                raise EngineDead(self.error or "the engine is not running")
            if len(self.running) + len(self.waiting) + len(jobs) > self.max_batch + self.max_waiting:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.running)} sequences running and {len(self.waiting)} waiting; "
                                "the queue is full, retry shortly")
            self.waiting.extend(jobs)
            self.metrics.sequences_submitted.inc(len(jobs))
            self._cv.notify()

    def cancel(self, jobs: Iterable[Job]) -> None:
        """Drop sequences (client gone): freed before the next step. Finished ones are ignored."""
        with self._cv:
            self._cancels.extend(j for j in jobs if j.finish is None)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Run fn on the engine thread between two decode steps (e.g. a live expert-budget change)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if not self.alive or self._stopping:
                raise EngineDead(self.error or "the engine is not running")
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def idle(self) -> bool:
        """No sequence queued, running, or holding a batcher slot."""
        with self._cv:
            return not self.waiting and not self.running and not self.batcher.active and not self._cancels

    # ---------------------------------------------------------------- the engine thread
    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._cancels or self.waiting or self.running or self._calls):
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._apply_cancels()
                    calls, self._calls = self._calls, []
                    for fn, fut in calls:
                        try:
                            fut.set_result(fn())
                        except Exception as e:  # reported to the caller, the loop goes on
                            fut.set_exception(e)
                    admit = [self.waiting.popleft() for _ in range(min(self.batcher.free_slots(),
                                                                         len(self.waiting)))]
                    for j in admit:
                        self.running[j] = None
                if admit:
                    self._prefill(admit)
                if self.running:
                    self._step()
        except BaseException as e:  # the thread must never die silently
            log.exception("engine thread crashed")
            self.error = f"engine thread crashed: {type(e).__name__}: {e}"
        finally:
            with self._cv:
                leftovers = list(self.waiting) + list(self.running)
                self.waiting.clear()
                self.running.clear()
            for j in leftovers:
                self._finish(j, "error", self.error or "the server is shutting down")

    def _apply_cancels(self) -> None:  # holds self._cv
        for j in self._cancels:
            if j.finish is not None:
                continue
            j.finish = "cancelled"
            self.batcher.cancel(j.req)
            self.running.pop(j, None)
            try:
                self.waiting.remove(j)
            except ValueError:
                pass
            self.metrics.sequences_finished.labels("cancelled").inc()
        self._cancels.clear()

    def _prefill(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for j in jobs:
            self.metrics.queue_time.observe(now - j.arrival)
            self.metrics.prompt_tokens.inc(len(j.req.prompt))
            self.metrics.request_prompt_tokens.observe(len(j.req.prompt))
        try:
            events = self.batcher.add([j.req for j in jobs])
        except Exception as e:  # fail these sequences, keep serving the others
            self._fail(jobs, e)
            return
        self._deliver(events, jobs)

    def _step(self) -> None:
        jobs = list(self.running)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.steps.inc()
        try:
            events = self.batcher.step()
        except Exception as e:
            self._fail(jobs, e)
            return
        self.consecutive_errors = 0  # only a decode step clears the count (prefills may work while steps fail)
        self._deliver(events, jobs)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        log.exception("engine error; failing %d sequence(s)", len(jobs))
        self.metrics.engine_errors.inc()
        self.consecutive_errors += 1
        self.last_engine_error = f"{type(err).__name__}: {err}"
        with self._cv:
            for j in jobs:
                self.batcher.cancel(j.req)
                self.running.pop(j, None)
        for j in jobs:
            self._finish(j, "error", f"internal engine error: {type(err).__name__}: {err}")

    def _deliver(self, events: list[tuple[Request, int]], jobs: list[Job]) -> None:
        by_req = {id(j.req): j for j in jobs}
        now = time.perf_counter()
        for req, tok in events:
            j = by_req.get(id(req))
            if j is None or j.finish is not None:
                continue
            self._on_token(j, tok, now)
        with self._cv:
            for j in jobs:
                if j.finish is not None:
                    self.running.pop(j, None)

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
        with self.tokenizer_lock:
            if j.stream is not None:
                j.text += j.stream.push(tok)
                if req.done:
                    j.text += j.stream.flush()
            else:  # no tokenizer: the text is the token ids, space separated
                j.text += f"{' ' if j.tokens > 1 else ''}{tok}"
        finish = req.finish_reason
        end = len(j.text)
        if j.stops:
            hit = _find_stop(j.text, j.stops, max(0, j.sent - max(map(len, j.stops)) + 1))
            if hit is not None:
                end, finish = hit, "stop"
                if not req.done:
                    req.finish_reason = "stop"
                    self.batcher.cancel(req)  # frees the slot now; finish_reason stays "stop"
            elif finish is None:
                end -= _held_back(j.text, j.stops)
        piece = j.text[j.sent:end] if end > j.sent else ""
        j.sent = max(j.sent, end)
        if finish is None:
            if piece:
                j.emit(Event(j.index, piece))
        else:
            self._finish(j, finish, None, piece)

    def _finish(self, j: Job, reason: str, error: str | None, piece: str = "") -> None:
        j.finish = reason
        if reason != "error":
            self.metrics.e2e.observe(time.perf_counter() - j.arrival)
            self.metrics.request_generation_tokens.observe(j.tokens)
        self.metrics.sequences_finished.labels(reason).inc()
        j.emit(Event(j.index, piece, reason, error))


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
