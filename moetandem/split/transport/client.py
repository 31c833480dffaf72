"""The end's side of one gRPC bidirectional stream: `submit(frame)` returns a Future of the reply; replies
come back in order, so several requests (pipelined micro-batches) are in flight at once."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable
from typing import Any

import grpc

from moetandem.errors import CloudError
from moetandem.split.monitor import LinkMonitor
from moetandem.split.shaper import LinkShaper
from moetandem.split.transport.frame import (
    DEFAULT_LIMITS,
    Frame,
    FrameError,
    Limits,
    pack,
    unpack,
)

log = logging.getLogger("moetandem.split")
_CLOSE = object()


class StreamClient:
    """One stream on `channel`. `delay_s` is an emulated one-way delay: each frame leaves `delay_s` after it was
    submitted (frames submitted together still travel together, as on a real link); `shaper` (split.shaper) emulates
rate, RTT, jitter and loss instead. A reply is awaited for
    `deadline(bytes sent)` seconds when given (derived from the measured link), else `timeout_s`."""

    def __init__(self, channel: grpc.Channel, method: str, metadata: list[tuple[str, str]], timeout_s: float,
                 monitor: LinkMonitor | None = None, delay_s: float = 0.0, limits: Limits = DEFAULT_LIMITS,
                 deadline: Callable[[int], float] | None = None, shaper: LinkShaper | None = None,
                 down_shaper: LinkShaper | None = None) -> None:
        self.timeout_s, self.monitor, self.delay_s, self.limits = timeout_s, monitor, delay_s, limits
        self.shaper = shaper  # emulated link (rate, RTT, jitter, loss) for what this end sends; replaces delay_s
        self.down_shaper = down_shaper  # the reply direction, applied here when the cloud does not shape it
        self.deadline = deadline
        self.detail: str = ""  # gRPC status details when the stream failed
        self._out: queue.Queue[Any] = queue.Queue()
        self._pending: deque[tuple[int, Future, float, int, bool]] = deque()
        self._lock = threading.Lock()
        self._next_id = 1
        self.max_in_flight = 0  # most requests awaiting replies at once (pipelining)
        self.error: CloudError | None = None
        self.status: str | None = None  # gRPC status name when the stream failed (UNAUTHENTICATED, ...)
        stub = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._call = stub(self._requests(), metadata=metadata)
        self._inbox: queue.Queue[Any] = queue.Queue()  # (due, reply bytes | CloudError) with a down_shaper
        if down_shaper is not None:
            threading.Thread(target=self._delayed, name="moetandem-split-delivery", daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="moetandem-split-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def in_flight(self) -> int:
        """Requests awaiting their replies now."""
        with self._lock:
            return len(self._pending)

    def submit(self, frame: Frame, sample: bool = True) -> Future[Frame]:
        """sample=False: the exchange is not a link sample for the monitor (a load probe: a tiny frame)."""
        fut: Future[Frame] = Future()
        with self._lock:
            if self.error is not None:
                fut.set_exception(self.error)
                return fut
            frame.id = self._next_id
            self._next_id += 1
            data = pack(frame)
            fut.sent_bytes = len(data)  # type: ignore[attr-defined]  # for the deadline of its reply
            self._pending.append((frame.id, fut, time.perf_counter(), len(data), sample and not self._pending))
            due = self.shaper.due(len(data)) if self.shaper else time.monotonic() + self.delay_s
            self._out.put((due, data))
            self.max_in_flight = max(self.max_in_flight, len(self._pending))
        return fut

    def request(self, frame: Frame) -> Frame:
        """submit + wait (bounded by the timeout)."""
        return self.wait(self.submit(frame))

    def wait(self, fut: Future[Frame], timeout_s: float | None = None) -> Frame:
        """The reply, or CloudError (the stream is then closed) after timeout_s (default: the deadline for this
        frame's size, or the stream's timeout)."""
        if timeout_s is None:
            timeout_s = self.deadline(getattr(fut, "sent_bytes", 0)) if self.deadline else self.timeout_s
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            self._fail(CloudError(f"the cloud did not answer within {timeout_s:.3g} s"))
            raise self.error from None  # type: ignore[misc]

    def close(self) -> None:
        self._out.put(_CLOSE)
        self._fail(CloudError("stream closed"), cancel=False)

    def _requests(self) -> Any:
        while True:
            item = self._out.get()
            if item is _CLOSE:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            yield data

    def _read(self) -> None:
        """Replies as they arrive. With a down_shaper each gets its due time on arrival and a delivery thread
        hands it over then, in order: a reply queued behind a delayed one is not delayed again (pipelined
        micro-batches pay the emulated RTT once, as on a real link)."""
        err: CloudError
        try:
            for data in self._call:
                if self.down_shaper is None:
                    self._deliver(data)
                else:
                    self._inbox.put((self.down_shaper.due(len(data)), data))
            err = CloudError("the cloud ended the stream")
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            self.status = getattr(code, "name", None)
            detail = e.details() if hasattr(e, "details") else str(e)
            self.detail = str(detail)
            err = CloudError(f"link to the cloud lost ({getattr(code, 'name', code)}: {detail})")
        except (FrameError, CloudError) as e:
            err = e if isinstance(e, CloudError) else CloudError(f"bad reply from the cloud: {e}")
        if self.down_shaper is None:
            self._fail(err)
        else:
            self._inbox.put((0.0, err))

    def _delayed(self) -> None:
        while True:
            due, item = self._inbox.get()
            if isinstance(item, CloudError):
                self._fail(item)
                return
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                self._deliver(item)
            except (FrameError, CloudError) as e:
                self._fail(e if isinstance(e, CloudError) else CloudError(f"bad reply from the cloud: {e}"))
                return

    def _deliver(self, data: bytes) -> None:
        reply = unpack(data, self.limits)
        if reply.kind == "error" and reply.meta.get("fatal"):  # e.g. idle expiry: not tied to a request
            raise CloudError(f"the cloud closed the session: {reply.meta.get('message')}")
        with self._lock:
            if not self._pending or self._pending[0][0] != reply.id:
                raise FrameError(f"reply id {reply.id} does not match the oldest request")
            _, fut, t0, sent, alone = self._pending.popleft()
        if self.monitor is not None:
            server_s = reply.meta.get("server_s", 0.0)
            self.monitor.record(sent, len(data), time.perf_counter() - t0,
                                float(server_s) if isinstance(server_s, (int, float)) else 0.0, alone)
            if reply.kind != "error":  # the cloud's load (split/cloud.py); an old cloud sends neither: 0 and 1
                queue, replicas = reply.meta.get("queue", 0), reply.meta.get("replicas")
                self.monitor.record_load(queue if _count(queue) else 0, replicas if _count(replicas) else None)
        if reply.kind == "error":
            fut.set_exception(CloudError(f"the cloud refused a request: {reply.meta.get('message')}"))
        else:
            fut.set_result(reply)

    def _fail(self, err: CloudError, cancel: bool = True) -> None:
        with self._lock:
            if self.error is None:
                self.error = err
            pending, self._pending = list(self._pending), deque()
        for _, fut, *_ in pending:
            if not fut.done():
                fut.set_exception(self.error)
        if cancel:
            self._out.put(_CLOSE)
            self._call.cancel()


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31
