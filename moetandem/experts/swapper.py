"""Moving experts into slots in the background: pinned host copies (bounded cache), a copy stream and a worker
thread. The owner unpublishes a slot, then `submit`s a copy into it; the copy waits (CUDA event) for kernels
already queued on the compute stream, runs on the copy stream and records a `done` event; the owner `poll`s
between steps (`event.query()`, never blocking) and publishes what finished. On the CPU the worker copies
directly and a job is finished when the worker is done with it."""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from moetandem.experts.rows import ExpertRows
from moetandem.host_memory import host_memory

log = logging.getLogger("moetandem.experts")


def pinned_cap(total_bytes: int, mapped: bool = False) -> int:
    """Bytes of pinned host memory to use: MOETANDEM_PINNED_BYTES, else for a cache of copies a quarter of host RAM
    and at most half of what is available now, or for pinning every expert once (mapped: the checkpoint's page
    cache is then not needed any more, since every read comes from the pinned copy) three quarters of both. Pinned
    pages cannot be reclaimed: counting only RAM, a host whose /dev/shm held 90 of its 128 GiB pinned 36 GiB more
    and the process was killed."""
    env = os.environ.get("MOETANDEM_PINNED_BYTES")
    if env:
        return int(env)
    avail, ram = host_memory()
    if not ram:
        return total_bytes
    return min(total_bytes, ram * 3 // 4, avail * 3 // 4) if mapped else min(total_bytes, ram // 4, avail // 2)


class HostCopies:
    """Experts' rows (their format's bytes) in host memory; on CUDA, pinned copies are kept, least recently used
    first, bounded so host RAM holds the mmap'd checkpoint plus at most `cap` pinned bytes."""

    def __init__(self, rows: ExpertRows, pin: bool, cap: int, mapped: dict[int, torch.Tensor] | None = None) -> None:
        """mapped: every expert of each layer already in pinned host memory ([E, row] per layer): get() returns
        views of it and keeps no cache of its own."""
        self.rows, self.pin, self.cap, self.mapped = rows, pin, cap, mapped
        self._cache: collections.OrderedDict[tuple[int, int], torch.Tensor] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, layer: int, expert: int, pin: bool = True) -> torch.Tensor:
        """The expert's row on the host. pin=False (synchronous paths): the cached pinned copy if any, else a read,
        since pinning an expert met for the first time can cost more (~10 ms) than the copy it speeds up."""
        if self.mapped is not None:
            return self.mapped[layer][expert]
        if not self.pin:
            return self.rows.get(layer, expert)
        key = (layer, expert)
        with self._lock:
            t = self._cache.get(key)
            if t is not None:
                self._cache.move_to_end(key)
                return t
        t = self.rows.get(layer, expert)
        if not pin:
            return t
        t = t.pin_memory()
        with self._lock:
            if key not in self._cache:
                self._cache[key] = t
                self._bytes += t.numel() * t.element_size()
            while self._bytes > self.cap and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return t


@dataclass
class SwapJob:
    owner: Any  # whatever the submitter needs to recognise the job (e.g. the LayerSlots it belongs to)
    layer: int
    slot: int
    expert: int
    dst: torch.Tensor  # [row] view of the slot
    ready: torch.cuda.Event | None = None  # compute stream passed the unpublish
    done: torch.cuda.Event | None = None  # copy finished (CUDA); None on the CPU once the worker returns
    src: torch.Tensor | None = None  # kept alive until the copy finished
    error: Exception | None = None  # the copy raised: nothing to publish


def _worker(ref: "weakref.ref[Swapper]", jobs: queue.Queue) -> None:
    """The swapper thread: holds the swapper weakly between jobs and ends when it is freed."""
    while True:
        job = jobs.get()
        try:
            swapper = ref() if job is not None else None
            if swapper is None:
                return
            try:
                swapper._copy(job)
            except Exception as e:  # a failed copy must neither kill this thread nor leave wait() hanging
                swapper._failed(job, e)
            del swapper
        finally:
            jobs.task_done()


def _stop(jobs: queue.Queue, thread: threading.Thread) -> None:
    """End the worker and, unless this is the worker itself, wait for it: a daemon thread still inside a torch
    copy when the interpreter exits aborts the process."""
    jobs.put(None)
    if threading.current_thread() is not thread:
        thread.join(timeout=30)


class Swapper:
    def __init__(self, host: HostCopies, device: torch.device) -> None:
        self.host, self.device = host, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.Queue[SwapJob | None] = queue.Queue()
        self._copied: collections.deque[SwapJob] = collections.deque()  # copies issued, maybe not finished
        self.in_flight = 0  # submitted, not yet returned by poll()
        self._thread = threading.Thread(target=_worker, args=(weakref.ref(self), self._jobs),
                                        name="moetandem-swapper", daemon=True)
        self._thread.start()
        weakref.finalize(self, _stop, self._jobs, self._thread)

    def submit(self, job: SwapJob) -> None:
        """Queue a copy into an unpublished slot; it starts after the work already queued on this stream."""
        if self.stream is not None:
            job.ready = torch.cuda.Event()
            job.ready.record()
        self.in_flight += 1
        self._jobs.put(job)

    def _copy(self, job: SwapJob) -> None:
        src = self.host.get(job.layer, job.expert)
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(job.ready)
                job.dst.copy_(src, non_blocking=True)
                job.done = torch.cuda.Event()
                job.done.record(self.stream)
            job.src = src
        else:
            job.dst.copy_(src)
        self._copied.append(job)

    def _failed(self, job: SwapJob, err: Exception) -> None:
        """A copy raised (host read error, device out of memory, ...): hand the job back as finished with its
        error, so the owner leaves the slot unpublished (its expert is then read as a miss) and plans again."""
        log.warning("swapper: copying expert %d of layer %d failed: %s: %s", job.expert, job.layer,
                    type(err).__name__, err)
        job.error, job.done, job.src = err, None, None
        self._copied.append(job)

    def poll(self) -> list[SwapJob]:
        """Jobs whose copy has finished, oldest first; never blocks."""
        out = []
        while self._copied:
            job = self._copied[0]
            if job.done is not None and not job.done.query():
                break
            out.append(self._copied.popleft())
            job.src = None
        self.in_flight -= len(out)
        return out

    def wait(self) -> None:
        """Block until every submitted copy finished (budget changes, reproducible runs, tests); poll() then
        returns them all."""
        self._jobs.join()
        for job in list(self._copied):
            if job.done is not None:
                job.done.synchronize()
