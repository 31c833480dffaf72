"""--miss-compute host (experimental, off by default): a committee's exact misses computed on the CPU, from the pinned
host copies the zero-copy path reads over the bus, in parallel with the GPU's hits, with no host sync in the step.

Why: a miss read zero-copy moves the whole expert over the host bus (~25 GB/s on an H200's PCIe 5 x16); the CPU
reads the same bytes from its own DRAM (~100 GB/s on a server socket), as llama.cpp's --n-cpu-moe and KTransformers
do. The handoff (kernels/handoff.py) keeps the step one CUDA graph: per layer, publish -> the fused kernel over the
hits -> collect, while a daemon thread here polls the layers' request flags, computes each missed expert once on all
its rows (misses.expert_ffn, the model's activation), writes the answers and then the response flag.

Steps of at most MAX_T tokens (decode) use it; longer ones (prefill) keep the zero-copy reads. A step whose answer
does not come within the spin bound adds nothing for its misses and sets an error flag; `check()` (after each step,
a read of pinned memory, no sync) then turns the handoff off on the device, so captured graphs too read the misses
zero-copy from then on (logged once).

Threads: the worker sets its own intra-op thread count, MOETANDEM_HOST_MISS_THREADS, default every CPU this
process may use but one (the main thread spins while it waits for the GPU). OpenMP's count is per thread, but
torch.set_num_threads also sets the count threads started later begin with, so start() puts the caller's back.
The CPU side is worth it only where the host's memory bandwidth beats the bus and torch's CPU kernels for the
compute dtype are fast (bf16 GEMV wants AVX512-BF16 / AMX); on a desktop it may well lose."""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from moetandem.config import MISS_COMPUTE
from moetandem.errors import InvalidRequestError
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.misses import expert_ffn
from moetandem.kernels.handoff import MAX_POLLS, REQ, RESP, TOKENS, Channel, host_collect, host_publish, new_channel
from moetandem.experts.stats import CommitteeStats
from moetandem.models.expert_activation import ExpertActivation

log = logging.getLogger("moetandem.experts")

#: the longest step (tokens) handed to the host: decode batches; longer steps read their misses zero-copy
MAX_T = 16
#: polls of an idle worker between yields before it backs off to sleeps of 0.1 ms, and after as many again to 1 ms
#: (a decode step keeps it hot; an idle server costs little)
_HOT_POLLS = 20000


def worker_threads() -> int:
    """The worker's intra-op threads: MOETANDEM_HOST_MISS_THREADS, else the CPUs this process may use but one."""
    env = os.environ.get("MOETANDEM_HOST_MISS_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise InvalidRequestError(f"MOETANDEM_HOST_MISS_THREADS={env!r}: set it to a number of threads >= 1, "
                                      "or unset it (default: every CPU this process may use but one)")
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cpus - 1)


@dataclass
class _Worker:
    """What the worker thread needs (it holds this, never the HostMisses, so a dropped committee stops it)."""

    channels: list[Channel]
    layers: list[int]
    rows: dict[int, torch.Tensor]  # layer -> [E, row] host copies in `fmt` (the mapped experts)
    fmt: ExpertFormat
    act: ExpertActivation
    flags: torch.Tensor  # [L, 16] int64, every channel's flags
    threads: int
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)  # its thread count is set
    computes: int = 0  # assignments computed
    bytes: int = 0  # expert rows read (one per missed expert and step)

    def serve(self, i: int) -> None:
        """Answer channel i's request: every missed expert once on its rows, then the response flag."""
        ch, view = self.channels[i], self.flags[i].numpy()
        epoch, T = int(view[REQ]), int(view[TOKENS])
        try:
            miss = ch.miss[:T].long()  # [T, k]
            x = ch.x[:T]
            rows = self.rows[self.layers[i]]
            for e in torch.unique(miss[miss >= 0]).tolist():
                tok, col = torch.nonzero(miss == e, as_tuple=True)
                ch.resp[tok, col] = expert_ffn(self.fmt, self.act, rows[e], x[tok]).to(ch.resp.dtype)
                self.computes += tok.numel()
                self.bytes += self.fmt.nbytes
        except Exception as err:  # answer at once (nothing for the misses) and flag it, rather than time out
            log.warning("host misses: layer %d failed: %s: %s", self.layers[i], type(err).__name__, err)
            ch.resp[:T].zero_()
            ch.err[0] = 1
        view[RESP] = epoch  # last (x86 keeps stores in order): the GPU reads resp after it sees this


def _serve(w: _Worker) -> None:
    """The worker thread: busy-poll every layer's request flag (yielding the GIL), back off while idle."""
    torch.get_num_threads()  # torch's per-thread lazy init first: it would reset the count set below
    torch.set_num_threads(w.threads)  # this thread's (OpenMP's is per thread); start() restores the process default
    w.ready.set()
    flags = w.flags.numpy()
    idle = 0
    while not w.stop.is_set():
        pending = (flags[:, REQ] != flags[:, RESP]).nonzero()[0]
        if len(pending) == 0:
            idle += 1
            time.sleep(0 if idle < _HOT_POLLS else 1e-4 if idle < 2 * _HOT_POLLS else 1e-3)
            continue
        idle = 0
        for i in pending.tolist():
            w.serve(i)


