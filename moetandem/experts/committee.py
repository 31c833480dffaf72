"""Parameter Committee: under a byte budget, a resident set of experts in fixed device slots, scored by recent
importance and refreshed asynchronously; misses handled by a MissPolicy.

The parts: slots.py (slot buffers + device expert->slot tables), residency.py (each layer's slots: swaps planned
and published, loads, resizing to budget.py's slot plan, substitute tables), scorer.py (importance on the device),
swapper.py (pinned host copies, copy stream, worker thread), policies.py (routing -> slots with tensor ops),
misses.py (the host path of exact policies), host_misses.py (--miss-compute host: a CPU thread computes a graph
step's exact misses), executor.py (runs assignments over a slot buffer).

Who does the per-step host work (polling finished swaps and publishing them, counting tokens, refreshing):
- `graph_safe` (a graph-safe policy, a CUDA device with the graph-safe executor, and an engine that calls
  `after_step()`): `after_step()` does it; compute() only enqueues device work when it is being captured (then
  misses the host would handle are deferred); eager steps (prefill) still fetch or host-compute them.
- otherwise (CPU, exact policies, or an engine that never calls after_step): compute() does it per layer before
  it maps the routing, as it always has; `after_step()` then only publishes finished swaps.
`graph_safe` turns True at the first `after_step()` call, so an engine that never makes it still refreshes."""
from __future__ import annotations

import torch
from tqdm import tqdm

from moetandem.errors import InvalidRequestError
from moetandem.experts.costs import CostModel
from moetandem.experts.budget import check_plan, slot_plan, total_expert_bytes
from moetandem.experts.executor import device_format_supported, device_path_supported, run_experts
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.host_misses import host_misses_for
from moetandem.experts.mapped import check_tier, map_experts, maps_experts, swap_sources
from moetandem.experts.misses import check_miss_format, resolve_exact
from moetandem.experts.policies import MissPolicy
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.residency import Residency, ranking
from moetandem.experts.rows import ExpertRows
from moetandem.experts.scorer import SCORES, Scorer
from moetandem.experts.stats import CommitteeStats, StatCounters
from moetandem.experts.store import ExpertStore, return_freed_memory_to_os
from moetandem.experts.swapper import HostCopies, pinned_cap
from moetandem.models.expert_activation import ExpertActivation

__all__ = ["SCORES", "CommitteeProvider", "CommitteeStats"]


