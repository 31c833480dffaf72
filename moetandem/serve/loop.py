"""The engine thread: ties the scheduler (who runs, when a sequence ends) to the runner (one step on the engine).

One thread owns the runner, whose Batcher is not thread-safe. Each turn: run queued calls (e.g. a live budget
change), let the scheduler apply cancellations and admit waiting sequences into free slots, prefill those, run one
decode step, and give the scheduler the new tokens. HTTP handlers talk to the scheduler (submit, cancel) and read
events from their asyncio queues."""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable

from moetandem.batcher import Batcher
from moetandem.serve.metrics import ServerMetrics
from moetandem.serve.runner import Runner
from moetandem.serve.scheduler import (SHUTDOWN, Draining, EngineDead, NeverFits, QueueFull, Scheduler)
from moetandem.serve.sequence import Event, Job

__all__ = ["Draining", "EngineDead", "EngineLoop", "Event", "Job", "NeverFits", "QueueFull"]
log = logging.getLogger("moetandem.serve")


class EngineLoop:
    #: this many engine exceptions in a row (no successful step between) and the loop reports itself broken
    MAX_CONSECUTIVE_ERRORS = 5

    def __init__(self, engine: Any, max_batch: int = 8, max_waiting: int = 64, max_len: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        ctx = int(engine.args.max_position_embeddings)
        self.max_len = min(ctx, max_len) if max_len else ctx
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.runner = Runner(engine, max_batch, self.max_len)
        self.metrics = metrics or ServerMetrics()
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers must not be used from two threads at once
        self.scheduler = Scheduler(max_batch, max_waiting, self.metrics, self.runner.release, self.tokenizer_lock)
        self.metrics.bind_gauges(lambda: len(self.running), lambda: len(self.waiting), max_batch)
        if hasattr(engine, "expert_stats"):
            self.metrics.bind_expert_stats(engine.expert_stats)
        if getattr(engine, "split", None) is not None:  # split execution (moetandem/split/end.py)
            self.metrics.bind_split_stats(engine.split.split_stats)
        self._cv = self.scheduler.cv  # one condition: a submit, cancel, call or stop wakes the thread
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._stopping = False
        self.error: str | None = None
        self.consecutive_errors = 0
        self.last_engine_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="moetandem-engine", daemon=True)

    @property
    def batcher(self) -> Batcher:
        return self.runner.batcher

    @property
    def running(self) -> dict[Job, None]:
        return self.scheduler.running

    @property
    def waiting(self) -> "Iterable[Job]":
        return self.scheduler.waiting

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

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
        """Queue sequences (all or none). Raises NeverFits / QueueFull / Draining / EngineDead."""
        if not self.alive or self._stopping:
            raise EngineDead(self.error or "the engine is not running")
        self.scheduler.submit(jobs)

    def cancel(self, jobs: Iterable[Job]) -> None:
        """Drop sequences (client gone): freed before the next step. Finished ones are ignored."""
        self.scheduler.cancel(jobs)

    def call(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Run fn on the engine thread between two decode steps (e.g. a live expert-budget change)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if not self.alive or self._stopping:
                raise EngineDead(self.error or "the engine is not running")
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def drain(self, timeout: float, poll: float = 0.02) -> bool:
        """Stop admitting (new requests get 503), let queued and running sequences finish for up to `timeout`
        seconds, then end the rest with a shutdown error (a stream gets an error event and [DONE]). Blocks;
        True when everything finished by itself."""
        self.scheduler.close()
        deadline = time.monotonic() + timeout
        while not self.idle() and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(poll)
        if self.idle():
            return True
        self.scheduler.abort(f"{SHUTDOWN}: this request did not finish within the {timeout:g} s drain timeout")
        end = time.monotonic() + 5.0  # the abort waits for the current step to end
        while not self.idle() and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(poll)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def idle(self) -> bool:
        """No sequence queued, running, or holding a batcher slot."""
        return self.scheduler.empty() and not self.runner.active

    # ---------------------------------------------------------------- the engine thread
    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._calls or self.scheduler.has_work()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # reported to the caller, the loop goes on
                        fut.set_exception(e)
                admit = self.scheduler.schedule(self.runner.free_slots())
                if admit:
                    self._prefill(admit)
                if self.scheduler.running:
                    self._step()
        except BaseException as e:  # the thread must never die silently
            log.exception("engine thread crashed")
            self.error = f"engine thread crashed: {type(e).__name__}: {e}"
        finally:
            self.scheduler.finish_all(self.error or SHUTDOWN,
                                      "engine_error" if self.error else "server_shutting_down")

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            events = self.runner.prefill([j.req for j in jobs])
        except Exception as e:  # fail these sequences, keep serving the others
            self._fail(jobs, e)
            return
        self.scheduler.on_tokens(events, jobs)

    def _step(self) -> None:
        jobs = list(self.scheduler.running)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.steps.inc()
        try:
            events = self.runner.step()
        except Exception as e:
            self._fail(jobs, e)
            return
        self.consecutive_errors = 0  # only a decode step clears the count (prefills may work while steps fail)
        self.scheduler.on_tokens(events, jobs)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        log.exception("engine error; failing %d sequence(s)", len(jobs))
        self.metrics.engine_errors.inc()
        self.consecutive_errors += 1
        self.last_engine_error = f"{type(err).__name__}: {err}"
        self.scheduler.fail(jobs, f"internal engine error: {type(err).__name__}: {err}")
