"""The cloud server of split execution (`moetandem cloud`): one loaded checkpoint serving many end devices.

Two gRPC bidirectional streams (transport/__init__.py names them):
  Session  stateful: `alloc` a KV cache for a layer range [start, end) with `rows` × `max_len` slots, then
           `layers` frames (hidden states of a micro-batch at a cut) run those layers and return the hidden
           states at `end`; the KV cache lives until `free`, the end of the stream or idle expiry.
  Experts  stateless: `experts` frames (layer, rows x [T, H], expert ids/weights [T, k]) return Σ w·E(x).
Every stream starts with `hello` (checkpoint fingerprint must match). Bounded: --max-sessions streams of
each kind, --max-session-bytes of KV per session. drain() (SIGTERM) refuses new streams with UNAVAILABLE (an outage
to the end: it computes alone and probes), lets each open stream finish the frame it is computing, then ends it.
Load, for the ends' schedulers (split/monitor.py): `hello` replies carry `replicas` (this cloud's replica count:
1, or N under `--replicas N`) and `queue`; a compute reply carries `queue` = the exchanges of other streams
waiting for or holding the compute lock when its frame arrived (left out when 0: an old end ignores it, and an
end reads a missing one as 0).
Batching (--batch-max-rows > 1, the default): the sessions' KV caches are rows of shared caches
(split/cloud_cache.py), and `layers` decode frames (one token per row) of different sessions queued together run
as one forward over their rows, `experts` frames of one layer as one expert call (split/cloud_batch.py);
prefills run alone. Each reply equals the unbatched one (within float rounding) and goes to its own stream; a
failing or cancelled session touches no other. Not with expert parallelism (ranks replay each frame alone).
The stream handlers live in split/cloud_session.py."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager, nullcontext
from typing import Any

import grpc
import torch

from moetandem.config import CloudBatchConfig
from moetandem.errors import MoetandemError
from moetandem.experts.resident import ResidentProvider
from moetandem.split.cloud_batch import BatchRunner, Job
from moetandem.split.cloud_cache import CachePools
from moetandem.split.cloud_session import CloudSession
from moetandem.split.transport import SERVER_KEEPALIVE, SERVICE
from moetandem.split.transport.auth import authorized, server_credentials
from moetandem.split.transport.frame import DEFAULT_LIMITS, Limits
from moetandem.split.transport.server import DRAINING, StreamStats, serve_stream

log = logging.getLogger("moetandem.split.cloud")


@contextmanager
def _computing_on(device: torch.device) -> Iterator[None]:
    """The batch runner's thread computes in inference mode, with the engine's GPU as its current device."""
    with torch.inference_mode(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        yield


class CloudServer:
    """`CloudServer(engine, token).start("0.0.0.0:50051")` serves split streams until stop()."""

    def __init__(self, engine: Any, token: str, max_sessions: int = 16, idle_timeout_s: float = 300.0,
                 max_session_bytes: int = 2**30, delay_s: float = 0.0, limits: Limits = DEFAULT_LIMITS,
                 mirror: Any = None, replicas: int = 1, batching: CloudBatchConfig = CloudBatchConfig()) -> None:
        """mirror: split.parallel.Mirror when the engine's experts are sharded over ranks (rank 0 only).
        replicas: the replica count reported to ends in hello (N when this cloud is one of `--replicas N`).
        batching: exchanges of different ends run as one forward (off with a mirror)."""
        self.engine, self.token, self.limits, self.mirror = engine, token, limits, mirror
        self.max_sessions, self.idle_timeout_s, self.max_session_bytes = max_sessions, idle_timeout_s, max_session_bytes
        self.delay_s, self.replicas = delay_s, replicas
        self.fingerprint = engine.store.ckpt.fingerprint()
        self.stats = StreamStats()
        # all-resident experts are read-only and thread-safe; a committee is not: serialise compute then
        # (and expert-parallel ranks must meet in their collectives in one order)
        self.compute_lock: Any = nullcontext() if isinstance(engine.provider, ResidentProvider) and mirror is None \
            else threading.Lock()
        self._lock = threading.Lock()
        self.sessions: dict[str, set[CloudSession]] = {"Session": set(), "Experts": set()}
        self._server: grpc.Server | None = None
        self.draining = threading.Event()
        self._costs: Any = None
        self._costs_lock = threading.Lock()
        self._queued = 0  # exchanges waiting for or holding compute_lock (or in a batch) now: the cloud's load
        on = batching.enabled and mirror is None
        self.pools = CachePools(engine.args, engine.device, engine.dtype, shared=on)
        self.runner = BatchRunner(batching.window_ms / 1e3, batching.max_rows, lambda: self.compute_lock,
                                  lambda: _computing_on(engine.device)) if on else None

    def compute(self, job: Job) -> Any:
        """Run one exchange's compute: on the batch runner (with others of its key), or here (the caller holds
        the compute lock)."""
        if self.runner is None:
            return job.run([job])[0]
        return self.runner.submit(job)

    def batch_stats(self) -> dict[str, float]:
        """The batch runner's counters (split/cloud_batch.py: forwards, batched_forwards, exchanges, rows,
        max_exchanges, exchanges_per_forward), and the KV rows leased now; empty with batching off."""
        if self.runner is None:
            return {}
        return {**self.runner.snapshot(), "rows_leased": self.pools.rows_in_use()}

    @contextmanager
    def in_compute(self) -> Iterator[int]:
        """Count one exchange as queued for compute while the block runs; yields how many were before it."""
        with self._lock:
            ahead = self._queued
            self._queued += 1
        try:
            yield ahead
        finally:
            with self._lock:
                self._queued -= 1

    @property
    def queue_depth(self) -> int:
        """Exchanges waiting for or holding the compute lock now."""
        with self._lock:
            return self._queued

    def step_costs(self) -> Any:
        """This cloud's per-layer fixed + per-token decode costs, measured once (at start() on a GPU, else at the
        first hello asking)."""
        from moetandem.split.costs import measure_step_costs
        with self.compute_lock, self._costs_lock, torch.inference_mode():
            if self._costs is None:
                eng = self.engine
                self._costs = measure_step_costs(eng.model, eng.experts, eng.device, eng.dtype)
            return self._costs

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self.sessions["Session"])

    def start(self, listen: str = "127.0.0.1:0", tls_cert: Any = None, tls_key: Any = None) -> int:
        """Bind and serve in background threads; returns the port. On a GPU the step costs are measured first
        (split.costs), which also compiles and tunes the kernels: an end asking for them in hello then waits
        milliseconds, not the first use's seconds of compilation, and the first exchange runs warm."""
        if self.mirror is None and self.engine.device.type == "cuda":
            self.step_costs()
        opts = [("grpc.max_receive_message_length", self.limits.max_message_bytes),
                ("grpc.max_send_message_length", self.limits.max_message_bytes), *SERVER_KEEPALIVE]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * self.max_sessions + 8,
                                                        thread_name_prefix="moetandem-cloud"), options=opts)
        handlers = {name: grpc.stream_stream_rpc_method_handler(self._stream(name)) for name in self.sessions}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        creds = server_credentials(tls_cert, tls_key)
        try:
            port = server.add_secure_port(listen, creds) if creds else server.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if not port:
            raise MoetandemError(f"cannot listen on {listen} (address in use or invalid; use HOST:PORT)")
        server.start()
        self._server = server
        log.info("moetandem cloud: serving %s on port %d (%s)", self.fingerprint, port, "TLS" if creds else "plain")
        return port

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.runner is not None:
            self.runner.stop()

    def drain(self, timeout_s: float = 30.0, grace_s: float = 1.0) -> bool:
        """Graceful shutdown: refuse new streams, let open streams finish the frames they are computing (each then
        ends with a fatal "draining" error frame), wait up to timeout_s for every stream to close, then stop the
        server (cutting what is left after grace_s). True when every stream closed in time."""
        self.draining.set()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            open_now = sum(len(s) for s in self.sessions.values())
        log.info("moetandem cloud: draining %d stream(s) for up to %g s", open_now, timeout_s)
        while True:
            with self._lock:
                left = sum(len(s) for s in self.sessions.values())
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if left:
            log.warning("moetandem cloud: %d stream(s) still open at the %g s drain timeout: cut", left, timeout_s)
        self.stop(grace=grace_s)
        return not left

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def _stream(self, kind: str) -> Any:
        def handler(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            if not authorized(context.invocation_metadata(), self.token):
                self.stats.add(unauthenticated=1)
                log.warning("refused a %s stream from %s: missing or wrong token", kind, context.peer())
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            if self.draining.is_set():  # UNAVAILABLE: an outage to the end, which computes alone and probes
                context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            session = CloudSession(self, kind)
            with self._lock:
                full = len(self.sessions[kind]) >= self.max_sessions
                if not full:
                    self.sessions[kind].add(session)
            if full:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this cloud already serves {self.max_sessions} {kind} streams (--max-sessions)")

            def close() -> None:
                session.free_all()  # the session's KV cache is freed now (once its exchange in compute is done)
                if self.mirror is not None and session.hello:
                    with self.compute_lock:
                        self.mirror.close(session.key)
                with self._lock:
                    self.sessions[kind].discard(session)

            yield from serve_stream(requests, context, session.handle, close, self.stats, self.limits,
                                    self.idle_timeout_s, self.delay_s, self.draining)
        return handler
