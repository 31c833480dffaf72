"""Expert parallelism over the ranks of a torch.distributed group: each rank holds only its share of the routed
experts of every MoE layer; the non-expert layers are replicated (every rank runs them on the same tokens).

Sharding: expert e lives on rank e % world (round robin, so experts that are hot together — often neighbours in
id — land on different ranks). Rank r holds experts r, r + world, ... as local slots 0, 1, ...

Dispatch and combine. Because the non-expert layers are replicated, every rank already holds every token's
hidden state and routing when the MoE layer runs: the "all-gather" half of all-gather + reduce-scatter is free,
and no all-to-all dispatch (with its count exchange, a host sync) is needed. Each rank computes the assignments
routed to its experts and one all-reduce combines:
  exact=True   all-reduce the per-assignment outputs y [T, k, H] (each entry is produced by exactly one rank, the
               others add exact zeros), then the weighted sum over k in the single-process order: bit-identical
               to one process (CPU), k× the bytes of
  exact=False  all-reduce of the rank's partial weighted sums [T, H] (one [T, H] all-reduce per MoE layer, the
               order of the sum over ranks differs from one process: equal within rounding). The default on CUDA.
For decode batches of a few dozen tokens both are one small collective per layer. An all-to-all (each rank sends
each token only to the ranks of its k experts) pays off only when attention is data-parallel (each rank holding
different requests); that is the next step for large prefill batches, not needed for the replicated layout.

Per-rank committee: when a rank's share still does not fit, the rank's experts are a `ShardStore` (an
ExpertStore view of the local experts, local ids) and `inner` is any provider over it — e.g. a CommitteeProvider
built with the per-rank budget; the ranks' committees are independent."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moetandem.experts.executor import device_path_supported, run_experts
from moetandem.experts.provider import ExpertProvider, group_by_expert
from moetandem.experts.store import ExpertStore
from moetandem.models.layers import expert_ffn


def owner(expert: int, world: int) -> int:
    """The rank that holds `expert`."""
    return expert % world


def local_experts(rank: int, world: int, num_experts: int) -> list[int]:
    """Global ids of the experts rank `rank` holds, in local slot order."""
    return list(range(rank, num_experts, world))


class ShardStore:
    """An ExpertStore view of one rank's experts: local ids 0..n-1 read the rank's global experts. Lets any
    provider (resident, committee with a per-rank budget) run on the shard without knowing about ranks."""

    def __init__(self, store: ExpertStore, rank: int, world: int) -> None:
        self.base, self.rank, self.world = store, rank, world
        self.global_ids = local_experts(rank, world, store.num_experts)
        self.ckpt, self.family = store.ckpt, store.family
        self.num_experts, self.hidden, self.inter = len(self.global_ids), store.hidden, store.inter
        self.layers = store.layers

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base.read(layer, self.global_ids[expert])

    def __getattr__(self, name: str) -> Any:  # anything else (dtype, paths) is the base store's
        return getattr(self.base, name)


class ExpertParallelProvider(ExpertProvider):
    """Σ_j w_j · E_{id_j}(x) with the experts sharded over `group`. Every rank must call compute() for the same
    layers in the same order with the same x / ids / weights (the replicated layout guarantees it)."""

    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, group: Any = None,
                 exact: bool | None = None, inner: Callable[[ShardStore], ExpertProvider] | None = None,
                 progress: bool = True) -> None:
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed initialised (init_process_group) first")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.num_experts = store.num_experts
        self.shard = ShardStore(store, self.rank, self.world)
        n, I, H = self.shard.num_experts, store.inter, store.hidden
        to_local = torch.full((store.num_experts,), -1, dtype=torch.long)
        to_local[torch.tensor(self.shard.global_ids, dtype=torch.long)] = torch.arange(n)
        self.to_local = to_local.to(device)  # [E] local slot or -1
        self.inner = inner(self.shard) if inner is not None else None
        self.exact = (device.type != "cuda") if exact is None else exact
        if self.inner is not None:
            self.exact = False  # a committee's miss policy decides its own rows: partial sums only
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        if self.inner is None:
            for layer in store.layers:
                w13 = torch.empty(n, 2 * I, H, device=device, dtype=dtype)  # [n, 2I, H] this rank's experts only
                w2 = torch.empty(n, H, I, device=device, dtype=dtype)  # [n, H, I]
                for s in range(n):
                    g, u, d = self.shard.read(layer, s)
                    w13[s, :I].copy_(g)
                    w13[s, I:].copy_(u)
                    w2[s].copy_(d)
                self.w13[layer], self.w2[layer] = w13, w2
        self.grouped = device_path_supported(device, dtype, (I, H))
        # NCCL collectives can be captured in a CUDA graph; gloo (CPU) never is
        self.graph_safe = self.grouped and not self.exact and (self.inner is None or self.inner.graph_safe)
        self._mask = (self.to_local >= 0)  # [E]

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        slots = self.to_local[expert_ids]  # [T, k] local slot, -1 on another rank
        if self.exact:
            y = self._assignments(layer, x, slots)  # [T, k, H], zeros where another rank computes
            dist.all_reduce(y, group=self.group)
            return (y * weights.to(y.dtype)[..., None]).sum(dim=1)  # [T, H], the single-process order
        w = torch.where(slots >= 0, weights, torch.zeros_like(weights))  # [T, k] this rank's share
        if self.inner is not None:
            part = self.inner.compute(layer, x, slots.clamp_min(0), w)  # [T, H]
        else:
            part = run_experts(x, slots, w, self.w13[layer], self.w2[layer], self.grouped)  # [T, H]
        dist.all_reduce(part, group=self.group)
        return part

    def _assignments(self, layer: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Per-assignment outputs of this rank's experts [T, k, H] (the loop of experts/executor.loop_moe)."""
        w13, w2 = self.w13[layer], self.w2[layer]
        n = w13.shape[0]
        T, k = slots.shape
        live = slots >= 0  # [T, k]
        groups = group_by_expert(torch.where(live, slots, n), n + 1)  # other ranks' rows sort last
        xs = x[groups.token]  # [T*k, H]
        ys = torch.zeros_like(xs)
        start = 0
        for s, c in enumerate(groups.counts[:n].tolist()):
            if c:
                ys[start:start + c] = expert_ffn(xs[start:start + c], w13[s], w2[s])
                start += c
        y = torch.empty_like(ys)
        y[groups.order] = ys
        return y.view(T, k, -1)

    def expert_bytes(self) -> int:
        if self.inner is not None:
            return self.inner.expert_bytes()
        return sum(t.numel() * t.element_size() for d in (self.w13, self.w2) for t in d.values())

    def resident_mask(self, layer: int) -> torch.Tensor:
        return torch.ones_like(self._mask)  # across the group every expert is computed without a miss

    @property
    def stats(self) -> Any:  # type: ignore[override]
        return self.inner.stats if self.inner is not None else None

    def after_step(self) -> None:
        if self.inner is not None:
            self.inner.after_step()


def gather_expert_bytes(provider: ExpertProvider, group: Any = None) -> list[int]:
    """Expert bytes held by each rank (an all-gather of one int64; no pickling)."""
    mine = torch.tensor([provider.expert_bytes()], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]
