"""`moetandem cloud --expert-parallel N`: one cloud model over N ranks of one host.

Rank 0 serves gRPC (split/cloud.py) as usual; ranks 1..N-1 serve nobody. Every frame rank 0 computes — alloc,
free, layers, experts — is first broadcast to the other ranks (our own frame bytes over a gloo control group:
nothing is pickled), under the cloud's compute lock, so every rank runs the same replicated layers on the same
tokens in the same order and meets rank 0 in the experts' collectives (experts/parallel.py). Each rank keeps its
own KV caches for the sessions it mirrors.

Launch is torchrun-style: rank 0 (the command the user ran) starts ranks 1..N-1 as the same command line with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment; `torchrun --nproc-per-node N
-m moetandem cloud --expert-parallel N ...` works the same way (the variables are then already set)."""
from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

from moetandem.errors import MoetandemError
from moetandem.experts.parallel import gather_expert_bytes  # noqa: F401 (for the cloud command)
from moetandem.split.transport.frame import FrameError, pack, unpack

log = logging.getLogger("moetandem.split.parallel")
_FRAME, _CLOSE, _STOP = 1, 2, 3
_KINDS = ("Session", "Experts")
#: a follower rank may wait this long for the next frame (an idle cloud is not an error)
_IDLE = datetime.timedelta(days=30)


def launched_rank() -> int | None:
    """This process's rank when it was started as a rank (RANK in the environment), else None."""
    r = os.environ.get("RANK")
    return int(r) if r is not None else None


def launch_followers(world: int, argv: list[str] | None = None) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 as this same command line (torchrun-style environment on localhost) and set this
    process up as rank 0. Returns the follower processes (the caller ends them on exit)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "moetandem", *(sys.argv[1:] if argv is None else argv)]
    return [subprocess.Popen(cmd, env={**os.environ, **base, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.DEVNULL) for r in range(1, world)]


def init_group(device: str = "auto") -> tuple[Any, str]:
    """init_process_group from the environment: NCCL when this rank has a GPU, gloo otherwise. Returns the
    control group (gloo, for frames) and the device string this rank computes on."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_IDLE)
    return dist.new_group(backend="gloo", timeout=_IDLE), device


class Mirror:
    """Rank 0's side: broadcast each frame it is about to compute (call under the cloud's compute lock)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._lock = threading.Lock()
        self._next = 0
        self.stopped = False

    def new_key(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def send(self, key: int, kind: str, frame: Any) -> None:
        data = pack(frame)
        self._broadcast(_FRAME, key, _KINDS.index(kind), data)

    def close(self, key: int) -> None:
        self._broadcast(_CLOSE, key, 0, b"")

    def stop(self) -> None:
        """Release the other ranks (they return from follow()); later frames and closes are not mirrored."""
        self._broadcast(_STOP, 0, 0, b"")
        self.stopped = True

    def _broadcast(self, op: int, key: int, kind: int, data: bytes) -> None:
        with self._lock:
            if self.stopped:
                if op == _FRAME:
                    raise MoetandemError("this expert-parallel cloud is shutting down")
                return
            head = torch.tensor([op, key, kind, len(data)], dtype=torch.int64)
            dist.broadcast(head, 0, group=self.group)
            if data:
                dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)


def follow(server: Any, group: Any) -> None:
    """A follower rank's loop: receive rank 0's frames and compute them on this rank's engine (replies are
    dropped; rank 0 answers the end). `server` is an unstarted CloudServer over this rank's engine. Returns on
    stop (rank 0 shutting down)."""
    from moetandem.split.cloud_session import CloudSession  # the same handlers as rank 0

    sessions: dict[int, Any] = {}
    while True:
        head = torch.zeros(4, dtype=torch.int64)
        dist.broadcast(head, 0, group=group)
        op, key, kind, n = (int(v) for v in head.tolist())
        if op == _STOP:
            return
        if op == _CLOSE:
            s = sessions.pop(key, None)
            if s is not None:
                s.free_all()
            continue
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=group)
        frame = unpack(buf.numpy().tobytes(), server.limits)
        s = sessions.get(key)
        if s is None:
            s = sessions[key] = CloudSession(server, _KINDS[kind])
            s.hello = True  # rank 0 checked the hello
        try:
            s.handle(frame)
        except (FrameError, MoetandemError) as e:  # rank 0 refused the same frame the same way
            log.debug("rank %d: frame refused as on rank 0: %s", dist.get_rank(), e)
