"""Cross-end batching on the cloud: one thread runs every exchange that can be batched, and exchanges of one key
(decode steps on one shared KV cache, expert computations of one layer) that are queued together run as one call.

A job joins the queue from its stream's thread (split/cloud.py) and that thread waits for its result. The runner
takes the oldest job and every queued job of its key, up to `max_rows` rows. Jobs that queued while a batch ran
go together; the batch may wait up to `window_s` (after the first job's arrival, or after the runner became
free if that is later) for more of its key, but no longer than it takes for all `peers` jobs of the key that
can come (one per session sharing the cache and recently active) to be queued: ends that run in step then
meet in one batch and none waits, and two groups of ends out of step merge once their turnaround fits the
window. A job without a key runs alone (a prefill). When a batch fails, each of its jobs runs again alone, so the error reaches
only the stream whose exchange causes it (a decode step rewrites the same K/V at the same positions: running it
twice is harmless)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ContextManager

log = logging.getLogger("moetandem.split.cloud")


@dataclass(eq=False)
class Job:
    """One exchange's compute. `run(jobs)` computes `jobs` (this one and others of its key) in one call and
    returns their results in order."""

    key: Hashable | None  # None: runs alone
    rows: int  # rows this job adds to a batch (cache rows of a decode step, tokens of an expert call)
    run: Callable[[list["Job"]], list[Any]]
    payload: Any
    peers: int = 1  # this many jobs of the key can come (one per active session): no window wait beyond that
    arrived: float = field(default_factory=time.monotonic)
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class BatchRunner:
    """The thread that runs batched jobs, under `lock()` (the cloud's compute lock, read at each batch)."""

    def __init__(self, window_s: float, max_rows: int, lock: Callable[[], ContextManager[Any]],
                 context: Callable[[], ContextManager[Any]]) -> None:
        """context: entered around each batch as well (torch.inference_mode)."""
        self.window_s, self.max_rows, self._lock, self._context = window_s, max_rows, lock, context
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self._stopped = False
        self.stats = {"forwards": 0, "batched_forwards": 0, "exchanges": 0, "rows": 0, "max_exchanges": 0}
        self._thread: threading.Thread | None = None  # started by the first job
        self._free_since = 0.0  # when the last batch finished

    def submit(self, job: Job) -> Any:
        """Queue the job, wait for it, return its result (or raise its error)."""
        with self._cv:
            if self._stopped:
                raise RuntimeError("the cloud's batch runner has stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="moetandem-cloud-batch", daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        """Fail what is queued and end the thread (after the batch it is running)."""
        with self._cv:
            self._stopped = True
            left, self._queue = self._queue, []
            self._cv.notify()
        for job in left:
            job.error = RuntimeError("the cloud stopped")
            job.done.set()

    def queued(self) -> int:
        """Jobs waiting for a batch now (not those running)."""
        with self._cv:
            return len(self._queue)

    def snapshot(self) -> dict[str, float]:
        """forwards (calls run), batched_forwards (of more than one exchange), exchanges, rows, max_exchanges
        (the most in one call) and their mean per call."""
        with self._cv:
            s: dict[str, float] = dict(self.stats)
        s["exchanges_per_forward"] = s["exchanges"] / s["forwards"] if s["forwards"] else 0.0
        return s

    def _take(self) -> list[Job] | None:
        """The next batch (removed from the queue), None once stopped. Called with the condition held."""
        while not self._queue:
            if self._stopped:
                return None
            self._cv.wait()
        first = self._queue[0]
        if first.key is None:
            return [self._queue.pop(0)]
        deadline = max(first.arrived, self._free_since) + self.window_s
        while True:
            group, rows = [], 0
            for j in self._queue:
                if j.key == first.key and (not group or rows + j.rows <= self.max_rows):
                    group.append(j)
                    rows += j.rows
            wait = deadline - time.monotonic()
            if wait <= 0 or rows >= self.max_rows or len(group) >= first.peers:
                break
            self._cv.wait(wait)
            if self._stopped:  # stop() has answered every queued job
                return None
        taken = set(map(id, group))
        self._queue = [j for j in self._queue if id(j) not in taken]
        return group

    def _loop(self) -> None:
        while True:
            with self._cv:
                group = self._take()
            if group is None:
                return
            try:
                self._run(group)
                with self._cv:
                    st = self.stats
                    st["forwards"] += 1
                    st["batched_forwards"] += len(group) > 1
                    st["exchanges"] += len(group)
                    st["rows"] += sum(j.rows for j in group)
                    st["max_exchanges"] = max(st["max_exchanges"], len(group))
            finally:  # every waiting stream gets an answer, whatever happened
                self._free_since = time.monotonic()
                for j in group:
                    if j.result is None and j.error is None:
                        j.error = RuntimeError("the cloud's batch runner failed")
                    j.done.set()

    def _run(self, group: list[Job]) -> None:
        try:
            with self._lock(), self._context():
                results = group[0].run(group)
            for j, r in zip(group, results):
                j.result = r
            return
        except Exception as e:  # noqa: BLE001 (reported to the job's own stream below)
            if len(group) == 1:
                group[0].error = e
                return
            log.warning("a batch of %d exchanges failed (%s: %s): running each alone", len(group),
                        type(e).__name__, e)
        for j in group:
            self._run([j])
