"""Hardware-aware gating: live device profile, local expert selection and the group gate.

`attach_gate(engine, "group")` makes every MoE block route through a GatedRouter over the experts that are
local now; "masked" is plain masked gating (SwapMoE); "off" restores the original router exactly."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from moetandem.errors import InvalidRequestError
from moetandem.gating.group_gate import GatedRouter, load_gates
from moetandem.gating.local import LocalSelector
from moetandem.gating.profile import DeviceProfile, ProfileMonitor, measure_profile

if TYPE_CHECKING:
    from moetandem.engine import Engine

GATES = ("off", "masked", "group")

__all__ = ["GATES", "DeviceProfile", "GatedRouter", "LocalSelector", "ProfileMonitor", "attach_gate",
           "measure_profile"]


def attach_gate(engine: "Engine", mode: str, cost: float = math.inf, latency_budget_s: float = 0.0,
                remote: dict[int, list[int]] | None = None, monitor: ProfileMonitor | None = None
                ) -> GatedRouter | None:
    """Route every MoE block of `engine` through `mode` ("off", "masked", "group"). cost: gate weight above which
    a non-local expert of the token's original top-k is still used (inf: local experts only). latency_budget_s:
    per layer and step, time non-resident experts may take (fetch or host) and still count as local. remote: per
    layer, experts placed in the cloud (split mode)."""
    if mode not in GATES:
        raise InvalidRequestError(f"unknown gate {mode!r}; choose one of {', '.join(GATES)}")
    blocks = engine.model.moe_blocks()
    if mode == "off":
        for b in blocks:
            b.router = None
        if hasattr(engine.provider, "external_observe"):
            engine.provider.external_observe = False  # the committee scores the routing it computes again
        engine.gate = None
        return None
    provider = engine.provider
    committee = hasattr(provider, "layers") and hasattr(provider, "observe")
    if not committee and not remote:
        raise InvalidRequestError(f"--gate {mode} routes to the experts that are local now, but every expert is "
                                  "resident: add --expert-budget (or --cloud in split mode)")
    gates = None
    if mode == "group":
        gates = load_gates(engine.store.ckpt, engine.args.hidden_size, engine.args.num_experts, engine.device)
        missing = {b.layer for b in blocks} - set(gates)
        if missing:
            raise InvalidRequestError(f"the group gate file has no gate for MoE layer(s) {sorted(missing)}; "
                                      "run `moetandem calibrate --group-gate` again")
    selector = LocalSelector(provider, engine.args.num_experts, latency_budget_s, remote)
    if monitor is not None:
        monitor.on_update(selector.update)
    elif latency_budget_s > 0:
        selector.update(measure_profile(engine))
    router = GatedRouter(selector.local_mask, gates, cost, provider.observe if committee else None)
    router.selector = selector
    for b in blocks:
        b.router = router
    engine.gate = router
    return router