def _stop(w: _Worker, thread: threading.Thread) -> None:
    w.stop.set()
    if threading.current_thread() is not thread:
        thread.join(timeout=30)


class HostMisses:
    def __init__(self, layers: list[int], top_k: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 rows: dict[int, torch.Tensor], fmt: ExpertFormat, act: ExpertActivation, max_t: int = MAX_T,
                 max_polls: int = MAX_POLLS, threads: int | None = None) -> None:
        """Channels for `layers` (steps of at most max_t tokens, top_k experts each, x [T, hidden] in dtype), read
        by the fused kernel's device and computed from `rows` (layer -> [E, row] pinned host copies in `fmt`)."""
        pin = device.type == "cuda"
        self.max_t, self.device = max_t, device
        self.err = torch.zeros(1, dtype=torch.int32, pin_memory=pin)  # set by a timed-out collect
        self.off = torch.zeros(1, dtype=torch.int32, device=device)  # 1: misses read zero-copy (in graphs too)
        flags = torch.zeros(len(layers), 16, dtype=torch.int64, pin_memory=pin)
        self.index = {l: i for i, l in enumerate(layers)}
        channels = [new_channel(max_t, top_k, hidden, dtype, device, self.err, self.off, pin, max_polls, flags[i])
                    for i in range(len(layers))]
        self._w = _Worker(channels, list(layers), rows, fmt, act, flags, threads or worker_threads())
        self._thread: threading.Thread | None = None
        self.fallen_back = False
        self.start()

    def start(self) -> None:
        """Start the worker (again, after close()); a no-op while it runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._w.stop, self._w.ready = threading.Event(), threading.Event()
        own = torch.get_num_threads()
        self._thread = threading.Thread(target=_serve, args=(self._w,), name="moetandem-host-misses", daemon=True)
        self._thread.start()
        # torch.set_num_threads also sets the count every thread started later begins with: put this thread's back
        self._w.ready.wait(timeout=30)
        torch.set_num_threads(own)
        self._finalizer = weakref.finalize(self, _stop, self._w, self._thread)

    def close(self) -> None:
        """Stop the worker (idempotent); a step that still hands misses over then times out and falls back."""
        if self._thread is not None:
            self._finalizer()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def takes(self, x: torch.Tensor) -> bool:
        """This step hands its misses to the host: at most max_t tokens (decode), and no fallback yet."""
        return x.shape[0] <= self.max_t and not self.fallen_back

    def publish(self, layer: int, x: torch.Tensor, miss: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
        """Hand layer's misses (miss [T, k]: expert id, -1 elsewhere) to the worker -> the slot ids the device
        computes [T, k] (the misses -1; slot n + e once fallen back on the device)."""
        ch = self._w.channels[self.index[layer]]
        return host_publish(x, miss.to(torch.int32), slots, ch.epoch, ch.key, n)

    def collect(self, layer: int, out: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
        """out [T, H] (the hits) + Σ_k weights·(the worker's answers) over miss >= 0, once they are in."""
        ch = self._w.channels[self.index[layer]]
        return host_collect(out, weights, miss.to(torch.int32), ch.epoch, ch.key)

    def check(self) -> bool:
        """Between steps: True once a step timed out (read from pinned memory, no sync); then, once, turn the
        handoff off on the device and warn."""
        if not self.fallen_back and int(self.err.numpy()[0]):
            self.fallen_back = True
            self.off.fill_(1)
            log.warning("host misses: the host worker did not answer a step in time (or failed); that step's misses "
                        "were left out, and misses are read zero-copy over the bus from now on")
        return self.fallen_back

    def add_stats(self, s: CommitteeStats, row_bytes: int) -> None:
        """Count the worker's work into a committee's stats: its assignments as host computes, and its reads (each
        missed expert once per step) instead of the zero-copy reads (row_bytes per assignment) they replaced."""
        s.host_computes += self.computes
        s.miss_bytes += self.bytes_read - self.computes * row_bytes

    @property
    def computes(self) -> int:
        """Assignments the worker computed so far."""
        return self._w.computes

    @property
    def bytes_read(self) -> int:
        """Bytes of expert rows the worker read (each missed expert once per step)."""
        return self._w.bytes


def host_misses_for(miss_compute: str, mapped: dict[int, torch.Tensor] | None, top_k: int, hidden: int,
                    dtype: torch.dtype, device: torch.device, fmt: ExpertFormat,
                    act: ExpertActivation) -> HostMisses | None:
    """A committee's HostMisses for --miss-compute (gpu: None), over its mapped experts (layer -> [E, row] in fmt);
    None, with a warning, where nothing is mapped (the zero-copy path, which the handoff replaces, is not used)."""
    if miss_compute not in MISS_COMPUTE:
        raise InvalidRequestError(f"--miss-compute {miss_compute!r}: choose {' or '.join(MISS_COMPUTE)}")
    if miss_compute == "gpu":
        return None
    if mapped is None:
        log.warning("--miss-compute host: not used here (it needs a CUDA device with the fused kernel, every expert "
                    "pinned, and a policy whose exact misses may be computed anywhere); misses as before")
        return None
    return HostMisses(list(mapped), top_k, hidden, dtype, device, mapped, fmt, act)
