"""The end's connection to the cloud: a gRPC channel with a Session stream (layer ranges) and an Experts
stream, checked with `hello`. A lost link never raises out of here: callers get None and compute on the end.

Failure handling, so that a cloud that stops answering stalls nobody for long:
- each exchange waits for its reply only as long as the measured link warrants (LinkMonitor.deadline_s: k x the
  p99 of recent exchange times, bounded to [deadline_floor_s, timeout_s]; timeout_s until enough exchanges);
- HTTP/2 keepalive pings (keepalive_s, keepalive_timeout_s) notice a cloud that stopped answering within ~1.5 s
  even while an exchange with a long deadline is in flight (a cold link, a large prefill frame): a stalled
  exchange never holds the batch for its full deadline;
- a circuit breaker: after a failure (timeout, reset, refused) every caller gets None at once (end-only) while a
  background thread probes the cloud (a new stream and `hello`) every retry_after_s; when one answers, the streams
  are installed and the next step uses the cloud again;
- configuration errors are not outages: a refused token or checkpoint, and TLS failures (untrusted certificate,
  name mismatch, TLS against a plaintext cloud or the reverse) raise CloudRefused at connect time.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from moetandem.errors import CloudError
from moetandem.split.monitor import LinkMonitor
from moetandem.split.shaper import LinkShaper, LinkSpec
from moetandem.split.transport import EXPERTS_METHOD, SESSION_METHOD, client_keepalive
from moetandem.split.transport.auth import call_metadata, channel_credentials, speaks_tls, tls_failure
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
    timeout_s: float = 30.0  # the longest an exchange may take (ceiling of the measured deadline)
    connect_timeout_s: float = 5.0
    retries: int = 3  # connection attempts at start, with backoff
    retry_after_s: float = 1.0  # while the breaker is open: probe the cloud this often
    deadline_k: float = 4.0  # exchange deadline = k x p99 of measured exchange times ...
    deadline_floor_s: float = 0.5  # ... but never less than this
    keepalive_s: float = 0.5  # HTTP/2 PING after this long without a byte from the cloud (0: off) ...
    keepalive_timeout_s: float = 1.0  # ... unanswered this long: the link is dead, every exchange in flight fails
    emulate_rtt_ms: float = 0.0  # application-layer delay: each frame leaves rtt/2 after it was submitted
    emulate_rate_mbit: float = 0.0  # application-layer link shaper (split.shaper): rate, jitter, loss
    emulate_jitter_ms: float = 0.0
    emulate_loss: float = 0.0
    emulate_down: bool = False  # also shape the replies on the end (the cloud then shapes nothing: one process
    # controls both directions, e.g. a test bed changing the link of a running end)
    request_costs: bool = False  # ask the cloud for its measured step costs in hello (info["cost_*"])
    limits: Limits = field(default_factory=Limits)


class CloudLink:
    def __init__(self, opts: LinkOptions, fingerprint: str, monitor: LinkMonitor | None = None) -> None:
        self.opts, self.fingerprint = opts, fingerprint
        self.monitor = monitor or LinkMonitor()
        spec = LinkSpec(opts.emulate_rate_mbit, opts.emulate_rtt_ms, opts.emulate_jitter_ms, opts.emulate_loss)
        self.shaper: LinkShaper | None = spec.shaper() if spec.active else None  # up-link, shared by all streams
        self.down_shaper: LinkShaper | None = spec.shaper(1) if spec.active and opts.emulate_down else None
        self.epoch = 0  # +1 per Session stream opened: cloud KV state of older epochs is gone
        self.losses = 0
        self.probes = 0  # background attempts while the breaker was open
        self.info: dict = {}
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._streams: dict[str, StreamClient | None] = {SESSION_METHOD: None, EXPERTS_METHOD: None}
        self._open_since: float | None = None  # breaker open (end-only) since this monotonic time
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self._channel_lock = threading.Lock()

    @property
    def breaker_open(self) -> bool:
        return self._open_since is not None

    def deadline_s(self, sent: int) -> float:
        o = self.opts
        return self.monitor.deadline_s(sent, o.deadline_k, o.deadline_floor_s, o.timeout_s)

    def session(self) -> StreamClient | None:
        return self._stream(SESSION_METHOD)

    def experts(self) -> StreamClient | None:
        return self._stream(EXPERTS_METHOD)

    def lost(self, err: Exception) -> None:
        """An exchange failed: drop the streams and open the breaker (every step end-only) until a probe gets an
        answer."""
        with self._lock:
            self.losses += 1
            self._drop_streams()
            self._trip(str(err))
        log.warning("split: %s; computing on the end and probing the cloud every %.2g s", err,
                    self.opts.retry_after_s)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop_streams()
            if self._channel is not None:
                self._channel.close()
            self._channel = None

    def connect(self) -> None:
        """Open both streams now. CloudRefused when the cloud refuses us (token, checkpoint) or TLS is
        misconfigured; CloudError when it cannot be reached (the breaker is then open and probing)."""
        try:
            for m in self._streams:
                client = self._open(m, self.opts.retries, check_tls=True)
                with self._lock:
                    self._install(m, client)
        except CloudRefused:
            raise
        except CloudError as e:
            with self._lock:
                self._trip(str(e))
            raise

    # ---- internals (callers hold self._lock where noted)
    def _drop_streams(self) -> None:
        for m, s in self._streams.items():
            if s is not None:
                s.close()
            self._streams[m] = None

    def _trip(self, why: str) -> None:
        """Open the breaker and start the prober (lock held)."""
        self.last_error = why
        if self._open_since is None:
            self._open_since = time.monotonic()
        if (self._prober is None or not self._prober.is_alive()) and not self._closed.is_set():
            self._prober = threading.Thread(target=self._probe, name="moetandem-split-probe", daemon=True)
            self._prober.start()

    def _install(self, method: str, client: StreamClient) -> None:
        old = self._streams[method]
        if old is not None:
            old.close()
        self._streams[method] = client
        if method == SESSION_METHOD:
            self.epoch += 1

    def _probe(self) -> None:
        """Background: while the breaker is open, try new streams every retry_after_s; close it on success."""
        while not self._closed.wait(self.opts.retry_after_s):
            self.probes += 1
            try:
                fresh = {m: self._open(m, 1) for m in self._streams}
            except CloudError as e:
                level = logging.ERROR if isinstance(e, CloudRefused) else logging.DEBUG
                log.log(level, "split: probe: %s", e)
                continue
            with self._lock:
                for m, c in fresh.items():
                    self._install(m, c)
                down = time.monotonic() - (self._open_since or time.monotonic())
                self._open_since = None
            log.warning("split: the cloud answers again after %.1f s; using it", down)
            return

    def _stream(self, method: str) -> StreamClient | None:
        """The live stream, or None at once while the breaker is open (never blocks on a dead cloud)."""
        with self._lock:
            if self._open_since is not None:
                return None
            s = self._streams[method]
            if s is not None and s.alive:
                return s
            if s is not None:  # died between exchanges (idle expiry, cloud restart): one quick reconnect
                self._streams[method] = None
                self.losses += 1
                log.warning("split: %s; reconnecting", s.error)
            try:
                self._install(method, self._open(method, 1, min(self.opts.connect_timeout_s, 1.5)))
            except CloudError as e:
                self._trip(str(e))
                log.warning("split: cloud unavailable (%s); computing on the end", e)
                return None
            return self._streams[method]

    def _open(self, method: str, attempts: int, hello_timeout_s: float | None = None,
              check_tls: bool = False) -> StreamClient:
        """A new stream that answered hello, after up to `attempts` tries with backoff. CloudRefused on a
        configuration error (token, checkpoint, TLS), which no retry can fix. check_tls (at start): when a
        plaintext attempt fails, see whether the cloud speaks TLS (gRPC itself reports only a closed socket)."""
        o = self.opts
        err: CloudError | None = None
        for attempt in range(max(1, attempts)):
            if attempt:
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
            client = StreamClient(self._get_channel(), method, call_metadata(o.token), o.timeout_s, self.monitor,
                                  o.emulate_rtt_ms / 2000.0, o.limits, deadline=self.deadline_s, shaper=self.shaper,
                                  down_shaper=self.down_shaper)
            try:
                meta = {"fingerprint": self.fingerprint, **({"costs": 1} if o.request_costs else {})}
                hello = client.submit(Frame("hello", meta=meta))
                self.info = client.wait(hello, hello_timeout_s or o.connect_timeout_s).meta
            except CloudError as e:
                client.close()
                if client.status in FATAL:
                    raise CloudRefused(f"the cloud at {o.address} refused this end device: {e}") from None
                if tls_failure(client.detail):
                    raise CloudRefused(f"TLS to the cloud at {o.address} failed ({client.detail}); check --tls-ca, "
                                       "the certificate's host name, and that both sides use TLS") from None
                if check_tls and not attempt and not (o.tls or o.tls_ca) and speaks_tls(o.address):
                    raise CloudRefused(f"the cloud at {o.address} speaks TLS but this end connects in plain TCP; "
                                       "pass --tls-ca with its certificate (or CA)") from None
                err = e
                continue
            return client
        raise err or CloudError(f"cannot reach the cloud at {o.address}")

    def _get_channel(self) -> grpc.Channel:
        with self._channel_lock:
            if self._channel is None:
                o = self.opts
                opts = [("grpc.max_receive_message_length", o.limits.max_message_bytes),
                        ("grpc.max_send_message_length", o.limits.max_message_bytes),
                        *client_keepalive(o.keepalive_s, o.keepalive_timeout_s),
                        # a connection of its own: gRPC otherwise shares one among the channels of a process to one
                        # address, and two ends in one process would ride one connection (one replica behind a front)
                        ("grpc.use_local_subchannel_pool", 1)]
                self._channel = (grpc.secure_channel(o.address, channel_credentials(o.tls_ca), opts)
                                 if o.tls or o.tls_ca else grpc.insecure_channel(o.address, opts))
            return self._channel
