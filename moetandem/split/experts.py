"""Expert-level placement: in a layer the end runs, the experts the plan placed in the cloud are computed
there (Σ w·E(x) over the Experts stream) while the end computes its own at the same time; when the link is
down, the end computes them too (its committee / ExpertStore), so nothing is lost."""
from __future__ import annotations

import logging

import torch

from moetandem.errors import CloudError
from moetandem.experts.provider import ExpertProvider
from moetandem.split.link import CloudLink
from moetandem.split.transport.frame import Frame

log = logging.getLogger("moetandem.split")


def _fill(ids: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments not kept get weight 0 and the id of a kept one of the same token (so no extra expert is
    touched). ids/w/keep [T, k]; every row must keep at least one."""
    first = ids.gather(1, keep.int().argmax(1, keepdim=True))  # [T, 1]
    return torch.where(keep, ids, first), torch.where(keep, w, torch.zeros_like(w))


class CloudExpertProvider(ExpertProvider):
    """Wraps the end's provider for one model; `remote[layer]` = experts of that layer placed in the cloud."""

    def __init__(self, local: ExpertProvider, link: CloudLink, remote: dict[int, list[int]],
                 num_experts: int) -> None:
        self.local, self.link, self.E = local, link, num_experts
        self.remote: dict[int, torch.Tensor] = {}
        self.set_remote(remote)
        self.remote_rows = 0
        self.fallback_rows = 0

    def set_remote(self, remote: dict[int, list[int]]) -> None:
        """Which experts of which layer the cloud computes (a new split plan)."""
        self.remote = {l: torch.zeros(self.E, dtype=torch.bool).index_fill_(0, torch.tensor(e, dtype=torch.long), True)
                       for l, e in remote.items() if e}

    @property
    def graph_safe(self) -> bool:
        """Only when no expert of the end's layers is placed in the cloud (then compute is the local provider's)."""
        return not self.remote and bool(getattr(self.local, "graph_safe", False))

    @property
    def stats(self) -> object:
        return getattr(self.local, "stats", None)

    def after_step(self) -> None:
        self.local.after_step()

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        mask = self.remote.get(layer)
        if mask is None:
            return self.local.compute(layer, x, expert_ids, weights)
        is_remote = mask.to(expert_ids.device)[expert_ids]  # [T, k]
        r_rows = is_remote.any(1)  # [T]
        client = self.link.experts() if bool(r_rows.any()) else None
        if client is None:
            return self.local.compute(layer, x, expert_ids, weights)
        r_ids, r_w = _fill(expert_ids[r_rows], weights[r_rows], is_remote[r_rows])
        fut = client.submit(Frame("experts", meta={"layer": layer},
                                  tensors={"x": x[r_rows], "ids": r_ids, "w": r_w}))
        y = torch.zeros_like(x)  # [T, H]
        l_rows = (~is_remote).any(1)
        if bool(l_rows.any()):  # the end's experts, while the cloud computes its own
            l_ids, l_w = _fill(expert_ids[l_rows], weights[l_rows], ~is_remote[l_rows])
            y[l_rows] = self.local.compute(layer, x[l_rows], l_ids, l_w)
        try:
            y_r = client.wait(fut).tensors.get("y")
            if y_r is None or y_r.shape != (int(r_rows.sum()), x.shape[1]) or not y_r.is_floating_point():
                raise CloudError("the cloud answered an experts request with a malformed tensor")
            self.remote_rows += y_r.shape[0]
            y[r_rows] += y_r.to(x.device, x.dtype)
        except CloudError as e:  # the end computes the cloud's experts itself
            self.link.lost(e)
            self.fallback_rows += int(r_rows.sum())
            y[r_rows] += self.local.compute(layer, x[r_rows], r_ids, r_w)
        return y

    def expert_bytes(self) -> int:
        return self.local.expert_bytes()
