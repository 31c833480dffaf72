"""The cost model behind exact miss handling: fetch an expert into a slot, or compute its rows on the host."""
from __future__ import annotations

import time
from typing import Callable

import torch

from moetandem.experts.store import flat_views
from moetandem.models.layers import expert_ffn


class CostModel:
    """Measured costs that pick fetch vs host compute for a miss: bytes over host->device bandwidth against
    rows × host FFN time per row (plus moving the activations)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, inter: int, hidden: int,
                 row_bytes: int | None = None) -> None:
        """row_bytes: one expert's bytes in its format (default: dense in `dtype`), what a fetch copies."""
        self.same_memory = device.type == "cpu"
        n = 3 * inter * hidden
        host = torch.randn(n, dtype=dtype)
        row = host.view(torch.uint8) if row_bytes is None else torch.zeros(row_bytes, dtype=torch.uint8)
        if device.type == "cuda":
            row = row.pin_memory()
        dst = torch.empty_like(row, device=device)
        self.fetch_s = self._time(lambda: dst.copy_(row, non_blocking=True), device)
        # timed in the dtype the host path computes in (misses.py: the experts' own), not fp32
        w13, w2 = flat_views(host, inter, hidden)
        x = torch.randn(1, hidden, dtype=dtype)
        self.host_row_s = self._time(lambda: expert_ffn(x, w13, w2), torch.device("cpu"))

    @staticmethod
    def _time(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / reps

    def prefer_host(self, rows: int) -> bool:
        """On a CPU box 'host' and 'device' memory are the same RAM: computing from the mapped file avoids
        evicting a resident expert, so host wins. On a GPU, compare the copy with the host FFN."""
        return self.same_memory or rows * self.host_row_s < self.fetch_s
