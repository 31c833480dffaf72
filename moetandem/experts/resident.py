"""All experts resident on the compute device: the provider of the engine foundation. It runs on the shared
executor with expert ids as slot ids (its slot table is the identity). bf16 experts are stacked tensors; a packed
format (moetandem.experts.formats) holds one byte row per expert, quantized (or read packed) at load."""
from __future__ import annotations

from functools import partial

import torch
from tqdm import tqdm

from moetandem.experts.executor import _grouped_mm, grouped_mm_supported, run_experts  # noqa: F401 (re-exported)
from moetandem.experts.executor import device_format_supported, device_path_supported
from moetandem.experts.formats import ExpertFormat, ExpertViews
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.rows import ExpertRows, load_pool
from moetandem.experts.store import ExpertStore, flat_bias_views, flat_views
from moetandem.models.expert_activation import ExpertActivation


class ResidentProvider(ExpertProvider):
    """Every expert of every MoE layer stacked on the device: w13 [E, 2I, H] (gate; up; a plain expert's input
    projection [E, I, H]) and w2 [E, H, I]; with biased experts also b13 [E, 2I] and b2 [E, H]. `activation`: the
    experts' (default: the store's). `fmt`: a packed ExpertFormat instead: every expert of a layer in one
    [E, bytes] buffer."""

    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, progress: bool = True,
                 activation: ExpertActivation | None = None, fmt: ExpertFormat | None = None) -> None:
        E, I, H = store.num_experts, store.inter, store.hidden
        self.act = activation or store.activation
        self.fmt = fmt if fmt is not None and not fmt.dense else None
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        self.bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (b13 [E, 2I], b2 [E, H])
        self.packed: dict[int, torch.Tensor] = {}  # layer -> [E, bytes] (packed formats)
        self.views: dict[int, ExpertViews] = {}
        name = "bf16" if self.fmt is None else self.fmt.name
        self.grouped = (device_path_supported(device, dtype, (I, H), self.act) if self.fmt is None
                        else device_format_supported(name, device, dtype, (I, H)))
        self.graph_safe = self.grouped
        self._all = torch.ones(E, dtype=torch.bool, device=device)  # [E]
        if self.fmt is not None:
            rows = ExpertRows(store, self.fmt, keep=False, device=device)
            for layer in tqdm(store.layers, desc=f"experts ({name})", unit="layer", disable=not progress,
                              leave=False):
                buf = self.fmt.empty(E, device)  # [E, bytes]
                for e in range(E):
                    buf[e].copy_(rows.get(layer, e))
                self.packed[layer], self.views[layer] = buf, self.fmt.views(buf)
            return
        with load_pool() as pool:
            for layer in tqdm(store.layers, desc="experts", unit="layer", disable=not progress, leave=False):
                w13 = torch.empty(E, self.act.rows(I), H, device=device, dtype=dtype)
                w2 = torch.empty(E, H, I, device=device, dtype=dtype)
                b13 = torch.empty(E, 2 * I, device=device, dtype=dtype) if self.act.bias else None
                b2 = torch.empty(E, H, device=device, dtype=dtype) if self.act.bias else None
                list(pool.map(partial(self._load_expert, store, layer, w13, w2, b13, b2, dtype), range(E)))
                self.w13[layer], self.w2[layer] = w13, w2
                if self.act.bias:
                    self.bias[layer] = (b13, b2)

    def _load_expert(self, store: ExpertStore, layer: int, w13: torch.Tensor, w2: torch.Tensor,
                     b13: torch.Tensor | None, b2: torch.Tensor | None, dtype: torch.dtype, e: int) -> None:
        """Expert e of a layer into the stacked tensors, through one flat row on their device (read_flat writes each
        part in place, gpt-oss's transposed on the GPU; part by part it took 36 s for 3 GB on a 2-core host)."""
        dev = w13.device
        flat = store.read_flat(layer, e, dtype, out=torch.empty(store.expert_numel(), dtype=dtype, device=dev),
                               device=dev if dev.type == "cuda" else None)
        a, d = flat_views(flat, store.inter, store.hidden, self.act.gated)
        w13[e].copy_(a)
        w2[e].copy_(d)
        if b13 is not None and b2 is not None:
            bb13, bb2 = flat_bias_views(flat, store.inter, store.hidden)
            b13[e].copy_(bb13)
            b2[e].copy_(bb2)

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fmt is not None:
            v = self.views[layer]
            return run_experts(x, expert_ids, weights, v.w13, v.w2, self.grouped, act=self.act, bias=v.bias,
                               fmt=self.fmt.name, scales=v.scales)
        return run_experts(x, expert_ids, weights, self.w13[layer], self.w2[layer], self.grouped,
                           act=self.act, bias=self.bias.get(layer))

    def expert_bytes(self) -> int:
        ts = [*self.w13.values(), *self.w2.values(), *(b for pair in self.bias.values() for b in pair),
              *self.packed.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def resident_mask(self, layer: int) -> torch.Tensor:
        return self._all
