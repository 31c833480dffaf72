"""The end's connection to the cloud: a gRPC channel with a Session stream (layer ranges) and an Experts
stream, opened lazily, checked with `hello`, re-opened after a failure no sooner than `retry_after_s`.
A lost link never raises out of here: callers get None and compute on the end."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from moetandem.errors import CloudError
from moetandem.split.monitor import LinkMonitor
from moetandem.split.transport import EXPERTS_METHOD, SESSION_METHOD
from moetandem.split.transport.auth import call_metadata, channel_credentials
from moetandem.split.transport.client import StreamClient
from moetandem.split.transport.frame import Frame, Limits

log = logging.getLogger("moetandem.split")
FATAL = {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"}  # retrying cannot help


class CloudRefused(CloudError):
    """The cloud answered but refused us (wrong token, another checkpoint): a configuration error."""


@dataclass
class LinkOptions:
    address: str  # HOST:PORT
    token: str = field(repr=False)
    tls: bool = False
    tls_ca: str | None = None  # PEM to trust (self-signed cloud); None with tls = system roots
    timeout_s: float = 30.0  # deadline of each exchange
    connect_timeout_s: float = 5.0
    retries: int = 3  # connection attempts per (re)connect, with backoff
    retry_after_s: float = 5.0  # after a loss, wait this long before trying the cloud again
    emulate_rtt_ms: float = 0.0  # application-layer delay: each frame leaves rtt/2 after it was submitted
    limits: Limits = field(default_factory=Limits)


class CloudLink:
    def __init__(self, opts: LinkOptions, fingerprint: str, monitor: LinkMonitor | None = None) -> None:
        self.opts, self.fingerprint = opts, fingerprint
        self.monitor = monitor or LinkMonitor()
        self.epoch = 0  # +1 per Session stream opened: cloud KV state of older epochs is gone
        self.losses = 0
        self.info: dict = {}
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._streams: dict[str, StreamClient | None] = {SESSION_METHOD: None, EXPERTS_METHOD: None}
        self._retry_at = 0.0

    def session(self) -> StreamClient | None:
        return self._stream(SESSION_METHOD)

    def experts(self) -> StreamClient | None:
        return self._stream(EXPERTS_METHOD)

    def lost(self, err: Exception) -> None:
        """Called when an exchange failed: drop the streams; the end finishes alone until retry_after_s."""
        with self._lock:
            self.losses += 1
            self._retry_at = time.monotonic() + self.opts.retry_after_s
            for m, s in self._streams.items():
                if s is not None:
                    s.close()
                self._streams[m] = None
        log.warning("split: %s; finishing on the end (end-only) and retrying the cloud in %.0f s",
                    err, self.opts.retry_after_s)

    def close(self) -> None:
        with self._lock:
            for s in self._streams.values():
                if s is not None:
                    s.close()
            if self._channel is not None:
                self._channel.close()
            self._channel = None

    def connect(self) -> None:
        """Open both streams now; CloudError when the cloud refuses us (token, checkpoint) or cannot be reached."""
        for m in self._streams:
            with self._lock:
                self._streams[m] = self._open(m)

    def _stream(self, method: str) -> StreamClient | None:
        with self._lock:
            s = self._streams[method]
            if s is not None and s.alive:
                return s
            if s is not None:  # died between exchanges (idle expiry, cloud restart): one immediate reconnect
                self._streams[method] = None
                self.losses += 1
                log.warning("split: %s; reconnecting", s.error)
            elif time.monotonic() < self._retry_at:
                return None
            try:
                self._streams[method] = self._open(method, attempts=1)
            except CloudError as e:
                self._retry_at = time.monotonic() + self.opts.retry_after_s
                log.warning("split: cloud unavailable (%s); computing on the end", e)
                return None
            return self._streams[method]

    def _open(self, method: str, attempts: int | None = None) -> StreamClient:
        """A new stream that answered hello, after up to `attempts` (default: retries) tries with backoff."""
        o = self.opts
        err: CloudError | None = None
        for attempt in range(max(1, attempts or o.retries)):
            if attempt:
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
            client = StreamClient(self._get_channel(), method, call_metadata(o.token), o.timeout_s, self.monitor,
                                  o.emulate_rtt_ms / 2000.0, o.limits)
            try:
                hello = client.submit(Frame("hello", meta={"fingerprint": self.fingerprint}))
                self.info = client.wait(hello, o.connect_timeout_s).meta
            except CloudError as e:
                if client.status in FATAL:
                    raise CloudRefused(f"the cloud at {o.address} refused this end device: {e}") from None
                err = e
                continue
            if method == SESSION_METHOD:
                self.epoch += 1
            return client
        raise err or CloudError(f"cannot reach the cloud at {o.address}")

    def _get_channel(self) -> grpc.Channel:
        if self._channel is None:
            o = self.opts
            opts = [("grpc.max_receive_message_length", o.limits.max_message_bytes),
                    ("grpc.max_send_message_length", o.limits.max_message_bytes)]
            self._channel = (grpc.secure_channel(o.address, channel_credentials(o.tls_ca), opts)
                             if o.tls or o.tls_ca else grpc.insecure_channel(o.address, opts))
        return self._channel
