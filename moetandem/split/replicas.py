"""`moetandem cloud --replicas N`: N cloud replicas under Ray Serve behind one address (needs moetandem[cluster]).

Design. Ray Serve's own gRPC proxy wants protobuf services and unary / server-streaming calls routed per call;
the split protocol is two bidirectional streams whose Session keeps KV caches on one replica, so calls must not be
spread one by one. So:
  - Ray Serve runs and supervises the replicas: deployment `CloudReplica` with num_replicas=N; each replica runs
    `moetandem cloud` (the plain, single-process server) as its child on a port of its own and answers Ray
    Serve's health check by that child being alive and listening. A replica that dies or fails its check is
    replaced by Ray Serve; its child dies with it (PR_SET_PDEATHSIG), never orphaned.
  - Each replica registers "HOST:PORT" with a small named Ray actor (`Registry`) and renews it every second; an
    entry not renewed for 3 s is gone (Ray actor calls carry only these strings: control, never tensors).
  - This process is the front (split/front.py): one TCP address; each new connection (one end) goes to the live
    replica with the fewest open connections. Bytes pass through unparsed.
A replica lost mid-run closes its ends' connections; each end computes locally at once, probes, reconnects
through the front to a live replica and re-prefills: no request is lost.

Drain (SIGTERM / Ctrl-C of the front): the front stops accepting connections (a new end finds the cloud down and
computes alone), raises the registry's draining flag, and each replica, at its next renewal (≤ 1 s), sends its
`moetandem cloud` child SIGTERM: the child answers the exchanges in flight, refuses new streams as an outage and
exits 0 (split/cloud.py drain()); its health check then stays green, so Ray Serve starts no replacement. The front
waits for every child to exit (up to --drain-timeout + 2 s), then shuts Ray down and exits 0."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("moetandem.split.replicas")
REGISTRY, NAMESPACE = "moetandem-cloud-registry", "moetandem"
TTL_S = 3.0

try:  # optional extra: pip install moetandem[cluster]
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - exercised where ray is absent
    ray = serve = None  # type: ignore[assignment]


def _die_with_parent() -> None:  # in the child, before exec: SIGKILL when the replica process dies
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Registry:
    """Live replicas: address → (pid of its cloud process, last renewal); how each exited; whether to drain."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, float]] = {}
        self.exits: dict[str, int | None] = {}  # address → exit status of its cloud process
        self.draining = False

    def renew(self, address: str, pid: int) -> bool:
        """Renew a replica's entry; True when the replicas are told to drain."""
        self.entries[address] = (pid, time.monotonic())
        return self.draining

    def drop(self, address: str, returncode: int | None = None) -> None:
        self.entries.pop(address, None)
        self.exits[address] = returncode

    def drain(self) -> None:
        self.draining = True

    def exited(self) -> dict[str, int | None]:
        return dict(self.exits)

    def live(self) -> dict[str, int]:
        now = time.monotonic()
        return {a: pid for a, (pid, t) in self.entries.items() if now - t <= TTL_S}


