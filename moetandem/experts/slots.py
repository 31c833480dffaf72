"""The slot table of one MoE layer: a device buffer of flat experts and the expert -> slot map, on the device
(read by compute, graph-safe) and mirrored on the host (read by the swapper and the exact miss path).

Only the owning thread (the engine's) publishes and unpublishes; both are tensor writes on the current stream,
so they are ordered with compute and never wait on the host. A slot is unpublished before it is overwritten and
published only once its copy has finished (the swapper's job)."""
from __future__ import annotations

import itertools

import torch

from moetandem.experts.store import flat_views


class LayerSlots:
    def __init__(self, n: int, numel: int, num_experts: int, device: torch.device, dtype: torch.dtype) -> None:
        self.buf = torch.empty(n, numel, device=device, dtype=dtype)  # [n, 3*I*H] flat experts
        #: slot of each published expert, −1 if none  [E] int32 (device; what compute reads)
        self.slot_table = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        #: slot of the most similar resident expert when similarity ≥ the policy's threshold, else −1  [E]
        self.sub_slot = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        #: slot of the most similar resident expert, any similarity (a token's last resort), −1 if unknown  [E]
        self.near_slot = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        # host mirror
        self.slot_of: dict[int, int] = {}  # expert -> slot (published, usable)
        self.expert_of: list[int] = [-1] * n  # slot -> expert (−1: free or in transit)
        self.incoming: dict[int, int] = {}  # slot -> expert being copied in (slot unpublished meanwhile)
        self.lossy: set[int] = set()  # slots holding a miss fetched from a lower-precision copy (--miss-format)
        self.dirty = True  # resident set changed since sub_slot / near_slot were built
        self._no_substitutes = True  # sub_slot / near_slot hold only −1 (no similarity applied yet)

    @property
    def n(self) -> int:
        return len(self.expert_of)

    @property
    def busy(self) -> set[int]:
        """Slots with a copy in flight."""
        return set(self.incoming)

    def views(self, inter: int, hidden: int, gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [n, 2I, H] (a plain expert's [n, I, H]), w2 [n, H, I] over the slot buffer."""
        return flat_views(self.buf, inter, hidden, gated)

    def publish(self, slot: int, expert: int) -> None:
        """Make `expert` usable from `slot` (its bytes must already be there, in stream order)."""
        self.publish_many([(slot, expert)])

    def publish_many(self, pairs: list[tuple[int, int]]) -> None:
        """publish() for several (slot, expert) pairs with one table write (one launch on a GPU; no host sync)."""
        for slot, expert in pairs:
            self.slot_of[expert], self.expert_of[slot] = slot, expert
        if len(pairs) == 1:
            self.slot_table[pairs[0][1]] = pairs[0][0]  # a fill on the current stream
        elif pairs:
            dev = self.slot_table.device
            experts = torch.tensor([e for _, e in pairs], device=dev)
            self.slot_table[experts] = torch.tensor([s for s, _ in pairs], dtype=torch.int32, device=dev)
        self.dirty = True

    def unpublish(self, expert: int) -> int:
        """Stop compute from reading `expert`; returns its slot (now free to overwrite, after the kernels
        already queued on the stream)."""
        return self.unpublish_many([expert])[0]

    def unpublish_many(self, experts: list[int]) -> list[int]:
        """unpublish() for several experts with one table write (one launch on a GPU); returns their slots."""
        slots = []
        for expert in experts:
            slot = self.slot_of.pop(expert)
            self.lossy.discard(slot)
            self.expert_of[slot] = -1
            slots.append(slot)
        if len(experts) == 1:
            self.slot_table[experts[0]] = -1
        elif experts:
            self.slot_table[torch.tensor(experts, device=self.slot_table.device)] = -1
        self.dirty = True
        return slots

    def free_slots(self) -> list[int]:
        """Slots holding nothing and with no copy in flight."""
        return [s for s, e in enumerate(self.expert_of) if e < 0 and s not in self.incoming]

    def plan_swaps(self, score: torch.Tensor, margin: float = 0.0) -> list[tuple[int, int]]:
        """(slot, expert) copies that make the slots hold the top experts by `score` [E] (host): free slots first,
        then the least important published experts give way to more important ones (unpublished here, before
        anything overwrites them) whose score is more than (1 + margin) times theirs: a margin keeps a resident
        expert whose lead over the newcomer is within the window's noise (hysteresis). Nothing before any
        routing was seen."""
        if not score.any():
            return []
        sc = score.tolist()
        present = set(self.slot_of) | set(self.incoming.values())
        want = set(torch.topk(score, self.n).indices.tolist())
        out = sorted((e for e in self.slot_of if e not in want), key=lambda e: sc[e])
        into = sorted((e for e in want if e not in present), key=lambda e: -sc[e])
        free = self.free_slots()
        pairs = [(old, new) for old, new in zip(out, into[len(free):])]
        leaving = [old for old, new in itertools.takewhile(lambda p: sc[p[1]] > (1.0 + margin) * sc[p[0]], pairs)]
        slots = self.unpublish_many(leaving)
        return list(zip(free, into)) + list(zip(slots, into[len(free):len(free) + len(leaving)]))

    def resident_mask(self) -> torch.Tensor:
        return self.slot_table >= 0  # [E] bool, device

    def rebuild_substitutes(self, similarity: torch.Tensor | None, min_sim: float | None) -> None:
        """Refill sub_slot / near_slot from the resident set, with tensor ops (no host sync).
        similarity [E, E] on the device (None: no substitutes); min_sim None: no thresholded substitutes."""
        if similarity is not None:
            return rebuild_substitutes([self], [similarity], min_sim)
        self.dirty = False
        if not self._no_substitutes:  # the tables stay all −1 until a similarity comes
            self.sub_slot.fill_(-1)
            self.near_slot.fill_(-1)
            self._no_substitutes = True


def rebuild_substitutes(layers: list[LayerSlots], similarity: list[torch.Tensor], min_sim: float | None) -> None:
    """LayerSlots.rebuild_substitutes for several layers (each with its similarity [E, E]) in one set of ops over
    [L', E, E], then two table copies per layer: a refresh changes every layer's resident set at once."""
    tables = torch.stack([st.slot_table for st in layers])  # [L', E]
    sim = torch.stack(similarity).masked_fill(~(tables >= 0)[:, None, :], -torch.inf)  # row e: candidates for e
    best_sim, best = sim.max(dim=2)  # [L', E]
    near = torch.where(best_sim > -torch.inf, tables.gather(1, best), -1)  # [L', E]
    sub = torch.where(best_sim >= min_sim, near, -1) if min_sim is not None else torch.full_like(near, -1)
    for i, st in enumerate(layers):
        st.near_slot.copy_(near[i])
        st.sub_slot.copy_(sub[i])
        st.dirty, st._no_substitutes = False, False
