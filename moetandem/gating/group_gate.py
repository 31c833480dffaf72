"""Hardware-aware group gate (EC2MoE's HL-GGN): final top-k routing from the original router's logits (global
gating), the hidden state and the mask of experts that are local and cheap now.

Experts fall in two groups per token: local (resident / cheap / on the end device) and remote. The original
router's probability mass on remote experts is not dropped, as plain masked gating does, but moved to local
experts through a learned transfer matrix, and a low-rank function of the hidden state corrects the local
scores: z = log(p·local + (p·remote) @ softmax(T)) + W_up(W_down(norm(x)), p, local). Non-local experts in the
token's original top-k are admitted when their gate weight exceeds the cost knob (∞: local only). A token whose
original picks are all allowed keeps them exactly: the gate only acts where the router asked for a remote expert."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.checkpoint import Checkpoint
from moetandem.products import product_path, read_product, write_product
from moetandem.errors import InvalidRequestError

FILE = "moetandem-group-gate.safetensors"


class GroupGate(nn.Module):
    """One MoE layer's gate: H·r + (r+2E)·(E+1) + E² + 1 parameters. With zero corrections it is masked
    gating; besides the scores it learns a per-token output scale (how far to trust the local stand-ins)."""

    def __init__(self, hidden: int, num_experts: int, rank: int = 16) -> None:
        super().__init__()
        E = num_experts
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank + 2 * E, E + 1)  # score corrections [E] and the output scale logit
        self.transfer = nn.Parameter(torch.zeros(E, E))  # logits of where a remote expert's mass goes
        self.mass = nn.Parameter(torch.tensor(-4.0))  # log share of remote mass passed on (starts ≈ masked gating)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        with torch.no_grad():
            self.transfer.fill_diagonal_(-1e4)  # an expert never passes mass to itself

    def scores(self, x: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H], logits [T, E], allowed [T, E] bool -> scores [T, E] (-inf where not allowed), scale [T]."""
        p = F.softmax(logits.float(), dim=-1)  # [T, E]
        a = allowed.float()
        moved = (p * (1 - a)) @ F.softmax(self.transfer, dim=-1) * self.mass.exp()  # [T, E] remote mass passed on
        h = self.down(F.rms_norm(x.float(), (x.shape[-1],)))  # [T, r]
        out = self.up(torch.cat([h, p * a, p * (1 - a)], dim=-1))  # [T, E+1]
        z = torch.log(p * a + moved + 1e-9) + out[:, :-1]
        return z.masked_fill(~allowed, -math.inf), 2 * torch.sigmoid(out[:, -1])

    def route(self, x: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor, ids0: torch.Tensor,
              w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final routing ids [T, k], weights [T, k]. A token whose original picks ids0/w0 [T, k] are all allowed
        keeps them exactly; the others get top-k over the gate's scores, softmax-weighted × the learned scale."""
        miss = ~allowed.gather(1, ids0).all(dim=1)  # [T]
        ids, w = ids0.clone(), w0.float().clone()
        if bool(miss.any()):
            z, scale = self.scores(x[miss], logits[miss], allowed[miss])
            mids, mw = topk_route(z, ids0.shape[1], allowed[miss])
            ids[miss], w[miss] = mids, mw * scale[:, None]
        return ids, w


class FusedGate:
    """A trained GroupGate folded for inference. Its down-projection rides in the router's matmul (`weight`
    [E + r, H]: the router's rows, then the gate's × √H, so that down(rms_norm(x)) = extra columns / ‖x‖); the
    up-projection and the transfer are one small matmul [h, p·a, p·(1-a)] @ mix [r + 2E, 2E + 1]. Same scores as
    GroupGate.scores (up to rms_norm's eps), fewer kernels."""

    def __init__(self, gate: GroupGate, router_weight: torch.Tensor) -> None:
        E, r, H = gate.transfer.shape[0], gate.down.out_features, gate.down.in_features
        dev = router_weight.device
        with torch.no_grad():
            down = gate.down.weight.float() * math.sqrt(H)
            self.weight = torch.cat([router_weight, down.to(router_weight)])  # [E + r, H]
            up = gate.up.weight.float().T.to(dev)  # [r + 2E, E + 1] from [h, p·a, p·(1-a)]
            t = (F.softmax(gate.transfer.float(), dim=-1) * gate.mass.float().exp()).to(dev)  # [E, E]
            mix = torch.zeros(r + 2 * E, 2 * E + 1, device=dev)
            mix[:, : E + 1] = up  # score corrections and the scale logit
            mix[r + E:, E + 1:] = t  # moved = p·(1-a) @ t
            self.mix = mix
            self.bias = torch.cat([gate.up.bias.float().to(dev), torch.full((E,), 1e-9, device=dev)])  # [2E + 1]
        self.E = E

    def scores(self, xd: torch.Tensor, x: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """xd [T, r] (the fused matmul's extra columns), x [T, H], p [T, E] router probabilities, allowed [T, E]
        -> scores [T, E] (-inf where not allowed), scale [T]."""
        E = self.E
        h = xd.float() / torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)  # [T, r] = down(rms_norm(x))
        pa = p * allowed  # [T, E]
        out = torch.addmm(self.bias, torch.cat([h, pa, p - pa], dim=-1), self.mix)  # [T, 2E + 1]
        z = (pa + out[:, E + 1:]).log_() + out[:, :E]  # [T, E] (the bias holds log's 1e-9)
        return torch.where(allowed, z, -math.inf), 2 * torch.sigmoid(out[:, E])

    def route(self, xd: torch.Tensor, x: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor, ids0: torch.Tensor,
              w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As GroupGate.route, from the fused matmul's extra columns xd [T, r] and the probabilities p [T, E]."""
        miss = ~allowed.gather(1, ids0).all(dim=1)  # [T]
        if not bool(miss.any()):
            return ids0, w0.float()
        if bool(miss.all()):
            return self._topk(*self.scores(xd, x, p, allowed), ids0.shape[1])
        ids, w = ids0.clone(), w0.float().clone()
        ids[miss], w[miss] = self._topk(*self.scores(xd[miss], x[miss], p[miss], allowed[miss]), ids0.shape[1])
        return ids, w

    @staticmethod
    def _topk(z: torch.Tensor, scale: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_route in three kernels: a -inf pick gets weight 0 from the softmax (a row with none allowed: 0)."""
        zk, ids = torch.topk(z, k, dim=-1)  # [T, k]
        return ids, torch.softmax(zk, dim=-1).nan_to_num_(0.0) * scale[:, None]


def admitted(local: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, cost: float) -> torch.Tensor:
    """local [E] or [T, E] -> allowed [T, E]: the local experts, plus each token's originally routed experts whose gate weight is above
    `cost` (a remote expert is worth its price only when it matters enough)."""
    allowed = (local if local.dim() == 2 else local[None].expand(ids.shape[0], -1)).clone()  # [T, E]
    if cost < math.inf:
        allowed.scatter_(1, ids, allowed.gather(1, ids) | (weights.float() > cost))
    return allowed


def topk_route(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over scores [T, E]; weights softmax over the chosen scores (sum 1). Rows with fewer than k allowed
    experts give the rest weight 0."""
    z, ids = torch.topk(scores, k, dim=-1)  # [T, k]
    ok = allowed.gather(1, ids)
    w = F.softmax(z.masked_fill(~ok, -1e30), dim=-1) * ok
    return ids, w


def masked_route(logits: torch.Tensor, allowed: torch.Tensor, k: int, norm_topk_prob: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain masked gating (SwapMoE): the original router restricted to the allowed experts."""
    p = F.softmax(logits.float(), dim=-1).masked_fill(~allowed, 0.0)  # [T, E]
    w, ids = torch.topk(p, k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids, w


class GatedRouter:
    """The routing hook a SparseMoE calls instead of its plain top-k: it reports the original routing to the
    committee (importance stays what the model wants), then routes with the group gate (or masked gating when
    gates is None) over the experts `local_mask(layer)` says are cheap now."""

    def __init__(self, local_mask: Callable[[int], torch.Tensor], gates: dict[int, GroupGate] | None,
                 cost: float = math.inf, observe: Callable[..., None] | None = None) -> None:
        if not cost >= 0:
            raise InvalidRequestError(f"the gate cost must be >= 0 (inf: local experts only), got {cost}")
        self.local_mask, self.gates, self.cost, self.observe = local_mask, gates, cost, observe
        self.assignments = 0
        self.local_assignments = 0
        self.selector: Any = None  # the LocalSelector behind local_mask, when there is one
        self.fused: dict[int, FusedGate] = {}

    def fold(self, block: Any) -> torch.Tensor | None:
        """The block's router weight with its gate's down-projection under it, [E + r, H], for the block to route
        with one matmul (None: masked gating, nothing to fold)."""
        if self.gates is None:
            return None
        self.fused[block.layer] = FusedGate(self.gates[block.layer], block.gate.weight)
        return self.fused[block.layer].weight

    def __call__(self, block: Any, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        E = block.num_experts
        xd, logits = logits[:, E:], logits[:, :E]  # [T, r] from a fused router matmul (else [T, 0]), [T, E]
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        w0, ids0 = torch.topk(probs, block.top_k, dim=-1)
        if block.norm_topk_prob:
            w0 = w0 / w0.sum(dim=-1, keepdim=True)
        if self.observe is not None:
            self.observe(block.layer, x, ids0, w0.to(x.dtype))
        local = self.local_mask(block.layer).to(x.device)  # [E]
        allowed = admitted(local, ids0, w0, self.cost)
        if self.gates is None:
            ids, w = masked_route(logits, allowed, block.top_k, block.norm_topk_prob)
        elif xd.shape[1] and block.layer in self.fused:
            ids, w = self.fused[block.layer].route(xd, x, probs, allowed, ids0, w0)
        else:
            ids, w = self.gates[block.layer].route(x, logits, allowed, ids0, w0)
        self.assignments += ids.numel()
        self.local_assignments += int(local[ids].sum())
        return ids, w.to(x.dtype)

    @property
    def local_share(self) -> float:
        return self.local_assignments / max(1, self.assignments)


# ---------------------------------------------------------------------- files
def gate_path(ckpt: Checkpoint) -> Path:
    return product_path(ckpt, FILE)


def save_gates(ckpt: Checkpoint, gates: dict[int, GroupGate], meta: dict[str, str] | None = None) -> Path:
    tensors = {f"{l}.{k}": v.detach().float() for l, g in gates.items() for k, v in g.state_dict().items()}
    rank = next(iter(gates.values())).down.out_features
    return write_product(ckpt, FILE, "group-gate", tensors, {"rank": str(rank), **(meta or {})})


def load_gates(ckpt: Checkpoint, hidden: int, num_experts: int, device: torch.device) -> dict[int, GroupGate]:
    remake = f"moetandem calibrate {ckpt.path} --group-gate --data TEXT"
    got = read_product(ckpt, gate_path(ckpt), "group-gate", remake)
    if got is None:
        raise InvalidRequestError(f"no trained group gate for {ckpt.path}: run `{remake}` first")
    tensors, meta = got
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, name = key.split(".", 1)
        state.setdefault(int(layer), {})[name] = t
    gates = {}
    for l, sd in state.items():
        g = GroupGate(hidden, num_experts, int(meta.get("rank", 16)))
        g.load_state_dict(sd)
        gates[l] = g.to(device).eval().requires_grad_(False)
    return gates
