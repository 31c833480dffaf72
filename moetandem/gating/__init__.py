"""Hardware-aware gating: live device profile, local expert selection and the group gate.

`build_router(...)` makes the routing hook every MoE block of a new engine uses (moetandem.runtime sets it at
build time): "group" = the learned group gate over the experts that are local now, "masked" = plain masked
gating (SwapMoE); with "off" there is no hook and the original router runs exactly."""
from __future__ import annotations

from typing import Any

import torch

from moetandem.config import GATES, GateConfig
from moetandem.errors import InvalidRequestError
from moetandem.gating.group_gate import GatedRouter, load_gates
from moetandem.gating.local import LocalSelector
from moetandem.gating.profile import DeviceProfile, ProfileMonitor, measure_profile

__all__ = ["GATES", "DeviceProfile", "GatedRouter", "LocalSelector", "ProfileMonitor", "build_router",
           "measure_profile"]


def build_router(cfg: GateConfig, provider: Any, ckpt: Any, hidden: int, num_experts: int, layers: list[int],
                 device: torch.device, remote: dict[int, list[int]] | None = None,
                 monitor: ProfileMonitor | None = None) -> GatedRouter | None:
    """The routing hook for cfg.mode, or None for "off". cost: gate weight above which a non-local expert of the
    token's original top-k is still used (inf: local experts only). latency_budget_s: per layer and step, time
    non-resident experts may take (fetch or host) and still count as local (the builder feeds the selector a
    measured profile once the engine exists). remote: per layer, experts placed in the cloud (split mode)."""
    if cfg.mode == "off":
        return None
    committee = hasattr(provider, "layers") and hasattr(provider, "observe")
    if not committee and not remote:
        raise InvalidRequestError(f"--gate {cfg.mode} routes to the experts that are local now, but every expert "
                                  "is resident: add --expert-budget (or --cloud in split mode)")
    gates = None
    if cfg.mode == "group":
        gates = load_gates(ckpt, hidden, num_experts, device)
        missing = set(layers) - set(gates)
        if missing:
            raise InvalidRequestError(f"the group gate file has no gate for MoE layer(s) {sorted(missing)}; "
                                      "run `moetandem calibrate --group-gate` again")
    selector = LocalSelector(provider, num_experts, cfg.latency_budget_s, remote)
    if monitor is not None:
        monitor.on_update(selector.update)
    router = GatedRouter(selector.local_mask, gates, cfg.cost, provider.observe if committee else None)
    router.selector = selector
    return router
