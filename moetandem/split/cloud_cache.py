"""The KV caches of the cloud's end sessions as leases of rows in shared caches, so that one forward can serve
the decode steps of many sessions (split/cloud_batch.py) through the model's `rows=`, as the batcher's slots do.

Sessions whose caches have the same layer range and max_len share one KVCache (a pool): a session's cache of R
rows is R rows of the pool (its slots). The pool grows when a lease does not fit (a new cache, the leased rows
copied over: only at alloc, never per step), reuses returned rows (zeroed when leased again, so a session sees
the zeros of a fresh cache) and is dropped with its last lease. Not shared (batching off): each lease gets a
pool of its own, sized exactly. A lease returned while its session's exchange is still computing (the stream
was cancelled) keeps its rows until that exchange is done (`hold`), so no other session ever gets rows still
being written."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moetandem.models import KVCache


class _Pool:
    def __init__(self, args: Any, start: int, end: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.args, self.start, self.end, self.max_len = args, start, end, max_len
        self.device, self.dtype = device, dtype
        self.cache: KVCache | None = None
        self.free: list[int] = []
        self.leases: set[Lease] = set()
        self.lock = threading.Lock()  # held by a forward on the pool's cache and while the cache grows

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.batch

    def row_bytes(self) -> int:
        return self.cache.nbytes() // self.cache.batch if self.cache is not None else 0

    def take(self, rows: int) -> torch.Tensor:
        """`rows` free rows (grown if needed), zeroed; returns their indices [rows] on the pool's device."""
        with self.lock:
            reused = sorted(self.free)[:rows]
            grow = rows - len(reused)
            if grow:
                old, cap = self.cache, self.capacity
                self.cache = KVCache(self.args, cap + grow, self.max_len, self.device, self.dtype,
                                     layers=range(self.start, self.end))
                if old is not None:  # the leased rows move over
                    span = slice(self.start, self.end)
                    for new_bufs, old_bufs in zip(self.cache.layers[span], old.layers[span]):
                        for n, o in zip(new_bufs, old_bufs):
                            n[:cap].copy_(o)
                self.free.extend(range(cap, cap + grow))
            slots = reused + list(range(self.capacity - grow, self.capacity))
            taken = set(slots)
            self.free = [r for r in self.free if r not in taken]
            if reused:
                idx = torch.tensor(reused, device=self.device)
                assert self.cache is not None
                for bufs in self.cache.layers[self.start:self.end]:
                    for t in bufs:
                        t[idx] = 0
            return torch.tensor(slots, device=self.device)


class Lease:
    """One session cache: `batch` rows of a pool; the session's row r is the pool's row slots[r]."""

    def __init__(self, pool: _Pool, slots: torch.Tensor, owner: object) -> None:
        self.pool, self.slots, self.owner = pool, slots, owner
        self.busy = 0
        self.released = False
        self.last_used = time.monotonic()  # when its session last computed on it (or leased it)

    @property
    def batch(self) -> int:
        return int(self.slots.numel())

    @property
    def max_len(self) -> int:
        return self.pool.max_len

    def nbytes(self) -> int:
        return self.pool.row_bytes() * self.batch


class CachePools:
    """The cloud's session caches. shared: sessions of one (layer range, max_len) lease rows of one cache."""

    def __init__(self, args: Any, device: torch.device, dtype: torch.dtype, shared: bool) -> None:
        self.args, self.device, self.dtype, self.shared = args, device, dtype, shared
        self._lock = threading.Lock()  # the registry and the leases' bookkeeping (never held while computing)
        self._pools: dict[tuple[int, int, int], _Pool] = {}

    def lease(self, start: int, end: int, max_len: int, rows: int, owner: object) -> Lease:
        """A zeroed cache of `rows` rows × max_len for layers [start, end), for `owner` (its session)."""
        with self._lock:
            key = (start, end, max_len)
            pool = self._pools.get(key) if self.shared else None
            if pool is None:
                pool = _Pool(self.args, start, end, max_len, self.device, self.dtype)
                if self.shared:
                    self._pools[key] = pool
            lease = Lease(pool, pool.take(rows), owner)
            pool.leases.add(lease)
            return lease

    def release(self, lease: Lease) -> None:
        """The session is done with the cache: its rows return to the pool (once no exchange uses them)."""
        with self._lock:
            lease.released = True
            if not lease.busy:
                self._return(lease)

    @contextmanager
    def hold(self, lease: Lease) -> Iterator[None]:
        """An exchange computes on the lease's rows while the block runs."""
        with self._lock:
            lease.busy += 1
            lease.last_used = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                lease.busy -= 1
                if lease.released and not lease.busy:
                    self._return(lease)

    def peers(self, lease: Lease, active_s: float = 1.0) -> int:
        """How many sessions hold rows of the lease's pool and computed on them in the last active_s seconds
        (each has at most one exchange in compute at a time)."""
        since = time.monotonic() - active_s
        with self._lock:
            return max(1, len({id(x.owner) for x in lease.pool.leases if x.last_used >= since}))

    def rows_in_use(self) -> int:
        with self._lock:
            return sum(x.batch for p in self._pools.values() for x in p.leases)

    def _return(self, lease: Lease) -> None:  # with self._lock held
        pool = lease.pool
        if lease not in pool.leases:
            return
        pool.leases.discard(lease)
        pool.free.extend(lease.slots.tolist())
        if not pool.leases and self._pools.get((pool.start, pool.end, pool.max_len)) is pool:
            del self._pools[(pool.start, pool.end, pool.max_len)]  # the last lease: the cache's memory goes
