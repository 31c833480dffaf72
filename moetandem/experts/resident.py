"""All experts resident on the compute device: the provider of the engine foundation. It runs on the shared
executor with expert ids as slot ids (its slot table is the identity). bf16 experts are stacked tensors; a packed
format (moetandem.experts.formats) holds one byte row per expert, quantized (or read packed) at load."""
from __future__ import annotations

import torch
from tqdm import tqdm

from moetandem.experts.executor import _grouped_mm, grouped_mm_supported, run_experts  # noqa: F401 (re-exported)
from moetandem.experts.executor import device_format_supported, device_path_supported
from moetandem.experts.formats import ExpertFormat, ExpertViews
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.rows import ExpertRows
from moetandem.experts.store import ExpertStore
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
        for layer in tqdm(store.layers, desc="experts", unit="layer", disable=not progress, leave=False):
            w13 = torch.empty(E, self.act.rows(I), H, device=device, dtype=dtype)
            w2 = torch.empty(E, H, I, device=device, dtype=dtype)
            for e in range(E):
                *first, d = store.read(layer, e)
                row = 0
                for part in first:  # gate, up (or the one input projection) into w13[e] [2I | I, H], no temporary
                    w13[e, row:row + part.shape[0]].copy_(part)
                    row += part.shape[0]
                w2[e].copy_(d)
            self.w13[layer], self.w2[layer] = w13, w2
            if self.act.bias:
                b13 = torch.empty(E, 2 * I, device=device, dtype=dtype)
                b2 = torch.empty(E, H, device=device, dtype=dtype)
                for e in range(E):
                    bg, bu, bd = store.read_bias(layer, e) or ()
                    b13[e, :I].copy_(bg)
                    b13[e, I:].copy_(bu)
                    b2[e].copy_(bd)
                self.bias[layer] = (b13, b2)

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
