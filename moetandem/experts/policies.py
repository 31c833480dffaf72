"""What to do when the router picks an expert that is not resident.

A `MissPolicy` maps one layer's routing to slots with tensor ops: (expert_ids [T, k], weights [T, k], the
layer's device tables slot_table [E] / sub_slot [E] / near_slot [E]) -> `Assignment` (slot ids [T, k], weights'
[T, k], and, for a step that may use the host, which kept misses still need it). The policies by name:

| name | skip below τ | substitute | remaining misses, eager step | … inside a CUDA graph | refresh |
|---|---|---|---|---|---|
| exact / auto, fetch, host | – | – | fetch / host compute (cost model for auto) | (never captured) | yes |
| balanced | τ=0.05 | similarity ≥ 0.5 | fetch / host (cost model) | deferred (zero-copy when mapped) | yes |
| fast | τ=0.1, resident too | any resident | fetch / host (cost model) | deferred | yes |
| substitute | – | any resident | fetch / host (cost model) | deferred | yes |
| skip | τ (default 0.1) | – | fetch / host (cost model) | deferred | yes |
| those four + --miss-reads N | ″ | ″ | ≤ N per token (largest weight), rest deferred | the same, zero-copy | yes |
| lru | – | – | fetch into the least recently used slot | (never captured) | no |
| static | every miss | – | – | – | no |
| host-only | – | – | host compute | (never captured) | no |

Graph-safe policies (`graph=True`: balanced, fast, substitute, skip, static) may be captured into a CUDA graph:
there, a miss the host would have to fetch or compute is deferred (weight 0 this step, the token's kept weights
renormalised to the original total, as for a skip); its importance still counts, so the next refresh brings it
in. Eager steps (CPU, prefill, eager decode) keep the exact fallback, so quality off the graph is unchanged.
`exact="defer"` defers always. A token never loses all its experts: its top assignment is kept, from its slot, a
substitute, the host (eager) or the nearest resident expert (deferring); with no similarity and nothing resident
a deferring step leaves the token's MoE output 0.

τ is a share of the token's routed weight (its top-k weights' sum), not an absolute weight: the same rule for
routers that renormalise their top-k and for those that do not or scale it (OLMoE, Qwen2-MoE, DeepSeek-V2/V3,
Gemma-4). Until 2026-12-01 it was absolute, which skipped many misses of such routers (on the random OLMoE
bench shape about two thirds, on the random Gemma-4 shape nearly all).

`max_reads` caps what a token's misses cost: each miss read exactly (zero-copy over the host bus, or fetched) costs
~100x a resident read, so a budget with a low hit rate is bound by the bus. With it, at most N of a token's
remaining misses per layer stay exact, those of largest gate weight, on eager and in-graph steps alike; the others
are deferred (counted as such). N=0 defers every remaining miss, but a token that would keep nothing still gets its
top assignment back as above (from the host on an exact-capable step: one read). Default None: no cap.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from moetandem.errors import InvalidRequestError
from moetandem.experts.costs import CostModel  # noqa: F401 (re-exported: bench/miss_costs.py)
from moetandem.experts.slots import LayerSlots

log = logging.getLogger("moetandem.experts")

POLICIES = ("auto", "fetch", "host", "substitute", "skip")
BASELINES = ("lru", "static", "host-only")
FIDELITY = ("exact", "balanced", "fast")
EXACT = ("auto", "fetch", "host", "defer")


@dataclass
class Assignment:
    """A policy's decision for one layer's step."""

    slots: torch.Tensor  # [T, k] int32 slot to compute from; −1: nothing on the device
    weights: torch.Tensor  # [T, k] float32 weights' (0: skipped or deferred)
    exact: torch.Tensor | None  # [T, k] bool kept misses the host must fetch or compute; None if graph-safe
    counts: torch.Tensor  # [6] int64 hits, misses, substitutions, skips, deferred, miss reads (stats.DEVICE_FIELDS)


@dataclass(frozen=True)
class MissPolicy:
    """skip_below: drop routed experts whose gate weight is below τ times the token's routed weight (its top-k
    weights' sum: 1 for routers that renormalise) and renormalise the rest; applies to
    non-resident experts, and to resident ones too when skip_resident. substitute_min_sim: replace a miss by the
    most similar resident expert when their similarity is at least this (None: never substitute).
    exact: what a remaining miss gets: "fetch" (copy it in), "host" (compute on the host), "auto" (cost model),
    "defer" (weight 0 this step: no host sync). graph: inside a CUDA graph, remaining misses are deferred."""

    skip_below: float = 0.0
    skip_resident: bool = False
    substitute_min_sim: float | None = None
    exact: str = "auto"
    refresh: bool = True  # committee refreshed from importance (False: static / LRU baselines)
    lru: bool = False  # fetched experts evict the least recently used slot (mixtral-offloading)
    graph: bool = False  # may be captured into a CUDA graph: there, misses left for the host are deferred
    #: per token and layer, at most this many remaining misses stay exact (largest gate weight first); the others
    #: are deferred. Approximate policies only (graph-safe and refreshed); None: every remaining miss is exact
    max_reads: int | None = None

    def __post_init__(self) -> None:
        if self.exact not in EXACT:
            raise InvalidRequestError(f"unknown miss handling {self.exact!r}; choose one of {', '.join(EXACT)}")
        if self.max_reads is None:
            return
        if isinstance(self.max_reads, bool) or int(self.max_reads) != self.max_reads or self.max_reads < 0:
            raise InvalidRequestError(f"the miss-read cap must be an integer >= 0, got {self.max_reads!r}")
        if not (self.graph and self.refresh and self.exact == "auto"):
            raise InvalidRequestError("a miss-read cap defers misses, which exact policies and the baselines never "
                                      "do; use it with balanced, fast, substitute or skip")

    @property
    def graph_safe(self) -> bool:
        """True when a step may run without the host (no fetch, no host compute), i.e. be graph-captured."""
        return self.graph or self.exact == "defer"

    @staticmethod
    def from_fidelity(fidelity: str) -> "MissPolicy":
        if fidelity == "exact":
            return MissPolicy()
        if fidelity == "balanced":
            return MissPolicy(skip_below=0.05, substitute_min_sim=0.5, graph=True)
        if fidelity == "fast":
            return MissPolicy(skip_below=0.1, skip_resident=True, substitute_min_sim=-1.0, graph=True)
        raise InvalidRequestError(f"unknown fidelity {fidelity!r}; choose one of {', '.join(FIDELITY)}")

    @staticmethod
    def named(policy: str, tau: float = 0.1) -> "MissPolicy":
        """Single policies and the built-in baselines, by name."""
        table = {
            "auto": MissPolicy(), "fetch": MissPolicy(exact="fetch"), "host": MissPolicy(exact="host"),
            "substitute": MissPolicy(substitute_min_sim=-1.0, graph=True),
            "skip": MissPolicy(skip_below=tau, graph=True),
            "lru": MissPolicy(exact="fetch", refresh=False, lru=True),
            "static": MissPolicy(skip_below=float("inf"), refresh=False, graph=True),
            "host-only": MissPolicy(exact="host", refresh=False),
        }
        if policy not in table:
            raise InvalidRequestError(f"unknown policy {policy!r}; choose one of {', '.join(table)}")
        return table[policy]

    def assign(self, expert_ids: torch.Tensor, weights: torch.Tensor, slots: LayerSlots,
               in_graph: bool = False) -> Assignment:
        """Tensor ops only (no host sync): map routing to slots and weights'. in_graph: the step is being
        captured into a CUDA graph (remaining misses are deferred; only for graph-safe policies)."""
        defer = self.exact == "defer" or (in_graph and self.graph)
        res = slots.slot_table[expert_ids]  # [T, k] int32, −1 = miss
        if self.skip_below <= 0 and self.substitute_min_sim is None and not defer and self.max_reads is None:
            # exact policies: every assignment kept as routed, misses left to the exact path. The general path
            # below gives the same result; this one is a handful of ops instead of ~40 (eager steps launch each)
            hit = res >= 0  # [T, k]
            n_hit = hit.sum()
            zero = torch.zeros_like(n_hit)
            counts = torch.stack([n_hit, hit.numel() - n_hit, zero, zero, zero, hit.numel() - n_hit])  # [6]
            return Assignment(slots=res, weights=weights.float(), exact=~hit, counts=counts)
        sub = slots.sub_slot[expert_ids] if self.substitute_min_sim is not None else torch.full_like(res, -1)
        near = slots.near_slot[expert_ids[:, 0]] if defer else torch.full_like(res[:, 0], -1)  # [T]
        fn = _general_fast if res.is_cuda else _general
        slot, w, exact, counts = fn(res, sub, near, weights, self.skip_below, self.skip_resident, defer,
                                    self.max_reads)
        return Assignment(slots=slot, weights=w, exact=None if defer else exact, counts=counts)


def _general(res: torch.Tensor, sub: torch.Tensor, near: torch.Tensor, weights: torch.Tensor, skip_below: float,
             skip_resident: bool, defer: bool, max_reads: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MissPolicy.assign's general rule as one function of tensors (so inductor can fuse it on CUDA): res/sub [T, k]
    slot or −1, near [T] the top expert's nearest resident slot (deferring) or −1 -> slots, weights', exact, counts.
    max_reads: per token, at most this many misses left for the host stay exact (largest weight first)."""
    hit = res >= 0  # [T, k]
    g = weights.float()  # [T, k]
    # τ is a share of the token's routed weight: the same rule for routers that renormalise their top-k (where it is
    # the weight itself) and for those that do not or scale it (OLMoE, Qwen2-MoE, DeepSeek-V2: top-k of a softmax
    # over every expert; DeepSeek-V3: x routed_scaling_factor; Gemma-4: x per-expert scale). An absolute τ skipped
    # 26,787 of 26,867 misses on the Gemma-4 bench shape, whose weights are all below 0.05
    mag = g.abs()
    small = mag < skip_below * mag.sum(dim=1, keepdim=True)
    dropped = small if skip_resident else small & ~hit  # skipped below τ
    subbed = ~hit & ~dropped & (sub >= 0)
    exact = ~hit & ~dropped & ~subbed  # misses left for the host (or deferred)
    if max_reads is not None and not defer:  # the rest of the token's misses are deferred like a deferring step's
        exact = exact & (_reads_ahead(exact, g) < max_reads)
    slot = torch.where(hit, res, torch.where(subbed, sub, -1))  # [T, k]
    keep = (hit & ~dropped) | subbed | (exact & (not defer))
    # never drop a whole token: its top assignment comes back from its slot, a substitute, the nearest
    # resident expert (graph-safe) or the host (exact policies)
    none = ~keep.any(dim=1)  # [T]
    top_sub = torch.where(sub[:, 0] >= 0, sub[:, 0], near)  # [T]
    top_slot = torch.where(hit[:, 0], res[:, 0], top_sub)  # [T]
    top_exact = ~hit[:, 0] & (top_sub < 0) & (not defer)  # [T]
    top_keep = (top_slot >= 0) | top_exact
    slot = torch.cat([torch.where(none, top_slot, slot[:, 0])[:, None], slot[:, 1:]], dim=1)
    keep = torch.cat([(keep[:, 0] | (none & top_keep))[:, None], keep[:, 1:]], dim=1)
    subbed = torch.cat([(subbed[:, 0] | (none & ~hit[:, 0] & (top_sub >= 0)))[:, None], subbed[:, 1:]], dim=1)
    # a restored top is exact only when the host serves it (a deferring step's came from a resident expert)
    exact = torch.cat([torch.where(none, top_exact, exact[:, 0])[:, None], exact[:, 1:]], dim=1) & keep
    dropped = dropped & ~keep
    # renormalise kept weights to each token's original total (a no-op for tokens that kept everything)
    total = g.sum(dim=1, keepdim=True)  # [T, 1]
    kept = (g * keep).sum(dim=1, keepdim=True)  # [T, 1]
    w = torch.where(keep, g * (total / kept.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)  # [T, k]
    counts = torch.stack([hit.sum(), (~hit).sum(), subbed.sum(), dropped.sum(),
                          (~keep & ~dropped).sum(), exact.sum()])  # [6]
    return slot, w, exact, counts


def _reads_ahead(exact: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[T, k] how many of the token's exact misses rank before each assignment: larger weight first, ties by column.
    A pairwise count over the row ([T, k, k], k is small): fixed shapes and no sort, so inductor fuses it."""
    col = torch.arange(g.shape[1], device=g.device)  # [k]
    gi, gj = g[:, :, None], g[:, None, :]  # [T, k, 1] another assignment i, [T, 1, k] this one j
    before = (gi > gj) | ((gi == gj) & (col[:, None] < col[None, :]))  # [T, k, k] i ranks before j
    return (before & exact[:, :, None]).sum(dim=1)  # [T, k]


_fast: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _general_fast(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """On CUDA, the ~40 small ops of _general fused into a few kernels: launched one by one inside a CUDA graph
    they made balanced half as fast as exact (227 vs 455 tok/s, OLMoE-1B-7B shape at 50%). Where inductor cannot
    compile (no compiler, an unsupported platform), the eager rule, with one warning."""
    fn = _fast.get("fn")
    if fn is None:
        fn = _fast["fn"] = torch.compile(_general, dynamic=None)
    if fn is _general:
        return _general(*args)
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: the same rule, eagerly
        log.warning("compiling the committee's routing rule failed (%s); it runs op by op", type(err).__name__)
        _fast["fn"] = _general
        return _general(*args)
