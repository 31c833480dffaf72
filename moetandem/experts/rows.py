"""Where an expert's row in a format comes from: the store's dense read (bf16), the checkpoint's own packed form
(a pre-quantized checkpoint in that format: read packed, never expanded), or round-to-nearest quantization of the
dense read (`--expert-format` differs from the checkpoint's). Quantized rows are made once, at load, and kept in
host memory (a swap must not quantize)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from tqdm import tqdm

from moetandem.experts.formats import ExpertFormat
from moetandem.experts.native import native_parts
from moetandem.experts.store import ExpertStore

#: threads that read (and quantize) experts into stacked or mapped buffers at load: torch ops release the GIL
#: (MOETANDEM_LOAD_THREADS; 2-core host, gpt-oss-shaped experts all resident: 19.8 s with 1, 12.9 s with 8)
LOAD_THREADS = max(1, int(os.environ.get("MOETANDEM_LOAD_THREADS", "8") or 8))


def load_pool() -> ThreadPoolExecutor:
    """The pool that reads experts at load: LOAD_THREADS threads, at most one per CPU."""
    return ThreadPoolExecutor(max(1, min(LOAD_THREADS, os.cpu_count() or 1)))


class ExpertRows:
    def __init__(self, store: ExpertStore, fmt: ExpertFormat, keep: bool = True, progress: bool = True,
                 device: torch.device | str = "cpu") -> None:
        """keep: quantize every expert now (on `device`) and hold the rows in host memory (a committee, which
        rereads them); else each get() quantizes (an all-resident load reads each expert once), on `device`, and
        returns the row there. device: where quantizing runs, and where copy_into transposes gpt-oss's stored
        experts; dense and kept rows from get() are on the host."""
        self.store, self.fmt, self.device = store, fmt, torch.device(device)
        #: how rows are made: "dense" (bf16), "native" (the checkpoint's own packed form), "quantize"
        native = getattr(store, "native_format", None)
        self.source = "dense" if fmt.dense else "native" if native == fmt.name else "quantize"
        self._rows: dict[int, torch.Tensor] = {}  # layer -> [E, row_numel] (quantized on load)
        if keep and self.source == "quantize":  # on `device`, by LOAD_THREADS threads, kept in host memory
            with load_pool() as pool:
                for layer in tqdm(store.layers, desc=f"quantizing experts to {fmt.name}", unit="layer",
                                  disable=not progress, leave=False):
                    buf = fmt.empty(store.num_experts)  # [E, row] on the host
                    list(pool.map(partial(self._make_into, layer, buf), range(store.num_experts)))
                    self._rows[layer] = buf

    def adopt(self, layer: int, rows: torch.Tensor) -> None:
        """Hold `rows` [E, row_numel] (the same values in other memory, e.g. the committee's pinned copy) instead of
        the layer's kept rows, so host memory holds them once."""
        if layer in self._rows:
            assert rows.shape == self._rows[layer].shape and rows.dtype == self._rows[layer].dtype
            self._rows[layer] = rows

    def get(self, layer: int, expert: int) -> torch.Tensor:
        """One expert's row [row_numel] on the host (a view into the kept rows, or freshly made)."""
        kept = self._rows.get(layer)
        if kept is not None:
            return kept[expert]
        return self._make(layer, expert)

    def copy_into(self, layer: int, expert: int, out: torch.Tensor) -> None:
        """get() written into `out` [row_numel] (a bf16 row straight from the checkpoint, no temporary)."""
        if self.source == "dense" and layer not in self._rows:  # (gpt-oss transposed on the GPU where there is one)
            self.store.read_flat(layer, expert, self.fmt.dtype, out=out,
                                 device=self.device if self.device.type == "cuda" else None)
        else:
            out.copy_(self.get(layer, expert))

    def _make_into(self, layer: int, buf: torch.Tensor, expert: int) -> None:
        buf[expert].copy_(self._make(layer, expert))

    def _make(self, layer: int, expert: int) -> torch.Tensor:
        s, fmt = self.store, self.fmt
        if self.source == "dense":
            return s.read_flat(layer, expert, fmt.dtype)
        bias = s.read_bias(layer, expert)
        b = None if bias is None else (torch.cat([bias[0], bias[1]]), bias[2])  # b13 [2I] (gate; up), b2 [H]
        if self.source == "native":
            return fmt.pack_parts(*native_parts(s, layer, expert), bias=b)
        g, u, d = s.read(layer, expert, device=self.device)
        w13 = torch.cat([g, u]).to(self.device)  # [2I, H]
        return fmt.pack(w13, d.to(self.device), b)  # on self.device
