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
through the front to a live replica and re-prefills: no request is lost."""
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
    """Live replicas: address → (pid of its cloud process, last renewal)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, float]] = {}

    def renew(self, address: str, pid: int) -> None:
        self.entries[address] = (pid, time.monotonic())

    def drop(self, address: str) -> None:
        self.entries.pop(address, None)

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
        threading.Thread(target=self._renew, daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.registry.renew.remote(self.address, self.proc.pid)
            self._stop.wait(1.0)
        self.registry.drop.remote(self.address)

    def check_health(self) -> None:  # Ray Serve: raise → this replica is replaced
        if self.proc.poll() is not None:
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


def serve_replicas(n: int, argv: list[str], listen: str, stop: threading.Event) -> int:
    """The `--replicas N` command: deploy, then serve the front on `listen` until `stop`."""
    from moetandem.split.front import Front

    host = listen.rpartition(":")[0].strip("[]")
    replica_host = "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else ray_node_ip()
    registry = deploy(n, argv, replica_host)
    for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init installed its own handlers: ours stop cleanly
        signal.signal(sig, lambda *_: stop.set())
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
    stop.wait()
    front.stop()
    serve.shutdown()
    ray.shutdown()
    return 0


def _package_root() -> str:
    """The directory holding this moetandem package: the replicas' children import the same code."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ray_node_ip() -> str:
    return ray.util.get_node_ip_address() if ray is not None else "127.0.0.1"
