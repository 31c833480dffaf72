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
Batching (--batch-max-rows > 1, the default): the sessions' KV caches are rows of shared caches (split/cloud_cache.py)
and `layers` decode frames (one token per row) of different sessions queued together run as one forward over
their rows, `experts` frames of one layer as one expert call (split/cloud_batch.py); prefills run alone. Each reply
equals the unbatched one (within float rounding), goes to its own stream, and a failing or cancelled session
touches no other. Not with expert parallelism (ranks must replay each frame alone)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from moetandem.config import CloudBatchConfig
from moetandem.errors import CalibrationError, MoetandemError
from moetandem.experts.resident import ResidentProvider
from moetandem.split.cloud_batch import BatchRunner, Job
from moetandem.split.cloud_cache import CachePools, Lease
from moetandem.split.transport import SERVER_KEEPALIVE, SERVICE
from moetandem.split.transport.auth import authorized, server_credentials
from moetandem.split.transport.frame import (
    DEFAULT_LIMITS,
    Frame,
    FrameError,
    Limits,
    meta_int,
    tensor,
)
from moetandem.split.transport.server import DRAINING, RequestRefused, StreamStats, serve_stream
from moetandem.split.wire import (
    CODECS,
    decode_rows,
    encode_rows,
    make_codec,
    row_tokens,
    uses_tokens,
)

log = logging.getLogger("moetandem.split.cloud")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 4096


@dataclass
class _Step:
    """One `layers` exchange, ready to run: x [B, L, H] at pos [B, L] into the session rows `rows` [B]."""

    lease: Lease
    x: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor | None
    kv_len: int
    start: int
    end: int


@dataclass
class _Cache:
    lease: Lease  # rows of a (shared) KV cache
    start: int
    end: int
    codec_in: Any
    codec_out: Any


