"""Distillation of the group gates with the model frozen (`moetandem calibrate --group-gate`).

Per MoE layer: record the layer's input rows x on calibration text, apply every expert to them once (Y [N, E, H])
and the original routing (target y = Σ_topk w·E(x)). A gate then learns, under random masks of local experts
(drawn like a committee would hold them: popular experts more often) and random cost knobs, to route so that
Σ w'·E(x) over the experts it may use matches y. Because Y is precomputed, a step costs a few small matmuls."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetandem.errors import InvalidRequestError
from moetandem.experts.similarity import record_rows
from moetandem.experts.store import flat_views
from moetandem.gating.group_gate import GroupGate, masked_route, topk_route
from moetandem.models.layers import expert_ffn

if TYPE_CHECKING:
    from moetandem.engine import Engine


@dataclass
class LayerData:
    x: torch.Tensor  # [N, H] inputs of the MoE layer
    logits: torch.Tensor  # [N, E] original router logits
    y_all: torch.Tensor  # [N, E, H] every expert's output
    ids: torch.Tensor  # [N, k] original routing
    w: torch.Tensor  # [N, k]
    popularity: torch.Tensor  # [E] share of assignments


@dataclass
class GateReport:
    layer: int
    params: int
    masked_error: float  # held-out relative error ‖ŷ - y‖² / ‖y‖² of masked gating
    gate_error: float  # the same for the trained gate
    train_s: float


def collect(engine: "Engine", texts: list[str], rows: int, progress: bool = True) -> dict[int, LayerData]:
    """Input rows of every MoE layer on calibration text, with all expert outputs and the original routing."""
    store, I, H = engine.store, engine.store.inter, engine.store.hidden
    recorded = record_rows(engine, texts, rows, progress)
    blocks = {b.layer: b for b in engine.model.moe_blocks()}
    data = {}
    for l in tqdm(store.layers, desc="expert outputs", unit="layer", disable=not progress):
        x = recorded[l]  # [N, H]
        block = blocks[l]
        with torch.no_grad():
            logits = F.linear(x, block.gate.weight.float().cpu())  # [N, E]
            ys = [expert_ffn(x, *flat_views(store.read_flat(l, e, torch.float32), I, H))
                  for e in range(store.num_experts)]
        y_all = torch.stack(ys, dim=1)  # [N, E, H]
        p = F.softmax(logits, dim=-1)
        w, ids = torch.topk(p, block.top_k, dim=-1)
        if block.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        pop = torch.bincount(ids.reshape(-1), minlength=store.num_experts).float()
        data[l] = LayerData(x, logits, y_all, ids, w, pop / pop.sum())
    return data


def sample_local(popularity: torch.Tensor, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, E] bool masks of local experts: a random share in [k/E, 1), popular experts more likely (Gumbel top-m)."""
    E = popularity.numel()
    m = torch.randint(k, E, (n, 1), generator=gen)  # experts held per row
    g = -torch.log(-torch.log(torch.rand(n, E, generator=gen).clamp(1e-9, 1 - 1e-9)))
    keys = torch.log(popularity + 1e-3) + g  # [n, E]
    rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
    return rank < m


def committee_masks(ids: torch.Tensor, w: torch.Tensor, num_experts: int, slots: int, window: int = 256,
                    refresh_every: int = 16) -> torch.Tensor:
    """[N, E] bool: the experts a committee of `slots` would hold at each row, replaying the rows' routing in order
    (top-`slots` by windowed Σ gate weight, refreshed every `refresh_every` rows), as in experts/plan.py."""
    N = ids.shape[0]
    csum = torch.cat([torch.zeros(1, num_experts), torch.zeros(N, num_experts).scatter_add_(1, ids, w).cumsum(0)])
    masks = torch.zeros(N, num_experts, dtype=torch.bool)
    resident = torch.zeros(num_experts, dtype=torch.bool)
    resident[torch.topk(csum[min(N, window)], slots).indices] = True
    for start in range(0, N, refresh_every):
        end = min(N, start + refresh_every)
        masks[start:end] = resident
        resident = torch.zeros_like(resident)
        resident[torch.topk(csum[end] - csum[max(0, end - window)], slots).indices] = True
    return masks