class CloudReplica:
    """One replica: a `moetandem cloud` child on HOST:0, registered while it lives."""

    def __init__(self, argv: list[str], host: str, cwd: str, pythonpath: str) -> None:
        cmd = [sys.executable, "-m", "moetandem", *argv, "--listen", f"{host}:0"]  # argv: "cloud ..."
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env,
                                     preexec_fn=_die_with_parent)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"moetandem cloud exited ({self.proc.wait()}) before listening")
        self.address = f"{host}:{json.loads(line)['listening']}"
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self._stop = threading.Event()
        self.draining = False
        threading.Thread(target=self._renew, daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                drain = ray.get(self.registry.renew.remote(self.address, self.proc.pid), timeout=5.0)
            except Exception as e:  # the registry is busy or gone: renew again next second
                log.debug("replica %s: renewal failed (%s)", self.address, e)
                drain = False
            if drain and not self.draining:  # the front is shutting down: the child drains and exits 0
                self.draining = True
                log.info("replica %s: draining", self.address)
                self.proc.send_signal(signal.SIGTERM)
            self._stop.wait(1.0)
        self.registry.drop.remote(self.address, self.proc.wait())

    def check_health(self) -> None:  # Ray Serve: raise → this replica is replaced
        if self.proc.poll() is not None and not (self.draining and self.proc.returncode == 0):
            raise RuntimeError(f"moetandem cloud at {self.address} exited with {self.proc.returncode}")

    def address_of(self) -> str:
        return self.address

    def __del__(self) -> None:
        self._stop.set()
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.terminate()


def deploy(n: int, argv: list[str], host: str = "127.0.0.1") -> Any:
    """Start (or join) Ray, the registry and the deployment of n replicas; returns the registry handle."""
    if ray is None:
        raise RuntimeError("--replicas needs Ray Serve: pip install 'moetandem[cluster]'")
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    registry = ray.remote(Registry).options(name=REGISTRY, namespace=NAMESPACE, get_if_exists=True,
                                            num_cpus=0).remote()
    serve.start(proxy_location="Disabled")  # ends never talk to Ray's proxies: the front carries their bytes
    app = serve.deployment(CloudReplica, name="moetandem-cloud", num_replicas=n, health_check_period_s=1.0,
                           health_check_timeout_s=10.0, ray_actor_options={"num_cpus": 0},
                           max_constructor_retry_count=100).bind(argv, host, os.getcwd(), _package_root())
    serve.run(app, name="moetandem-cloud", route_prefix=None, blocking=False)
    return registry


def wait_live(registry: Any, n: int, timeout_s: float = 300.0) -> dict[str, int]:
    """Block until n replicas are registered; returns address → pid."""
    end = time.monotonic() + timeout_s
    while (live := ray.get(registry.live.remote())) and len(live) < n or not live:
        if time.monotonic() > end:
            raise RuntimeError(f"only {len(live)} of {n} replicas came up in {timeout_s:.0f} s")
        time.sleep(0.2)
    return live


def serve_replicas(n: int, argv: list[str], listen: str, stop: threading.Event, drain_timeout_s: float = 30.0) -> int:
    """The `--replicas N` command: deploy, then serve the front on `listen` until `stop`; then drain (see above)."""
    from moetandem.split.front import Front

    host = listen.rpartition(":")[0].strip("[]")
    replica_host = "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else ray_node_ip()
    registry = deploy(n, argv, replica_host)

    def on_signal(*_: Any) -> None:  # ray.init installed its own handlers: ours drain (a second signal: exit now)
        if stop.is_set():
            print("moetandem cloud: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    live = wait_live(registry, n)
    cache: dict[str, Any] = {"t": 0.0, "live": list(live)}

    def backends() -> list[str]:  # refreshed at most every 0.2 s
        if time.monotonic() - cache["t"] > 0.2:
            cache["live"], cache["t"] = list(ray.get(registry.live.remote())), time.monotonic()
        return cache["live"]

    front = Front(backends)
    port = front.start(listen)
    print(json.dumps({"listening": port, "replicas": [{"address": a, "pid": p} for a, p in live.items()]}),
          flush=True)
    while not stop.wait(1.0):  # a timed wait: the signal handler runs promptly on the main thread
        pass
    drain(front, registry, drain_timeout_s)
    serve.shutdown()
    ray.shutdown()
    return 0


def drain(front: Any, registry: Any, timeout_s: float) -> bool:
    """Stop taking ends, tell every replica to drain, wait for their clouds to exit (each renews within 1 s, then
    drains for up to timeout_s). True when all exited 0 in time."""
    front.stop()  # a new end: connection refused, an outage (it computes alone and probes)
    ray.get(registry.drain.remote())
    draining = set(ray.get(registry.live.remote()))
    print(f"moetandem cloud: draining {len(draining)} replica(s) (up to {timeout_s:g} s)", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + timeout_s + 2.0
    while (left := ray.get(registry.live.remote())) and time.monotonic() < deadline:
        time.sleep(0.1)
    exits = {a: rc for a, rc in ray.get(registry.exited.remote()).items() if a in draining}
    print("moetandem cloud: replicas exited: " + ", ".join(f"{a} with {rc}" for a, rc in exits.items())
          + (f"; {len(left)} still running at the timeout: cut" if left else ""), file=sys.stderr, flush=True)
    return not left and all(rc == 0 for rc in exits.values())


def _package_root() -> str:
    """The directory holding this moetandem package: the replicas' children import the same code."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ray_node_ip() -> str:
    return ray.util.get_node_ip_address() if ray is not None else "127.0.0.1"
