"""uvicorn with a graceful drain (`DrainingServer`), and a helper that runs an app under it in a background thread
(tests, benchmarks, notebooks)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server that drains the app before it shuts down (SIGTERM, Ctrl-C, `should_exit`).

    uvicorn's own order is: close the listening sockets, wait up to `timeout_graceful_shutdown` for connections,
    cancel the rest (a stream is cut mid-body), and only then run the lifespan shutdown - too late to end a stream
    properly. Here the app's `state.server.drain(timeout)` runs first, while the socket still accepts (new requests
    get 503 `server_shutting_down`, /health 503 "draining"): running requests finish, those still running at the
    deadline get an error event and `data: [DONE]`. A second signal (force exit) stops waiting."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float | None = None) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout  # None: the app's own (create_app(drain_timeout=...))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "server", None)
        if state is not None and hasattr(state, "drain") and not self.force_exit:
            drain = asyncio.ensure_future(state.drain(self.drain_timeout))
            while not drain.done() and not self.force_exit:
                await asyncio.wait({drain}, timeout=0.1)
            await asyncio.sleep(0.05)  # let the handlers write the last events the drain produced
        await super().shutdown(sockets)
        if not self.force_exit:  # drained: exit 0 rather than die by the captured signal (uvicorn re-raises it)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()


class ServerThread:
    """``with ServerThread(app) as srv: httpx.get(srv.url + "/health")`` - binds 127.0.0.1 on a free port
    (port=0) before starting, so there is no race for the port. Stopping drains like a SIGTERM would."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.app, self.url = app, f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on")
        self.server = DrainingServer(config, drain_timeout)
        self.drain_timeout = drain_timeout
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="moetandem-uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        """Begin a graceful shutdown (as SIGTERM does) without waiting for it."""
        self.server.should_exit = True

    def stop(self) -> None:
        self.shutdown()
        self.thread.join(self.drain_timeout + 15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