def _mix(y_all: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j · Y[n, ids_j]: y_all [N, E, H], ids/w [N, k] -> [N, H]."""
    picked = y_all.gather(1, ids[..., None].expand(-1, -1, y_all.shape[-1]))  # [N, k, H]
    return (picked * w[..., None]).sum(dim=1)


def _rel_err(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((y_hat - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-12)).mean()


def train_layer(d: LayerData, k: int, norm_topk_prob: bool, rank: int = 16, steps: int = 400, batch: int = 256,
                lr: float = 3e-3, seed: int = 0) -> tuple[GroupGate, GateReport]:
    """Fit one layer's gate; report held-out error against masked gating under the same masks."""
    N, E, H = d.y_all.shape
    if N < 32:
        raise InvalidRequestError(f"only {N} calibration rows for a MoE layer; give more calibration text")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=gen)
    held, train = perm[: max(16, N // 8)], perm[max(16, N // 8):]
    y = _mix(d.y_all, d.ids, d.w)  # [N, H] the original layer's output
    gate = GroupGate(H, E, rank)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    t0 = time.perf_counter()

    # local sets as a committee would hold them (a quarter to three quarters of the experts), half of the time
    # widened by random popular experts, so the gate sees the misses it will meet
    held_masks = [committee_masks(d.ids, d.w, E, max(k, round(f * E))) for f in (0.25, 0.5, 0.75)]

    def allowed_for(rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        which = torch.randint(0, len(held_masks), (rows.numel(),), generator=g)
        local = torch.stack([held_masks[int(i)][r] for i, r in zip(which, rows)])  # [n, E]
        wide = torch.rand(rows.numel(), 1, generator=g) < 0.5
        local = torch.where(wide, local | sample_local(d.popularity, rows.numel(), k, g), local)
        cost = torch.where(torch.rand(rows.numel(), 1, generator=g) < 0.5, math.inf,
                           0.2 + 0.5 * torch.rand(rows.numel(), 1, generator=g))  # [n, 1]
        admit = torch.zeros_like(local).scatter_(1, d.ids[rows], d.w[rows] > cost)  # original picks worth it
        return local | admit

    for _ in range(steps):  # only tokens with a non-allowed original pick: the others keep their routing exactly
        rows = train[torch.randint(0, train.numel(), (batch,), generator=gen)]
        allowed = allowed_for(rows, gen)
        miss = ~allowed.gather(1, d.ids[rows]).all(dim=1)
        rows, allowed = rows[miss], allowed[miss]
        if rows.numel() == 0:
            continue
        z, scale = gate.scores(d.x[rows], d.logits[rows], allowed)  # [B, E], [B]
        ids, w = topk_route(z, k, allowed)
        loss = _rel_err(_mix(d.y_all[rows], ids, w * scale[:, None]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gate.eval().requires_grad_(False)
    g_eval = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # held-out error over all rows (rows without a miss are exact for both)
        allowed = allowed_for(held, g_eval)
        ids, w = gate.route(d.x[held], d.logits[held], allowed, d.ids[held], d.w[held])
        gate_err = float(_rel_err(_mix(d.y_all[held], ids, w), y[held]))
        mids, mw = masked_route(d.logits[held], allowed, k, norm_topk_prob)
        masked_err = float(_rel_err(_mix(d.y_all[held], mids, mw), y[held]))
    params = sum(p.numel() for p in gate.parameters())
    return gate, GateReport(-1, params, masked_err, gate_err, time.perf_counter() - t0)


def train_gates(engine: "Engine", texts: list[str], rows: int = 4096, rank: int = 16, steps: int = 800,
                seed: int = 0, progress: bool = True) -> tuple[dict[int, GroupGate], list[GateReport]]:
    data = collect(engine, texts, rows, progress)
    blocks = {b.layer: b for b in engine.model.moe_blocks()}
    gates, reports = {}, []
    for l in tqdm(sorted(data), desc="group gates", unit="layer", disable=not progress):
        b = blocks[l]
        gates[l], rep = train_layer(data[l], b.top_k, b.norm_topk_prob, rank, steps, seed=seed + l)
        rep.layer = l
        reports.append(rep)
    return gates, reports
