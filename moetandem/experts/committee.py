"""Parameter Committee: under a byte budget, a resident set of experts in fixed device slots, scored by recent
importance and refreshed asynchronously; misses handled by a MissPolicy (skip / substitute / fetch / host)."""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
import weakref
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from moetandem.errors import InvalidRequestError
from moetandem.experts.policies import CostModel, MissPolicy
from moetandem.experts.provider import ExpertProvider, combine, group_by_expert
from moetandem.experts.resident import grouped_mm_supported, run_experts
from moetandem.experts.store import ExpertStore, flat_views, return_freed_memory_to_os
from moetandem.models.layers import expert_ffn

SCORES = ("importance", "count", "ema")


def _pinned_cap(total_bytes: int) -> int:
    """Bytes of pinned host copies a committee keeps: MOETANDEM_PINNED_BYTES, else a quarter of host RAM."""
    env = os.environ.get("MOETANDEM_PINNED_BYTES")
    if env:
        return int(env)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return total_bytes
    return min(total_bytes, ram // 4)


def _swap_worker(ref: "weakref.ref[CommitteeProvider]", jobs: queue.Queue) -> None:
    """The swapper thread. It holds the provider weakly between jobs and ends when the provider is freed."""
    while True:
        job = jobs.get()
        try:
            provider = ref() if job is not None else None
            if provider is None:
                return
            provider._swap(*job)
            del provider
        finally:
            jobs.task_done()


@dataclass
class CommitteeStats:
    hits: int = 0
    misses: int = 0
    substitutions: int = 0
    skips: int = 0
    fetches: int = 0
    host_computes: int = 0
    swaps: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class _Layer:
    """Slots of one MoE layer: buf [n, 3*I*H] on the device, the expert in each slot, and importance scores."""

    def __init__(self, n: int, numel: int, num_experts: int, device: torch.device, dtype: torch.dtype) -> None:
        self.buf = torch.empty(n, numel, device=device, dtype=dtype)
        self.expert_of: list[int] = [-1] * n  # slot -> expert (-1 free or in transit)
        self.slot_of: dict[int, int] = {}  # expert -> slot (published, usable)
        self.score = torch.zeros(num_experts)  # importance over the window (host)
        self.window: collections.deque[tuple[int, torch.Tensor]] = collections.deque()
        self.window_tokens = 0
        self.since_refresh = 0
        self.last_use: dict[int, int] = {}  # expert -> tick (LRU)
        self.busy: set[int] = set()  # slots with a swap in flight


class CommitteeProvider(ExpertProvider):
    graph_safe = False

    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, budget_bytes: int,
                 policy: MissPolicy, top_k: int, similarity: dict[int, torch.Tensor] | None = None,
                 norms: dict[int, torch.Tensor] | None = None, slots: dict[int, int] | None = None,
                 refresh_every: int = 16, window: int = 256, score: str = "importance", progress: bool = True,
                 async_swaps: bool = True) -> None:
        """async_swaps=False waits for each refresh's swaps before going on: slower, but the resident set at
        every step no longer depends on thread timing (reproducible quality measurements)."""
        if score not in SCORES:
            raise InvalidRequestError(f"unknown committee score {score!r}; choose one of {', '.join(SCORES)}")
        self.store, self.device, self.dtype, self.policy, self.top_k = store, device, dtype, policy, top_k
        return_freed_memory_to_os()
        self.similarity, self.score_kind, self.refresh_every, self.window = similarity, score, refresh_every, window
        self.async_swaps = async_swaps
        #: True when a routing hook reports the original routing through observe() (the group gate routes to
        #: local experts, but importance must keep following what the model asks for)
        self.external_observe = False
        self.E, self.I, self.H = store.num_experts, store.inter, store.hidden
        self.expert_size = store.expert_bytes(dtype)
        self.norms = norms or {l: torch.ones(self.E) for l in store.layers}
        self.stats = CommitteeStats()
        self.lock = threading.Lock()
        self.tick = 0
        self.cost = CostModel(device, dtype, self.I, self.H)
        #: resident experts as one grouped GEMM over the slot buffers (CUDA bf16); else one matmul pair per expert
        self.grouped = grouped_mm_supported(device, dtype, (self.I, self.H))
        self.layers: dict[int, _Layer] = {}
        # pinned host copies (CUDA only), least recently used first; bounded so that host RAM holds the mmap'd
        # checkpoint plus at most this many pinned bytes (a full cache would double the model in host memory)
        self._host: collections.OrderedDict[tuple[int, int], torch.Tensor] = collections.OrderedDict()
        self._host_bytes = 0
        self._host_cap = _pinned_cap(store.total_numel() * torch.empty((), dtype=dtype).element_size())
        self._host_lock = threading.Lock()
        self._jobs: queue.Queue[tuple[int, int, int, torch.cuda.Event | None] | None] = queue.Queue()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the swapper holds only a weak reference, so a dropped provider (and its device slots) can be freed
        self._worker = threading.Thread(target=_swap_worker, args=(weakref.ref(self), self._jobs),
                                        name="moetandem-swapper", daemon=True)
        self._worker.start()
        weakref.finalize(self, self._jobs.put, None)
        self.set_budget(budget_bytes, slots, progress)

    # ------------------------------------------------------------------ budget and slots
    def plan_slots(self, budget_bytes: int) -> dict[int, int]:
        per_layer = budget_bytes // (self.expert_size * len(self.store.layers))
        need = self.top_k * self.expert_size * len(self.store.layers)
        if per_layer < self.top_k:
            raise InvalidRequestError(
                f"expert budget {budget_bytes / 2**20:.1f} MiB is below one token's experts "
                f"({self.top_k} per layer × {len(self.store.layers)} layers × {self.expert_size / 2**20:.2f} MiB = "
                f"{need / 2**20:.1f} MiB); raise --expert-budget")
        return {l: min(self.E, per_layer) for l in self.store.layers}

    def set_budget(self, budget_bytes: int, slots: dict[int, int] | None = None, progress: bool = False) -> None:
        """Resize the committee now (between steps): shrinking evicts the least important, growing admits the
        most important experts."""
        plan = slots or self.plan_slots(budget_bytes)
        if sum(plan.values()) * self.expert_size > budget_bytes:
            raise InvalidRequestError("the slot plan needs more bytes than the expert budget")
        self.drain()
        for l in tqdm(self.store.layers, desc="committee", unit="layer", disable=not progress, leave=False):
            old = self.layers.get(l)
            n = plan[l]
            new = _Layer(n, self.store.expert_numel(), self.E, self.device, self.dtype)
            rank = self._ranking(l, old)
            keep = [e for e in rank if old is not None and e in old.slot_of][:n]
            if old is not None:
                new.score, new.window, new.window_tokens, new.last_use = \
                    old.score, old.window, old.window_tokens, old.last_use
            for s, e in enumerate(keep):
                new.buf[s].copy_(old.buf[old.slot_of[e]])
                new.expert_of[s], new.slot_of[e] = e, s
            del old
            self.layers[l] = new
            admit = [e for e in rank if e not in new.slot_of][: n - len(keep)]
            for s, e in zip(range(len(keep), n), admit):
                self._load(l, s, e)
        self.budget_bytes = budget_bytes

    def _ranking(self, layer: int, state: _Layer | None) -> list[int]:
        """Experts by current importance; before any routing is seen, by weight norm (‖E_i‖)."""
        score = state.score if state is not None and state.score.any() else self.norms[layer]
        return torch.argsort(score, descending=True, stable=True).tolist()

    def expert_bytes(self) -> int:
        return sum(st.buf.numel() * st.buf.element_size() for st in self.layers.values())

    # ------------------------------------------------------------------ moving experts
    def host_flat(self, layer: int, expert: int, pin: bool = True) -> torch.Tensor:
        """The expert's flat weights in host memory (pinned on CUDA, so a copy can run asynchronously).
        pin=False, for the synchronous paths (fetch, host compute): the cached pinned copy when there is one, else
        a plain read, since allocating pinned memory for an expert met for the first time can take longer
        (~10 ms measured on an H100 host) than the copy it speeds up."""
        if self._stream is None:
            return self.store.read_flat(layer, expert, self.dtype)
        key = (layer, expert)
        with self._host_lock:
            t = self._host.get(key)
            if t is not None:
                self._host.move_to_end(key)
                return t
        t = self.store.read_flat(layer, expert, self.dtype)
        if not pin:
            return t
        t = t.pin_memory()
        with self._host_lock:
            if key not in self._host:
                self._host[key] = t
                self._host_bytes += t.numel() * t.element_size()
            while self._host_bytes > self._host_cap and len(self._host) > 1:
                _, old = self._host.popitem(last=False)
                self._host_bytes -= old.numel() * old.element_size()
        return t

    def _load(self, layer: int, slot: int, expert: int) -> None:
        """Synchronous copy into a slot, then publish."""
        st = self.layers[layer]
        st.buf[slot].copy_(self.host_flat(layer, expert, pin=False))
        with self.lock:
            st.expert_of[slot], st.slot_of[expert] = expert, slot
        self.stats.bytes_moved += self.expert_size

    def _swap(self, layer: int, slot: int, expert: int, ready: torch.cuda.Event | None) -> None:
        """One queued swap (on the swapper thread): copy, then publish."""
        st = self.layers.get(layer)
        if st is None or slot >= len(st.expert_of):
            return
        src = self.host_flat(layer, expert)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                st.buf[slot].copy_(src, non_blocking=True)
            self._stream.synchronize()
        else:
            st.buf[slot].copy_(src)
        with self.lock:
            st.busy.discard(slot)
            if expert in st.slot_of:  # fetched on demand meanwhile: keep one copy, leave this slot free
                return
            st.expert_of[slot], st.slot_of[expert] = expert, slot
            self.stats.swaps += 1
            self.stats.bytes_moved += self.expert_size

    def drain(self) -> None:
        """Wait for in-flight swaps (tests, budget changes)."""
        self._jobs.join()

    def refresh(self, layer: int) -> None:
        """Schedule swaps so the slots hold the most important experts of the window."""
        st = self.layers[layer]
        n = len(st.expert_of)
        want = set(torch.topk(st.score, n).indices.tolist()) if st.score.any() else set(st.slot_of)
        with self.lock:
            out = sorted((e for e in st.slot_of if e not in want), key=lambda e: float(st.score[e]))
            into = sorted((e for e in want if e not in st.slot_of), key=lambda e: -float(st.score[e]))
            for old, new in zip(out, into):
                if float(st.score[new]) <= float(st.score[old]):
                    break
                slot = st.slot_of.pop(old)  # unpublish first: compute never reads a slot being written
                st.expert_of[slot] = -1
                st.busy.add(slot)
                ready = None
                if self._stream is not None:  # the copy must wait for kernels already queued on this slot
                    ready = torch.cuda.Event()
                    ready.record()
                self._jobs.put((layer, slot, new, ready))

    # ------------------------------------------------------------------ importance
    def observe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Score the model's own routing (ids/weights [T, k]) when a routing hook changes what is computed."""
        self.external_observe = True
        self._observe(layer, x, ids, w)

    def _observe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        st = self.layers[layer]
        T = x.shape[0]
        if self.score_kind == "count":
            contrib = torch.ones_like(w, dtype=torch.float32)
        else:  # PC-MoE importance: ‖x‖ · g_i(x) · ‖E_i‖
            contrib = x.float().norm(dim=-1, keepdim=True) * w.float() * self.norms[layer].to(x.device)[ids]
        vec = torch.zeros(self.E, device=x.device).scatter_add_(0, ids.reshape(-1), contrib.reshape(-1)).cpu()
        if self.score_kind == "ema":
            decay = (1.0 - 1.0 / self.window) ** T
            st.score.mul_(decay).add_(vec)
        else:
            st.window.append((T, vec))
            st.score.add_(vec)
            st.window_tokens += T
            while st.window_tokens - st.window[0][0] >= self.window and len(st.window) > 1:
                t_old, v_old = st.window.popleft()
                st.score.sub_(v_old)
                st.window_tokens -= t_old
        st.since_refresh += T
        if self.policy.refresh and st.since_refresh >= self.refresh_every:
            st.since_refresh = 0
            self.refresh(layer)
            if not self.async_swaps:
                self.drain()

    # ------------------------------------------------------------------ compute
    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        st, pol = self.layers[layer], self.policy
        self.tick += 1
        if not self.external_observe:
            self._observe(layer, x, expert_ids, weights)
        T, k = expert_ids.shape
        ids, gw = expert_ids.tolist(), weights.float().tolist()
        with self.lock:
            resident = dict(st.slot_of)
        final = [row[:] for row in ids]  # expert actually computed for each assignment
        keep = [[True] * k for _ in range(T)]
        exact: collections.Counter[int] = collections.Counter()

        def miss(t: int, j: int) -> None:
            e = ids[t][j]
            if pol.substitute_min_sim is not None and resident:
                sub = self._nearest(layer, e, resident)
                if sub is not None:
                    final[t][j] = sub
                    self.stats.substitutions += 1
                    return
            exact[e] += 1

        for t in range(T):
            for j in range(k):
                e, g = ids[t][j], gw[t][j]
                if e in resident:
                    self.stats.hits += 1
                    st.last_use[e] = self.tick
                    if pol.skip_resident and g < pol.skip_below:
                        keep[t][j] = False
                elif g < pol.skip_below:
                    self.stats.misses += 1
                    keep[t][j] = False
                else:
                    self.stats.misses += 1
                    miss(t, j)
            if not any(keep[t]):  # never drop a whole token: keep its top expert
                keep[t][0] = True
                if ids[t][0] not in resident:
                    miss(t, 0)
            self.stats.skips += keep[t].count(False)
        if any(not all(row) for row in keep):  # renormalise kept weights to the original total
            for t in range(T):
                kept = sum(g for g, kp in zip(gw[t], keep[t]) if kp)
                total = sum(gw[t])
                gw[t] = [g * total / kept if kp else 0.0 for g, kp in zip(gw[t], keep[t])]
            weights = torch.tensor(gw, device=weights.device, dtype=weights.dtype)
        host = self._fetch_or_host(layer, exact, resident, {e for row in final for e in row})
        if self.grouped:
            return self._run_grouped(layer, x, final, keep, weights, resident, host)
        return self._run(layer, x, final, keep, weights, resident, host)

    def _nearest(self, layer: int, expert: int, resident: dict[int, int]) -> int | None:
        if self.similarity is None:
            raise InvalidRequestError("substitution needs expert similarity: run `moetandem calibrate MODEL` first")
        cand = torch.tensor(list(resident))
        sims = self.similarity[layer][expert, cand]
        best = int(sims.argmax())
        min_sim = self.policy.substitute_min_sim
        return int(cand[best]) if min_sim is None or float(sims[best]) >= min_sim else None

    def _fetch_or_host(self, layer: int, exact: dict[int, int], resident: dict[int, int],
                       in_use: set[int]) -> set[int]:
        """Handle exact misses: copy into a victim slot (fetch) or mark for host compute."""
        st, pol, host = self.layers[layer], self.policy, set()
        for e, rows in exact.items():
            fetch = pol.exact == "fetch" or (pol.exact == "auto" and not self.cost.prefer_host(rows))
            with self.lock:
                if e in st.slot_of:  # a refresh swap published it since the snapshot
                    resident[e] = st.slot_of[e]
                    continue
                victims = [s for s, v in enumerate(st.expert_of)
                           if s not in st.busy and (v < 0 or v not in in_use)]
            if not fetch or not victims:
                host.add(e)
                self.stats.host_computes += rows
                continue
            free = [s for s in victims if st.expert_of[s] < 0]
            if free:
                slot = free[0]
            elif pol.lru:
                slot = min(victims, key=lambda s: st.last_use.get(st.expert_of[s], -1))
            else:
                slot = min(victims, key=lambda s: float(st.score[st.expert_of[s]]))
            t0 = time.perf_counter()
            with self.lock:
                st.slot_of.pop(st.expert_of[slot], None)
                st.expert_of[slot] = -1
            for gone in [k for k, v in resident.items() if v == slot]:
                del resident[gone]
            self._load(layer, slot, e)
            resident[e] = slot
            st.last_use[e] = self.tick
            self.stats.fetches += 1
            self.stats.stall_s += time.perf_counter() - t0
        return host

    def _run(self, layer: int, x: torch.Tensor, final: list[list[int]], keep: list[list[bool]],
             weights: torch.Tensor, resident: dict[int, int], host: set[int]) -> torch.Tensor:
        """Each computed expert runs once on all its kept rows, from its slot or from host memory."""
        st, I, H = self.layers[layer], self.I, self.H
        groups = group_by_expert(torch.tensor(final, device=x.device), self.E)
        xs = x[groups.token]  # [T*k, H] sorted by expert
        kept = torch.tensor(keep).reshape(-1)[groups.order.cpu()]  # [T*k] (host)
        ys = torch.zeros_like(xs)
        start = 0
        for e, n in enumerate(groups.counts.tolist()):
            if not n:
                continue
            sel = kept[start:start + n]
            idx = slice(start, start + n) if bool(sel.all()) else torch.nonzero(sel).squeeze(1) + start
            start += n
            if not bool(sel.any()):
                continue
            rows = xs[idx]
            if e in host:
                t0 = time.perf_counter()
                w13, w2 = flat_views(self.host_flat(layer, e, pin=False), I, H)
                y = expert_ffn(rows.to("cpu", w13.dtype), w13, w2).to(x.device, x.dtype)
                self.stats.stall_s += time.perf_counter() - t0
            else:
                w13, w2 = flat_views(st.buf[resident[e]], I, H)
                y = expert_ffn(rows, w13, w2)
            ys[idx] = y
        return combine(ys, groups, weights)

    def _run_grouped(self, layer: int, x: torch.Tensor, final: list[list[int]], keep: list[list[bool]],
                     weights: torch.Tensor, resident: dict[int, int], host: set[int]) -> torch.Tensor:
        """Resident experts in two grouped GEMMs over the slot buffers (expert ids mapped to slot ids; skipped and
        host-computed assignments ride along with weight 0); host experts added one by one."""
        st, I, H = self.layers[layer], self.I, self.H
        on_slot = [[kp and e in resident for e, kp in zip(fr, kr)] for fr, kr in zip(final, keep)]
        spare = next(iter(resident.values()), 0)  # a published slot for rows that carry weight 0
        slot_ids = torch.tensor([[resident.get(e, spare) for e in fr] for fr in final], device=x.device)  # [T, k]
        mask = torch.tensor(on_slot, device=x.device)
        w13, w2 = flat_views(st.buf, I, H)  # [n, 2I, H], [n, H, I]
        out = run_experts(x, slot_ids, weights * mask, w13, w2, grouped=True)
        for e in host:
            rows = [(t, j) for t, fr in enumerate(final) for j, fe in enumerate(fr) if fe == e and keep[t][j]]
            if not rows:
                continue
            t0 = time.perf_counter()
            tok = torch.tensor([t for t, _ in rows], device=x.device)
            hw13, hw2 = flat_views(self.host_flat(layer, e, pin=False), I, H)
            y = expert_ffn(x[tok].to("cpu", hw13.dtype), hw13, hw2).to(x.device, x.dtype)  # [r, H]
            g = weights[tok, torch.tensor([j for _, j in rows], device=x.device)]  # [r]
            out.index_add_(0, tok, y * g[:, None].to(y.dtype))
            self.stats.stall_s += time.perf_counter() - t0
        return out