class _Session:
    """One stream's state: its KV caches (Session) or nothing (Experts)."""

    def __init__(self, server: CloudServer, kind: str) -> None:
        self.server, self.kind = server, kind
        self.hello = False
        self.caches: dict[int, _Cache] = {}
        self.key = server.mirror.new_key() if server.mirror is not None else 0

    def nbytes(self) -> int:
        return sum(c.lease.nbytes() for c in self.caches.values())

    def free(self, cid: int) -> None:
        c = self.caches.pop(cid, None)
        if c is not None:
            self.server.pools.release(c.lease)

    def free_all(self) -> None:
        for cid in list(self.caches):
            self.free(cid)

    def handle(self, f: Frame) -> Frame:
        if f.kind == "hello":
            return self.on_hello(f)
        if not self.hello:
            raise FrameError(f"{f.kind!r} before hello")
        handler = {"Session": {"alloc": self.on_alloc, "free": self.on_free, "layers": self.on_layers},
                   "Experts": {"experts": self.on_experts}}[self.kind].get(f.kind)
        if handler is None:
            raise FrameError(f"{f.kind!r} frames do not belong on the {self.kind} stream")
        srv = self.server
        # batched kinds run on the batch runner, which takes the compute lock itself
        lock = nullcontext() if srv.runner is not None and f.kind in ("layers", "experts") else srv.compute_lock
        with srv.in_compute() as ahead, torch.inference_mode(), lock:
            if srv.mirror is not None:  # expert parallel: the other ranks compute this frame too
                self.server.mirror.send(self.key, self.kind, f)
            reply = handler(f)
        if ahead:
            reply.meta["queue"] = ahead
        return reply

    def on_hello(self, f: Frame) -> Frame:
        srv = self.server
        if f.meta.get("fingerprint") != srv.fingerprint:
            raise FrameError(f"the end holds checkpoint {str(f.meta.get('fingerprint'))[:16]!r}, this cloud serves "
                             f"{srv.fingerprint!r}: point both at the same checkpoint")
        self.hello = True
        a = srv.engine.args
        meta = {"fingerprint": srv.fingerprint, "num_layers": a.num_layers, "hidden": a.hidden_size,
                "max_len": a.max_position_embeddings, "dtype": str(srv.engine.dtype).removeprefix("torch."),
                "replicas": srv.replicas, "queue": srv.queue_depth}
        if f.meta.get("costs") and srv.mirror is None:  # the end's scheduler asks for the cloud's measured step
            meta.update(srv.step_costs().as_meta())  # costs (split.costs; not with ranks that must meet in step)
        return Frame("reply", meta=meta)

    def on_alloc(self, f: Frame) -> Frame:
        a, srv = self.server.engine.args, self.server
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        rows = meta_int(f, "rows", 1, MAX_ROWS)
        max_len = meta_int(f, "max_len", 1, a.max_position_embeddings)
        start = meta_int(f, "start", 0, a.num_layers)
        end = meta_int(f, "end", start, a.num_layers)
        kind, rank = f.meta.get("codec", "off"), f.meta.get("rank")
        kind_out, rank_out = f.meta.get("codec_out", kind), f.meta.get("rank_out", rank)  # per crossing
        for k, r in ((kind, rank), (kind_out, rank_out)):
            if k not in CODECS or not (r is None or (isinstance(r, int) and 0 < r <= a.hidden_size)):
                raise FrameError(f"bad codec {str(k)[:20]!r} / rank {str(r)[:20]}")
        self.free(cid)
        layer_bytes = 2 * rows * max_len * a.num_kv_heads * a.head_dim * srv.engine.dtype.itemsize
        need = self.nbytes() + (end - start) * layer_bytes
        if need > srv.max_session_bytes:
            raise RequestRefused(f"a KV cache of {need} bytes exceeds this cloud's per-session limit of "
                                 f"{srv.max_session_bytes} bytes (--max-session-bytes)")
        try:
            codecs = [make_codec(k, srv.engine.store.ckpt, cut, r, a.hidden_size, srv.engine.dtype)
                      for k, r, cut in ((kind, rank, start), (kind_out, rank_out, end))]
        except (CalibrationError, MoetandemError) as e:
            raise RequestRefused(f"codec unavailable on the cloud: {e}") from None
        lease = srv.pools.lease(start, end, max_len, rows, owner=self)
        self.caches[cid] = _Cache(lease, start, end, *codecs)
        return Frame("reply", meta={"cache": cid, "kv_bytes": lease.nbytes()})

    def on_free(self, f: Frame) -> Frame:
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        self.free(cid)
        return Frame("reply", meta={"cache": cid})

    def on_layers(self, f: Frame) -> Frame:
        srv = self.server
        eng = srv.engine
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        c = self.caches.get(cid)
        if c is None:
            raise FrameError(f"cache {cid} was never allocated on this session")
        pos = tensor(f, "pos", (torch.int64,), 2)
        rows = tensor(f, "rows", (torch.int64,), 1)
        B, L = pos.shape
        valid = f.tensors.get("valid")
        if valid is not None and (valid.dtype != torch.bool or valid.shape != pos.shape):
            raise FrameError("valid must be bool of the shape of pos")
        if not 0 < B <= c.lease.batch or rows.shape[0] != B or L == 0:
            raise FrameError(f"batch of {B} rows does not fit the cache's {c.lease.batch}")
        if int(rows.min()) < 0 or int(rows.max()) >= c.lease.batch or rows.unique().numel() != B:
            raise FrameError("rows must be distinct cache rows")
        kv_len = meta_int(f, "kv_len", 1, c.lease.max_len)
        if int(pos.min()) < 0 or int(pos.max()) >= kv_len:
            raise FrameError(f"positions must lie in [0, kv_len={kv_len})")
        T = B * L if valid is None else int(valid.sum())
        if c.start == 0 and "ids" in f.tensors:  # token ids instead of hidden states: the cloud embeds
            tokens = row_tokens({"tok": f.tensors["ids"]}, T, eng.args.vocab_size)
            x_rows = eng.model.embed(tokens.to(eng.device))  # [T, H]
        else:
            x_rows = decode_rows(f.tensors, c.codec_in, T, eng.args.hidden_size, eng.dtype, eng.device)  # [T, H]
            tokens = row_tokens(f.tensors, T, eng.args.vocab_size)  # [T] or None (needed by side-info codecs)
        dev = eng.device
        pos, rows = pos.to(dev), rows.to(dev)
        valid = valid.to(dev) if valid is not None else None
        x = x_rows.view(B, L, -1) if valid is None else \
            torch.zeros(B, L, x_rows.shape[1], dtype=eng.dtype, device=dev).index_put_((valid,), x_rows)
        step = _Step(c.lease, x, pos, rows, valid, kv_len, c.start, c.end)
        decode = L == 1 and valid is None  # decode steps of sessions on one pool batch; prefills run alone
        with srv.pools.hold(c.lease):
            y = srv.compute(Job(c.lease.pool if decode else None, B, srv.run_layers, step,
                                srv.pools.peers(c.lease)))  # [B, L, H]
        y_rows = y.reshape(B * L, -1) if valid is None else y[valid]  # [T, H]
        if uses_tokens(c.codec_out) and tokens is None:
            raise FrameError("this codec needs the rows' token ids ('tok') with the hidden states")
        out = encode_rows(y_rows.cpu(), c.codec_out, tokens)
        out.pop("c_tokens", None)  # the end has its own token ids: not sent back
        return Frame("reply", tensors=out)

    def on_experts(self, f: Frame) -> Frame:
        eng = self.server.engine
        layer = meta_int(f, "layer", 0, eng.args.num_layers - 1)
        if layer not in eng.store.layers:
            raise FrameError(f"layer {layer} has no experts")
        x = tensor(f, "x", _FLOATS, 2)
        ids = tensor(f, "ids", (torch.int64,), 2)
        w = tensor(f, "w", _FLOATS, 2)
        T, k = ids.shape
        if x.shape != (T, eng.args.hidden_size) or w.shape != (T, k) or not 0 < k <= eng.args.num_experts:
            raise FrameError(f"experts: x {list(x.shape)}, ids {list(ids.shape)}, w {list(w.shape)} do not fit")
        if T and (int(ids.min()) < 0 or int(ids.max()) >= eng.args.num_experts):
            raise FrameError("expert ids out of range")
        if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(w).all()):
            raise FrameError("experts: NaN or Inf in x or w")
        dev, dt = eng.device, eng.dtype
        if not T:
            return Frame("reply", tensors={"y": x.clone()})
        args = (layer, x.to(dev, dt), ids.to(dev), w.to(dev, dt))
        y = self.server.compute(Job(("experts", layer, k), T, self.server.run_experts, args))  # [T, H]
        return Frame("reply", tensors={"y": y.to(x.dtype).cpu()})


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
        self.sessions: dict[str, set[_Session]] = {"Session": set(), "Experts": set()}
        self._server: grpc.Server | None = None
        self.draining = threading.Event()
        self._costs: Any = None
        self._costs_lock = threading.Lock()
        self._queued = 0  # exchanges waiting for or holding compute_lock now (the cloud's load)
        on = batching.enabled and mirror is None
        self.pools = CachePools(engine.args, engine.device, engine.dtype, shared=on)
        self.runner = BatchRunner(batching.window_ms / 1e3, batching.max_rows, lambda: self.compute_lock,
                                  torch.inference_mode) if on else None

    def compute(self, job: Job) -> Any:
        """Run one exchange's compute: on the batch runner (with others of its key), or here (the caller holds
        the compute lock)."""
        if self.runner is None:
            return job.run([job])[0]
        return self.runner.submit(job)

    def run_layers(self, jobs: list[Job]) -> list[torch.Tensor]:
        """The `layers` exchanges `jobs` (one pool; several: decode steps) as one forward -> each y [B, L, H]."""
        eng, steps = self.engine, [j.payload for j in jobs]
        s0 = steps[0]
        pool = s0.lease.pool
        with pool.lock:  # the pool's cache neither grows nor changes rows under the forward
            if len(steps) == 1:
                x, pos, valid, rows, kv_len = s0.x, s0.pos, s0.valid, s0.lease.slots[s0.rows], s0.kv_len
            else:  # one token per row: rows of different lengths share the mask of their own positions
                x = torch.cat([s.x for s in steps])  # [ΣB, 1, H]
                pos = torch.cat([s.pos for s in steps])  # [ΣB, 1]
                rows = torch.cat([s.lease.slots[s.rows] for s in steps])  # [ΣB] rows of the pool
                valid, kv_len = None, max(s.kv_len for s in steps)
            assert pool.cache is not None
            y = eng.model.forward_layers(x, pos, pool.cache, kv_len, s0.start, s0.end, eng.experts, valid, rows)
        return list(y.split([s.x.shape[0] for s in steps]))  # [B, L, H] each

    def run_experts(self, jobs: list[Job]) -> list[torch.Tensor]:
        """`experts` exchanges of one layer as one expert call -> each y [T, H]."""
        layer = jobs[0].payload[0]
        x, ids, w = (torch.cat([j.payload[i] for j in jobs]) for i in (1, 2, 3))  # [ΣT, H], [ΣT, k] x2
        y = self.engine.provider.compute(layer, x, ids, w)  # [ΣT, H]
        return list(y.split([j.rows for j in jobs]))

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
        """This cloud's per-layer fixed + per-token decode costs, measured once (at the first hello asking)."""
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
        """Bind and serve in background threads; returns the port."""
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
            session = _Session(self, kind)
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
