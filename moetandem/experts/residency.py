"""A committee's resident set: each MoE layer's slots (slots.py) and moving experts into them, either by background
swaps (`refresh` plans them, `publish_finished` between steps publishes them: swapper.py) or synchronously (`load`,
and `resize` to a budget's slot plan: the most important resident experts stay, the next most important are
admitted); the layers' substitute tables follow their resident sets (`rebuild`). What moves is counted in the
committee's StatCounters. Only the owning (engine) thread calls these."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moetandem.experts.formats import ExpertFormat
from moetandem.experts.slots import LayerSlots, rebuild_substitutes
from moetandem.experts.stats import StatCounters
from moetandem.experts.swapper import HostCopies, Swapper, SwapJob

log = logging.getLogger("moetandem.experts")


def ranking(score: torch.Tensor, norms: torch.Tensor) -> list[int]:
    """Experts by importance `score` [E] (host); before any routing is seen (all zero), by weight norm (‖E_i‖)."""
    if not score.any():
        score = norms.float()
    return torch.argsort(score, descending=True, stable=True).tolist()


class Residency:
    def __init__(self, copies: HostCopies, fmt: ExpertFormat, num_experts: int, device: torch.device,
                 counters: StatCounters) -> None:
        """copies: the experts' rows (fmt) on the host, which swaps and loads copy from."""
        self.copies, self.fmt, self.E, self.device, self.counters = copies, fmt, num_experts, device, counters
        self.expert_size = fmt.nbytes  # one slot, one swap
        self.swapper = Swapper(copies, device)
        self.layers: dict[int, LayerSlots] = {}
        self.similarity: dict[int, torch.Tensor] | None = None  # [E, E] per layer on the device (set_similarity)

    def nbytes(self) -> int:
        """Bytes of every layer's slot buffers."""
        return sum(st.buf.numel() * st.buf.element_size() for st in self.layers.values())

    def set_similarity(self, sim: dict[int, torch.Tensor] | None) -> None:
        """Expert similarity [E, E] per layer (host; None: none), kept on the device: every table is rebuilt."""
        self.similarity = None if sim is None else {l: s.to(self.device, torch.float32) for l, s in sim.items()}
        for st in self.layers.values():
            st.dirty = True

    def rebuild(self, layer: int, min_sim: float | None) -> None:
        """A layer's substitute tables from its resident set (min_sim: the policy's substitute threshold)."""
        sim = None if self.similarity is None else self.similarity[layer]
        self.layers[layer].rebuild_substitutes(sim, min_sim)

    def rebuild_dirty(self, min_sim: float | None) -> None:
        """Substitute tables follow the resident set; rebuilt between steps, so compute finds them current (the
        changed layers together, with a similarity)."""
        dirty = [(l, st) for l, st in self.layers.items() if st.dirty]
        if len(dirty) > 1 and self.similarity is not None:
            rebuild_substitutes([st for _, st in dirty], [self.similarity[l] for l, _ in dirty], min_sim)
            return
        for l, _ in dirty:
            self.rebuild(l, min_sim)

    def refresh(self, layer: int, score: torch.Tensor, margin: float = 0.0) -> None:
        """Swap in the layer's most important experts by `score` [E] (host), each only where it leads the expert
        it replaces by more than `margin` (LayerSlots.plan_swaps). Slots fetched from a lower-precision miss copy
        are freed first: an exact copy replaces them if wanted."""
        st = self.layers[layer]
        for slot in sorted(st.lossy):
            st.unpublish(st.expert_of[slot])
        for slot, expert in st.plan_swaps(score, margin):
            self.submit(layer, slot, expert)

    def submit(self, layer: int, slot: int, expert: int) -> None:
        """Start a background swap of `expert` into an unpublished slot; published by publish_finished()."""
        st = self.layers[layer]
        st.incoming[slot] = expert
        self.swapper.submit(SwapJob(owner=st, layer=layer, slot=slot, expert=expert, dst=st.buf[slot]))

    def publish_finished(self) -> None:
        """Publish the swaps whose copy finished (never waits), one table write per layer."""
        ready: dict[int, list[tuple[int, int]]] = {}  # layer -> (slot, expert) to publish, one table write each
        for job in self.swapper.poll():
            st = self.layers.get(job.layer)
            if st is not job.owner:  # a budget change replaced the layer's slots meanwhile
                continue
            st.incoming.pop(job.slot, None)
            if job.error is not None:  # the slot stays free: a later refresh plans it again
                self.counters.host.failed_swaps += 1
                continue
            pairs = ready.setdefault(job.layer, [])
            if job.expert in st.slot_of or any(e == job.expert for _, e in pairs):
                continue  # fetched on demand meanwhile: keep one copy, leave this slot free
            pairs.append((job.slot, job.expert))
            self.counters.host.swaps += 1
            self.counters.host.bytes_moved += self.expert_size
        for layer, pairs in ready.items():
            self.layers[layer].publish_many(pairs)

    def drain(self) -> None:
        """Wait for in-flight swaps and publish them (tests, budget changes, reproducible runs)."""
        self.swapper.wait()
        self.publish_finished()

    def host_flat(self, layer: int, expert: int, pin: bool = True) -> torch.Tensor:
        """The expert's row (self.fmt) in host memory (pinned on CUDA unless pin=False: see HostCopies)."""
        return self.copies.get(layer, expert, pin)

    def load(self, layer: int, slot: int, expert: int) -> None:
        """Synchronous copy into a free slot, then publish."""
        st = self.layers[layer]
        st.buf[slot].copy_(self.host_flat(layer, expert, pin=False))
        st.publish(slot, expert)
        self.counters.host.bytes_moved += self.expert_size

    def resize(self, layer: int, n: int, rank: list[int], load: Callable[[int, int, int], None]) -> None:
        """Replace a layer's slots with `n` new ones (drain() first; rebuild() after): its resident experts first
        in `rank` stay (lossy slots do not), the next in `rank` are loaded with `load(layer, slot, expert)`."""
        old = self.layers.get(layer)
        new = LayerSlots(n, self.fmt.row_numel, self.E, self.device, self.fmt.row_dtype)
        keep = [e for e in rank if old is not None and e in old.slot_of and old.slot_of[e] not in old.lossy][:n]
        for s, e in enumerate(keep):
            new.buf[s].copy_(old.buf[old.slot_of[e]])
            new.publish(s, e)
        del old
        self.layers[layer] = new
        admit = [e for e in rank if e not in new.slot_of][: n - len(keep)]
        for s, e in zip(range(len(keep), n), admit):
            try:
                load(layer, s, e)
            except Exception as err:  # the slot stays free (its expert is read as a miss); refresh retries
                self.counters.host.failed_swaps += 1
                log.warning("committee: loading expert %d of layer %d failed: %s: %s", e, layer,
                            type(err).__name__, err)
