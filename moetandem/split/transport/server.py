"""The cloud's side of one stream: authenticate, then validate each frame, hand it to the session's handler
on a worker thread and send the replies (after the emulated delay). A malformed or forged frame ends that
stream with INVALID_ARGUMENT; other streams are untouched. An idle stream expires and frees its state. While the
cloud drains (shutdown), a stream finishes the frame it is computing, sends that reply, then ends with a fatal
error frame (the end takes it as an outage and computes alone); a frame arriving after that is not computed."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from moetandem.errors import MoetandemError
from moetandem.split.shaper import PeerShapers
from moetandem.split.transport.frame import Frame, FrameError, Limits, pack, unpack

log = logging.getLogger("moetandem.split.cloud")
DRAINING = "this cloud is shutting down (draining); compute on the end"


class RequestRefused(MoetandemError):
    """A well-formed request the cloud cannot serve now (limits); answered with an error frame."""


class StreamStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames = 0
        self.rejected = 0
        self.unauthenticated = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def serve_stream(requests: Iterator[bytes], context: grpc.ServicerContext, handle: Callable[[Frame], Frame],
                 on_close: Callable[[], None], stats: StreamStats, limits: Limits, idle_timeout_s: float,
                 delay_s: float | PeerShapers, draining: threading.Event | None = None) -> Iterator[bytes]:
    """The body of a stream-stream handler (a generator of reply bytes), after authentication. `delay_s`: a
    fixed emulated one-way delay, or the emulated link's reply shapers (one per connected end). `draining`: set
    when the cloud shuts down (see the module doc)."""
    shaper = delay_s.get(context.peer()) if isinstance(delay_s, PeerShapers) else None
    replies: queue.Queue[tuple[Any, ...]] = queue.Queue()
    state = {"last": time.monotonic(), "busy": False, "closing": False}
    turn = threading.Lock()  # a frame is either taken for compute (busy) or the stream is closing, never both
    drain = draining or threading.Event()

    def work() -> None:
        try:
            for data in requests:
                with turn:
                    if state["closing"] or drain.is_set():
                        replies.put(("drained",))
                        return
                    state["last"], state["busy"] = time.monotonic(), True
                t0 = time.perf_counter()
                stats.add(frames=1, bytes_in=len(data))
                try:
                    frame = unpack(data, limits)
                    try:
                        reply = handle(frame)
                    except RequestRefused as e:
                        reply = Frame("error", meta={"message": str(e)})
                except FrameError as e:
                    stats.add(rejected=1)
                    log.warning("rejected a frame from %s: %s", context.peer(), e)
                    replies.put(("abort", grpc.StatusCode.INVALID_ARGUMENT, f"rejected frame: {e}"))
                    return
                reply.id = frame.id
                reply.meta["server_s"] = time.perf_counter() - t0
                data_out = pack(reply)
                due = shaper.due(len(data_out)) if shaper is not None else time.monotonic() + float(delay_s)
                replies.put(("reply", due, data_out))
                state["last"], state["busy"] = time.monotonic(), False
        except Exception as e:  # the client went away (RpcError) or a bug: end this stream only
            if not isinstance(e, grpc.RpcError):
                log.exception("split stream from %s failed", context.peer())
                replies.put(("abort", grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"))
        replies.put(("end",))

    threading.Thread(target=work, name="moetandem-cloud-stream", daemon=True).start()
    try:
        while True:
            if drain.is_set():  # shutting down: end the stream once no frame is being computed or due
                with turn:
                    state["closing"] = not state["busy"] and replies.empty()
                if state["closing"]:
                    yield pack(Frame("error", meta={"message": DRAINING, "fatal": True}))
                    return
            try:
                item = replies.get(timeout=min(0.2 if draining is not None else 1.0, idle_timeout_s))
            except queue.Empty:
                if not state["busy"] and time.monotonic() - state["last"] > idle_timeout_s:
                    log.info("session from %s idle for %.0f s: freed", context.peer(), idle_timeout_s)
                    yield pack(Frame("error", meta={"message": f"idle for more than {idle_timeout_s:g} s; "
                                                               "session freed", "fatal": True}))
                    return
                continue
            if item[0] == "reply":
                wait = item[1] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                stats.add(bytes_out=len(item[2]))
                yield item[2]
            elif item[0] == "abort":
                context.abort(item[1], item[2])
            elif item[0] == "drained":
                continue  # closes at the top of the loop
            else:
                return
    finally:
        on_close()
