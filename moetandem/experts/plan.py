"""Offline planner for the committee: from routing recorded on calibration text, predict the hit rate of every
(layer, slot count, refresh interval) by replaying the committee, then give slots to the layers where they buy
the most hits (greedy on marginal gains, which is optimal for concave per-layer curves)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moetandem.errors import InvalidRequestError
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.tap import Tap


class RoutingRecorder(Tap):
    """Keeps each MoE layer's routed ids [T, k] and gate weights [T, k] on the host."""

    def __init__(self, inner: Mapping[int, ExpertProvider]) -> None:
        super().__init__(inner)
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def record(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.ids.setdefault(layer, []).append(expert_ids.cpu())
        self.weights.setdefault(layer, []).append(weights.float().cpu())

    def routing(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {l: (torch.cat(self.ids[l]), torch.cat(self.weights[l])) for l in self.ids}


def simulate_hits(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, slots: int, refresh_every: int,
                  window: int = 256) -> tuple[float, int]:
    """Replay a committee of `slots` experts over one layer's routing ids/weights [N, k]: refreshed to the
    top-`slots` by windowed Σ gate weight every `refresh_every` tokens. Returns (hit rate, swaps)."""
    N = ids.shape[0]
    contrib = torch.zeros(N, num_experts).scatter_add_(1, ids, weights)  # [N, E]
    csum = torch.cat([torch.zeros(1, num_experts), contrib.cumsum(0)])  # [N+1, E]
    resident = torch.zeros(num_experts, dtype=torch.bool)
    resident[torch.topk(csum[min(N, window)], slots).indices] = True  # warm start: the first window
    hits, swaps = 0, 0
    for start in range(0, N, refresh_every):
        end = min(N, start + refresh_every)
        hits += int(resident[ids[start:end]].sum())
        score = csum[end] - csum[max(0, end - window)]
        want = torch.zeros_like(resident)
        want[torch.topk(score, slots).indices] = True
        swaps += int((want & ~resident).sum())
        resident = want
    return hits / ids.numel(), swaps


PLAN_VERSION = 1


@dataclass
class Plan:
    budget_bytes: int
    slots: dict[int, int]
    refresh_every: int
    predicted_hit_rate: float
    uniform_hit_rate: float
    candidates: list[dict] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Atomically (a temporary file, then rename), with the format version."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"version": PLAN_VERSION, **asdict(self)}, indent=1))
        os.replace(tmp, path)

    @staticmethod
    def load(path: str | Path) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
            version = d.pop("version", PLAN_VERSION)
            if version != PLAN_VERSION:
                raise InvalidRequestError(f"plan file {path} has format version {version}, this moetandem reads "
                                          f"{PLAN_VERSION}; run `moetandem plan` again")
            d["slots"] = {int(k): int(v) for k, v in d["slots"].items()}
            return Plan(**d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError(f"cannot read plan file {path}: {e}") from None


def make_plan(routing: dict[int, tuple[torch.Tensor, torch.Tensor]], num_experts: int, top_k: int,
              expert_bytes: int, budget_bytes: int, refresh_candidates: tuple[int, ...] = (4, 16, 64),
              swap_penalty: float = 0.02) -> Plan:
    """Per-layer slots and refresh interval for a byte budget. swap_penalty: hits a swap is worth losing
    (a swap moves a whole expert; a hit saves one expert computation)."""
    layers = sorted(routing)
    total = budget_bytes // expert_bytes
    if total < top_k * len(layers):
        raise InvalidRequestError(f"budget holds {total} experts; the plan needs at least {top_k} per layer")
    total = min(total, num_experts * len(layers))
    tokens = sum(routing[l][0].numel() for l in layers)
    best: Plan | None = None
    candidates = []
    for r in refresh_candidates:
        curve = {l: [0.0] * (num_experts + 1) for l in layers}  # hits (counted) at n slots
        swaps = {l: [0] * (num_experts + 1) for l in layers}
        for l in layers:
            ids, w = routing[l]
            for n in range(top_k, num_experts + 1):
                rate, sw = simulate_hits(ids, w, num_experts, n, r)
                curve[l][n], swaps[l][n] = rate * ids.numel() - swap_penalty * sw, sw
        slots = {l: top_k for l in layers}
        for _ in range(total - top_k * len(layers)):  # greedy: next slot where it gains most
            l = max((l for l in layers if slots[l] < num_experts),
                    key=lambda l: curve[l][slots[l] + 1] - curve[l][slots[l]])
            slots[l] += 1
        uniform = {l: min(num_experts, total // len(layers)) for l in layers}
        hit = lambda s: sum(curve[l][s[l]] + swap_penalty * swaps[l][s[l]] for l in layers) / tokens
        cand = {"refresh_every": r, "planned_hit_rate": hit(slots), "uniform_hit_rate": hit(uniform),
                "swaps_per_token": sum(swaps[l][slots[l]] for l in layers) / routing[layers[0]][0].shape[0],
                "objective": sum(curve[l][slots[l]] for l in layers) / tokens, "slots": slots}
        candidates.append(cand)
        if best is None or cand["objective"] > best.candidates[-1]["objective"]:
            best = Plan(budget_bytes, slots, r, cand["planned_hit_rate"], cand["uniform_hit_rate"], [cand])
    assert best is not None
    best.candidates = candidates
    return best