def _capturing(x: torch.Tensor) -> bool:
    """True while this step is being captured into a CUDA graph (compute must not touch the host). Under
    torch.compile on CUDA the step being traced is the one graphs.DecodeGraphs captures: True, decided at trace
    time (dynamo puts is_current_stream_capturing() into the graph as a node, and branching on it broke the graph
    in every MoE layer: the rest of each layer became a frame of its own, and layers past the 8th ran eagerly)."""
    if torch.compiler.is_compiling():
        return x.is_cuda
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class CommitteeProvider(ExpertProvider):
    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, budget_bytes: int,
                 policy: MissPolicy, top_k: int, similarity: dict[int, torch.Tensor] | None = None,
                 norms: dict[int, torch.Tensor] | None = None, slots: dict[int, int] | None = None,
                 refresh_every: int = 16, window: int = 256, score: str = "importance", progress: bool = True,
                 async_swaps: bool = True, activation: ExpertActivation | None = None,
                 fmt: ExpertFormat | None = None, miss_fmt: ExpertFormat | None = None,
                 miss_compute: str = "gpu", miss_tier: str = "host", swap_margin: float = 0.0) -> None:
        """async_swaps=False waits for each refresh's swaps before going on: slower, but the resident set at
        every step no longer depends on thread timing (reproducible quality measurements). activation: the
        experts' (default: the store's); with biases, each flat slot ends with them. fmt: how a slot holds an
        expert (default bf16: the compute dtype); slots, pinned copies, swaps and the budget count its bytes.
        miss_fmt: the format of the host copy a miss reads (--miss-format; approximate policies over bf16 slots
        only): the mapped host experts, host computes and fetches use it; swaps still copy `fmt` rows.
        miss_compute="host" (--miss-compute, experimental): where the experts are mapped, decode steps compute their
        exact misses on the CPU meanwhile instead of reading them over the bus (host_misses.py).
        miss_tier="device" (--miss-tier): the miss_fmt copy of every expert lives on `device` beside the slots and
        counts in budget_bytes (the slots get what it leaves); misses read it there, never over the host bus.
        swap_margin: a refresh swaps an expert in only where its score beats the one it replaces by more than
        (1 + swap_margin) times (--swap-margin; 0: any lead)."""
        if policy.substitute_min_sim is not None and similarity is None:
            raise InvalidRequestError("substitution needs expert similarity: run `moetandem calibrate MODEL` first")
        if refresh_every < 1:
            raise InvalidRequestError(f"--refresh-every must be at least 1 token, got {refresh_every}")
        self.store, self.device, self.dtype, self.policy, self.top_k = store, device, dtype, policy, top_k
        return_freed_memory_to_os()
        self.score_kind, self.refresh_every, self.window, self.async_swaps = score, refresh_every, window, async_swaps
        self.swap_margin = swap_margin
        #: True when a routing hook reports the original routing through observe() (the group gate routes to
        #: local experts, but importance must keep following what the model asks for)
        self.external_observe = False
        self.E, self.I, self.H = store.num_experts, store.inter, store.hidden
        self.act = activation or store.activation
        self.fmt = fmt or ExpertFormat("bf16", self.I, self.H, dtype, bias=self.act.bias)
        self.expert_size = self.fmt.nbytes  # one slot, one swap
        self.miss_fmt = check_miss_format(miss_fmt, self.fmt, policy)  # None: misses read `fmt` rows
        self.norms = norms or {l: torch.ones(self.E) for l in store.layers}
        self.scorer = Scorer(score, window, store.layers, self.E, self.norms, device)
        self.counters = StatCounters(device)
        self.cost = CostModel(device, dtype, self.I, self.H, None if self.host_fmt.dense else self.host_fmt.nbytes)
        #: the executor's device path (grouped GEMM over the slot buffers, no host sync); else the per-slot loop
        self.grouped = (device_path_supported(device, dtype, (self.I, self.H), self.act) if self.fmt.dense
                        else device_format_supported(self.fmt.name, device, dtype, (self.I, self.H)))
        total = total_expert_bytes(store, dtype, self.expert_size)
        self.rows = ExpertRows(store, self.fmt, keep=True, progress=progress, device=device)
        #: --miss-tier device: the miss copies live on the device, inside the budget
        self.tier = check_tier(miss_tier, self.miss_fmt, device, dtype, self.act, policy)
        maps = self.tier or maps_experts(device, dtype, self.act, policy,
                                         total_expert_bytes(store, dtype, self.host_fmt.nbytes))
        #: the miss format's rows (quantized once; kept on the host unless the mapped experts hold them, whose
        #: rows are quantized on the device as they are copied in: on the CPU, the Qwen3.5 shape's load took 48 s)
        self.miss_rows = None if self.miss_fmt is None else ExpertRows(store, self.miss_fmt, keep=not maps,
                                                                       progress=progress,
                                                                       device=device if maps else "cpu")
        #: exact misses read zero-copy from pinned host memory by the fused kernel (no copy, no host sync, so the
        #: step stays one CUDA graph): every expert pinned once (in host_fmt), when it fits the pinned-memory cap;
        #: with the device tier the same slot ids n + e point at the copy on the device
        self.mapped = (map_experts(self.miss_rows or self.rows, list(store.layers), self.E, self.host_fmt,
                                   device.type == "cuda", progress, device=device if self.tier else "cpu")
                       if maps else None)
        self.tier_bytes = sum(b.numel() * b.element_size() for b in self.mapped.values()) if self.tier else 0
        #: --miss-compute host: the host worker and the handoff (None: misses as above)
        self.host_misses = host_misses_for(miss_compute, self.mapped, top_k, self.H, dtype, device, self.host_fmt,
                                           self.act)
        copies = HostCopies(self.rows, pin=device.type == "cuda", cap=pinned_cap(total),
                            mapped=swap_sources(self.rows, list(store.layers), self.E, self.fmt, self.mapped,
                                                self.host_fmt, device.type == "cuda", progress))
        #: each layer's slots and moving experts into them (layers, swapper, copies: the residency's own)
        self.residency = Residency(copies, self.fmt, self.E, device, self.counters)
        self.layers, self.swapper, self.copies = self.residency.layers, self.residency.swapper, copies
        self.similarity = similarity
        self.last_use = {l: torch.full((self.E,), -1, dtype=torch.long) for l in store.layers}  # LRU ticks (host)
        self.since_refresh = {l: 0 for l in store.layers}  # tokens since the layer's last refresh
        self._pending = {l: 0 for l in store.layers}  # tokens computed eagerly since the last after_step
        self._stepped = False  # after_step() has been called: the engine keeps the step contract
        self._settled = False  # compute did this step's host work itself (eager committee)
        self.tick = 0
        self.set_budget(budget_bytes, slots, progress)

    def close(self) -> None:
        """Stop the committee's host-miss worker, if any (swaps need nothing: their thread ends with the committee)."""
        if self.host_misses is not None:
            self.host_misses.close()

    # ------------------------------------------------------------------ interface
    @property
    def host_fmt(self) -> ExpertFormat:
        """The format of the host copies misses read (the mapped experts, host computes, fetches)."""
        return self.miss_fmt or self.fmt

    @property
    def graph_safe(self) -> bool:
        # grouped: the executor's device path (CUDA bf16; tests force it on the CPU); external_observe: a routing
        # hook (moetandem.gating) is attached, and it syncs with the host itself
        safe = self.policy.graph_safe or self.mapped is not None
        return safe and self._stepped and self.grouped and not self.external_observe

    @property
    def stats(self) -> CommitteeStats:
        """Counters so far (reads the device counts: call between steps). With mapped experts every miss read is
        a zero-copy read of its host copy (counted per assignment, as the direct path reads it)."""
        s = self.counters.snapshot()
        if self.mapped is not None and not self.tier:  # the device tier's reads never cross the bus
            s.miss_bytes += s.miss_reads * self.host_fmt.nbytes
        if self.host_misses is not None:
            self.host_misses.add_stats(s, self.host_fmt.nbytes)
        return s

    @property
    def similarity(self) -> dict[int, torch.Tensor] | None:
        return self._similarity

    @similarity.setter
    def similarity(self, sim: dict[int, torch.Tensor] | None) -> None:
        """Expert similarity [E, E] per layer (host); kept on the device for the substitute tables."""
        self._similarity = sim
        self.residency.set_similarity(sim)

    def resident_mask(self, layer: int) -> torch.Tensor:
        return self.layers[layer].resident_mask()  # [E] bool, device

    def importance(self, layer: int) -> torch.Tensor:
        """[E] current importance scores on the host (syncs)."""
        return self.scorer.scores(layer)

    def expert_bytes(self) -> int:
        return self.residency.nbytes() + self.tier_bytes

    # ------------------------------------------------------------------ compute
    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        st = self.layers[layer]
        if not self.external_observe:
            self.scorer.observe(layer, x, expert_ids, weights)
        capturing = _capturing(x)
        if not capturing:
            self.tick += 1
            if self.graph_safe:
                self._pending[layer] += x.shape[0]
            else:
                self._settle(layer, x.shape[0])
        if st.dirty:
            self.residency.rebuild(layer, self.policy.substitute_min_sim)
        asg = self.policy.assign(expert_ids, weights, st, in_graph=capturing and self.mapped is None)
        self.counters.add(asg.counts)
        v = self.fmt.views(st.buf)  # w13 [n, 2I, H'], w2 [n, H, I'] (+ scales, biases [n, 2I], [n, H])
        fmt = self.fmt.name
        if self.mapped is not None:  # exact misses: expert e read from pinned host memory as slot n + e
            hm, miss = self.host_misses, None
            if hm is not None and asg.exact is not None and hm.takes(x):  # ... or computed by the host meanwhile
                miss = torch.where(asg.exact, expert_ids.int(), -1)  # [T, k] expert ids for the host
                slots = hm.publish(layer, x, miss, asg.slots, st.n)  # the hits (misses -1)
            else:
                slots = asg.slots if asg.exact is None else torch.where(asg.exact, st.n + expert_ids.int(), asg.slots)
            hv = self.host_fmt.views(self.mapped[layer])  # over [E, row]
            mapped = (hv.w13, hv.w2, *(hv.bias or ()))
            out = run_experts(x, slots, asg.weights, v.w13, v.w2, True, mapped=mapped, act=self.act, bias=v.bias,
                              fmt=fmt, scales=v.scales, host_scales=hv.scales, host_fmt=self.host_fmt.name)
            return out if miss is None or hm is None else hm.collect(layer, out, asg.weights, miss)
        host = resolve_exact(self, layer, x, expert_ids, asg) if asg.exact is not None else None
        return run_experts(x, asg.slots, asg.weights, v.w13, v.w2, self.grouped, host, act=self.act, bias=v.bias,
                           fmt=fmt, scales=v.scales)

    def observe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Score the model's own routing (ids/weights [T, k]) when a routing hook changes what is computed."""
        self.external_observe = True
        self.scorer.observe(layer, x, ids, w)

    # ------------------------------------------------------------------ per-step host work
    def after_step(self, tokens: int | None = None) -> None:
        """Between steps: publish finished swaps; when graph-safe, count the step's tokens and refresh the layers
        that are due. tokens: the step's tokens where compute did not see them (a graph replay; default 1)."""
        counted, self._settled = self._settled, False  # compute already counted this step's tokens
        self._stepped = True
        if self.host_misses is not None:
            self.host_misses.check()  # a timed-out handoff: misses zero-copy from now on
        self.residency.publish_finished()
        due = []
        for l in self.store.layers:
            n, self._pending[l] = self._pending[l], 0
            if self.graph_safe and not counted and self._count(l, n or (tokens or 1)):
                due.append(l)
        if due:  # one host read of every due layer's scores
            scores = self.scorer.scores_many(due).cpu()  # [L', E]
            for l, score in zip(due, scores):
                self.refresh(l, score)
        if not self.async_swaps:
            self.drain()
        self.residency.rebuild_dirty(self.policy.substitute_min_sim)

    def _settle(self, layer: int, tokens: int) -> None:
        """The per-layer host work of an eager committee, at the start of its compute."""
        self._settled = True
        self.residency.publish_finished()
        if self._count(layer, tokens):
            self.refresh(layer)
        if not self.async_swaps:
            self.drain()
        self.residency.rebuild_dirty(self.policy.substitute_min_sim)

    def _count(self, layer: int, tokens: int) -> bool:
        """Count a layer's tokens; True when it is due for a refresh."""
        self.since_refresh[layer] += tokens
        if self.policy.refresh and self.since_refresh[layer] >= self.refresh_every:
            self.since_refresh[layer] = 0
            return True
        return False

    # ------------------------------------------------------------------ moving experts
    def refresh(self, layer: int, score: torch.Tensor | None = None) -> None:
        """Schedule swaps so the slots hold the most important experts of the window. score: [E] host, if read."""
        self.residency.refresh(layer, self.scorer.scores(layer) if score is None else score, self.swap_margin)

    def drain(self) -> None:
        """Wait for in-flight swaps and publish them (tests, budget changes, reproducible runs)."""
        self.residency.drain()

    def host_flat(self, layer: int, expert: int, pin: bool = True) -> torch.Tensor:
        """The expert's row (self.fmt) in host memory (pinned on CUDA unless pin=False: see HostCopies)."""
        return self.residency.host_flat(layer, expert, pin)

    def load(self, layer: int, slot: int, expert: int) -> None:
        """Synchronous copy into a free slot, then publish."""
        self.residency.load(layer, slot, expert)

    # ------------------------------------------------------------------ budget and slots
    def plan_slots(self, budget_bytes: int) -> dict[int, int]:
        return slot_plan(budget_bytes, self.store.layers, self.E, self.top_k, self.expert_size, self.tier_bytes,
                         self.host_fmt.name if self.tier else None)

    def set_budget(self, budget_bytes: int, slots: dict[int, int] | None = None, progress: bool = False) -> None:
        """Resize the committee now (between steps): shrinking evicts the least important, growing admits the
        most important experts. Slot buffers are reallocated: CUDA graphs captured before must be dropped."""
        plan = slots or self.plan_slots(budget_bytes)
        check_plan(plan, budget_bytes, self.expert_size, self.tier_bytes)
        self.drain()
        for l in tqdm(self.store.layers, desc="committee", unit="layer", disable=not progress, leave=False):
            rank = ranking(self.scorer.scores(l), self.norms[l])  # before any routing: by weight norm
            self.residency.resize(l, plan[l], rank, self.load)
            self.residency.rebuild(l, self.policy.substitute_min_sim)
        self.budget_bytes = budget_bytes
