"""ExpertStore: where each expert's bytes live. Reads one (layer, expert) at a time from the mmap'd
safetensors files, in either the hub's per-expert layout or transformers' fused [E, ...] layout."""
from __future__ import annotations

import torch

from moetandem.checkpoint import Checkpoint
from moetandem.errors import CheckpointError
from moetandem.models.family import Family
from moetandem.models.transformer import ArchArgs


class ExpertStore:
    def __init__(self, ckpt: Checkpoint, family: Family, args: ArchArgs) -> None:
        self.ckpt, self.family = ckpt, family
        self.num_experts, self.hidden, self.inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.layers = [i for i, moe in enumerate(args.moe_layers) if moe]
        self._fused: dict[int, bool] = {}
        for layer in self.layers:
            self._fused[layer] = self._check_layer(layer)

    def _check_layer(self, layer: int) -> bool:
        I, H, E = self.inter, self.hidden, self.num_experts
        per_expert = [k.format(l=layer, e=e) for e in range(E) for k in self.family.expert_keys]
        if all(self.ckpt.has(k) for k in per_expert):
            for key, want in zip(per_expert[:3], ([I, H], [I, H], [H, I])):
                if self.ckpt.shape(key) != want:
                    raise CheckpointError(f"{key} has shape {self.ckpt.shape(key)}, config.json implies {want}")
            return False
        gate_up, down = self.family.fused_keys(layer)
        if self.ckpt.has(gate_up) and self.ckpt.has(down):
            if self.ckpt.shape(gate_up) != [E, 2 * I, H] or self.ckpt.shape(down) != [E, H, I]:
                raise CheckpointError(f"fused experts of layer {layer} have shapes {self.ckpt.shape(gate_up)}, "
                                      f"{self.ckpt.shape(down)}; config.json implies {[E, 2 * I, H]}, {[E, H, I]}")
            return True
        missing = next(k for k in per_expert if not self.ckpt.has(k))
        raise CheckpointError(f"expert weights of layer {layer} are missing from the checkpoint (no {missing})")

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [I, H], up [I, H], down [H, I] of one expert, on the CPU in the checkpoint's dtype."""
        if not 0 <= expert < self.num_experts or layer not in self._fused:
            raise IndexError(f"no expert {expert} in MoE layer {layer}")
        if self._fused[layer]:
            gate_up, down = self.family.fused_keys(layer)
            gu = self.ckpt.slice(gate_up, expert)  # [2I, H]
            return gu[: self.inter], gu[self.inter:], self.ckpt.slice(down, expert)
        g, u, d = (self.ckpt.tensor(k.format(l=layer, e=expert)) for k in self.family.expert_keys)
        return g, u, d

    def expert_numel(self) -> int:
        return 3 * self.inter * self.hidden

    def total_numel(self) -> int:
        return self.expert_numel() * self.num_experts * len(self.layers)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return self.expert_numel() * torch.empty((), dtype=dtype).element_size()

    def read_flat(self, layer: int, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """One expert as a single flat buffer [gate | up | down] (so a swap is one copy)."""
        g, u, d = self.read(layer, expert)
        return torch.cat([g.reshape(-1), u.reshape(-1), d.reshape(-1)]).to(dtype)


def flat_views(buf: torch.Tensor, inter: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of flat expert buffers [..., 3*I*H] as w13 [..., 2I, H] (gate; up) and w2 [..., H, I]."""
    n = 2 * inter * hidden
    return buf[..., :n].unflatten(-1, (2 * inter, hidden)), buf[..., n:].unflatten(-1, (hidden, inter))


def return_freed_memory_to_os() -> None:
    """glibc's dynamic mmap threshold makes expert-sized temporaries (host reads, swap staging) come from heaps
    that are never trimmed, so a budgeted CPU run would keep tens of MiB above its budget. Fixing the threshold
    at 1 MiB makes every such buffer its own mapping, returned to the OS when freed. Process-wide; Linux only."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
