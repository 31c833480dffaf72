"""One address for many cloud replicas: a TCP front that hands each incoming connection to the live replica with
the fewest open connections, and copies bytes both ways (it never parses them: gRPC, our frames and TLS pass
through end to end).

One end = one gRPC channel = one TCP connection, so all of an end's streams (its Session with its KV caches, its
Experts stream) land on one replica: session affinity for free. When that replica dies, the front closes the
end's connection; the end falls back to local compute at once, probes, and its next connection goes to a live
replica, where it re-prefills (split/link.py, split/end.py): no request is lost."""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("moetandem.split.front")


class Front:
    """`Front(backends).start("0.0.0.0:50051")`. `backends()` returns the live replicas' "HOST:PORT" (called for
    every new connection, so replicas that come and go are followed)."""

    def __init__(self, backends: Callable[[], list[str]], connect_timeout_s: float = 2.0) -> None:
        self.backends, self.connect_timeout_s = backends, connect_timeout_s
        self.open: dict[str, int] = {}  # backend → connections open through the front (its load)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        s = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), int(port)))
        s.listen(256)
        self._sock = s
        threading.Thread(target=self._accept, name="moetandem-front", daemon=True).start()
        return s.getsockname()[1]

    def stop(self) -> None:
        """Stop accepting connections (those open go on until either side closes them)."""
        self._stop.set()
        if self._sock is not None:
            try:  # wakes the accept() in progress: close() alone leaves the socket listening until it returns
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def load(self) -> dict[str, int]:
        with self._lock:
            return {b: n for b, n in self.open.items() if n}

    def pick(self, live: list[str], tried: set[str]) -> str | None:
        """The untried live backend with the fewest open connections (ties: the order given), counted as open
        from now on (so concurrent connections spread); release() it when the connection fails or ends."""
        with self._lock:
            free = [b for b in live if b not in tried]
            if not free:
                return None
            b = min(free, key=lambda b: self.open.get(b, 0))
            self.open[b] = self.open.get(b, 0) + 1
            return b

    def release(self, b: str) -> None:
        with self._lock:
            self.open[b] -= 1

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self._stop.is_set():
                client.close()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        tried: set[str] = set()
        live = self.backends()
        while (b := self.pick(live, tried)) is not None:
            tried.add(b)
            host, _, port = b.rpartition(":")
            try:
                up = socket.create_connection((host, int(port)), timeout=self.connect_timeout_s)
            except OSError as e:  # a replica that just died (its registration not yet expired): the next one
                self.release(b)
                log.info("front: replica %s unreachable (%s), trying another", b, e)
                continue
            up.settimeout(None)
            try:
                self._pipe(client, up)
            finally:
                self.release(b)
            return
        log.warning("front: no live replica for a new connection (%d known)", len(live))
        client.close()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until either side closes; then close both (the end sees its replica go)."""
        done = threading.Event()

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(data)
            except OSError:
                pass
            done.set()

        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=copy, args=(src, dst), daemon=True).start()
        done.wait()  # one side closed: close both, which also ends the other copy
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
