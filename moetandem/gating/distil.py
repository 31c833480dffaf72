"""Next-token distillation of the group gates through the frozen model (`moetandem calibrate --group-gate`;
`--gate-objective layer` is train.py's layer-output fit instead).

Teacher: the model with every expert, its next-token distribution. Student: the same model where every MoE layer
routes through its gate over the experts a committee would hold at that token: local sets replayed from the
teacher's routing of the same text (train.committee_masks at a quarter, half and three quarters of the experts),
half of the rows with a cost knob that admits heavy non-local picks. Only the gates learn, on KL(teacher || student)
of the next-token distributions. A fresh gate starts as masked gating, so what it learns is measured against it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetandem.errors import InvalidRequestError
from moetandem.gating.group_gate import GroupGate, masked_route
from moetandem.gating.train import committee_masks
from moetandem.models import KVCache

if TYPE_CHECKING:
    from moetandem.engine import Engine

FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class DistilReport:
    steps: int
    masked_kl: float  # held-out windows of the training text, local sets replayed, cost ∞
    gate_kl: float
    masked_top1: float  # top-1 agreement with the teacher
    gate_top1: float
    train_s: float


class ReplayRouter:
    """Training / measuring hook: each row routes over its replayed local set (set `rows`, `frac`, `cost` for the
    batch first) with its layer's gate, or with masked gating when gates is None."""

    def __init__(self, masks: dict[int, torch.Tensor], gates: dict[int, GroupGate] | None) -> None:
        self.masks, self.gates = masks, gates  # masks: layer -> [F, N, E] bool over the token stream
        self.rows = torch.zeros(0, dtype=torch.long)  # [T] stream positions of the batch's rows
        self.frac = torch.zeros(0, dtype=torch.long)  # [T] which fraction's local sets
        self.cost = torch.zeros(0, 1)  # [T, 1] cost knob per row (inf: local only)

    def __call__(self, block: Any, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer, k = block.layer, block.top_k
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        w0, ids0 = torch.topk(probs, k, dim=-1)
        if block.norm_topk_prob:
            w0 = w0 / w0.sum(dim=-1, keepdim=True)
        local = self.masks[layer][self.frac, self.rows]  # [T, E]
        allowed = local | torch.zeros_like(local).scatter_(1, ids0, w0 > self.cost)
        if self.gates is None:
            ids, w = masked_route(logits, allowed, k, block.norm_topk_prob)
        else:
            ids, w = self.gates[layer].route(x, logits, allowed, ids0, w0)
        return ids, w.to(x.dtype)


class _Recorder:
    """Teacher hook: the original routing, kept per layer in stream order."""

    def __init__(self) -> None:
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.w: dict[int, list[torch.Tensor]] = {}

    def __call__(self, block: Any, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, w = block.gate.select(logits, torch.float32)  # [T, k] each
        self.ids.setdefault(block.layer, []).append(ids.cpu())
        self.w.setdefault(block.layer, []).append(w.cpu())
        return ids, w.to(x.dtype)


def _forward(engine: "Engine", batch: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, V] of equal-length windows [B, n], over a fresh KV cache."""
    B, n = batch.shape
    pos = torch.arange(n, device=engine.device).expand(B, n)
    cache = KVCache(engine.args, B, n, engine.device, engine.dtype)
    return engine.forward(batch.to(engine.device), pos, cache, kv_len=n)


def _set_hooks(engine: "Engine", hook: Any) -> None:
    for b in engine.model.moe_blocks():
        b.router = hook


def replay_masks(engine: "Engine", wins: torch.Tensor, batch: int = 16) -> dict[int, torch.Tensor]:
    """Per MoE layer, [F, N, E] bool: the experts a committee holding each of FRACTIONS of them would have at every
    token of the windows [W, n] read in order (N = W·n), from the model's own routing of that text."""
    rec = _Recorder()
    _set_hooks(engine, rec)
    try:
        with torch.inference_mode():
            for i in range(0, wins.shape[0], batch):
                _forward(engine, wins[i:i + batch])
    finally:
        _set_hooks(engine, None)
    E = engine.args.num_experts
    out = {}
    for l in rec.ids:
        ids, w = torch.cat(rec.ids[l]), torch.cat(rec.w[l]).float()  # [N, k]
        k = ids.shape[1]
        out[l] = torch.stack([committee_masks(ids, w, E, max(k, round(f * E))) for f in FRACTIONS])
    return out


def _kl_top1(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL(teacher || student) and top-1 agreement of next-token logits [B, n, V]."""
    t, s = F.log_softmax(teacher.float(), -1), F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean(), (t.argmax(-1) == s.argmax(-1)).float().mean()


def distil_gates(engine: "Engine", ids: list[int], rank: int = 16, steps: int = 300, window: int = 64,
                 batch: int = 8, lr: float = 3e-3, seed: int = 0, progress: bool = True
                 ) -> tuple[dict[int, GroupGate], DistilReport]:
    """Train one gate per MoE layer of `engine` (all experts resident, no gate) on token ids of training text."""
    n_win = len(ids) // window
    if n_win < 8:
        raise InvalidRequestError(f"{len(ids)} calibration tokens make {n_win} windows of {window}; the group gate "
                                  "needs at least 8: give more calibration text")
    wins = torch.tensor(ids[: n_win * window]).view(n_win, window)  # [W, n]
    held = max(2, n_win // 16)  # the last windows: held out for the report
    masks = replay_masks(engine, wins)
    H, E = engine.args.hidden_size, engine.args.num_experts
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gates = {l: GroupGate(H, E, rank).to(engine.device) for l in masks}
    hook = ReplayRouter(masks, gates)
    params = [p for g in gates.values() for p in g.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    frozen = [p for p in engine.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    t0 = time.perf_counter()
    try:
        for _ in tqdm(range(steps), desc="group gates (next-token KL)", disable=not progress):
            w = torch.randint(0, n_win - held, (batch,), generator=gen)  # [B]
            rows = (w[:, None] * window + torch.arange(window)).reshape(-1)  # [B·n]
            hook.rows = rows
            hook.frac = torch.randint(0, len(FRACTIONS), (batch, 1), generator=gen).expand(-1, window).reshape(-1)
            knob = torch.where(torch.rand(batch, 1, generator=gen) < 0.5, math.inf,
                               0.2 + 0.5 * torch.rand(batch, 1, generator=gen))  # [B, 1]
            hook.cost = knob.expand(-1, window).reshape(-1, 1).to(engine.device)
            with torch.inference_mode():
                teacher = _forward(engine, wins[w]).float()  # [B, n, V]
            _set_hooks(engine, hook)
            try:
                with torch.enable_grad():
                    loss, _ = _kl_top1(teacher.clone(), _forward(engine, wins[w]))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            finally:
                _set_hooks(engine, None)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    train_s = time.perf_counter() - t0
    for g in gates.values():
        g.eval().requires_grad_(False)
    kl = held_out(engine, wins, masks, gates, n_win - held)
    return gates, DistilReport(steps, kl["masked"][0], kl["gate"][0], kl["masked"][1], kl["gate"][1], train_s)


def held_out(engine: "Engine", wins: torch.Tensor, masks: dict[int, torch.Tensor],
             gates: dict[int, GroupGate], start: int) -> dict[str, tuple[float, float]]:
    """KL and top-1 agreement against the teacher on windows[start:], each replayed fraction, cost ∞, for masked
    gating and for the gates."""
    W, n = wins.shape
    rows = (torch.arange(start, W)[:, None] * n + torch.arange(n)).reshape(-1)
    out = {}
    with torch.inference_mode():
        teacher = _forward(engine, wins[start:])
        for name, g in (("masked", None), ("gate", gates)):
            hook = ReplayRouter(masks, g)
            hook.rows, hook.cost = rows, torch.full((rows.numel(), 1), math.inf, device=engine.device)
            kls, tops = [], []
            for f in range(len(FRACTIONS)):
                hook.frac = torch.full_like(rows, f)
                _set_hooks(engine, hook)
                try:
                    kl, top1 = _kl_top1(teacher, _forward(engine, wins[start:]))
                finally:
                    _set_hooks(engine, None)
                kls.append(float(kl))
                tops.append(float(top1))
            out[name] = (sum(kls) / len(kls), sum(tops) / len(tops))
    return out
