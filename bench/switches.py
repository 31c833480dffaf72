"""The switches of the compiled decode step, in one table for the benches that A/B them (bench/decode.py,
bench/profile_decode.py, bench/kernel_census.py). All are on by default since the H200 A/B of 2026-12-01
(docs/benchmarks.md: OLMoE shape 737 -> 827 tok/s, Qwen3 shape 499 -> 545 with all four). Each is a module attribute
read when the step is traced (dynamo guards on it), set at import from its environment variable (the setting in
SWITCHES turns it off); `opt_ins` sets them for one engine's run."""
from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Iterator

#: name -> (module, attribute, the environment setting that turns it off)
SWITCHES = {"moe_sum": ("moetandem.experts.executor", "MOE_SUM_GRAPH", "MOETANDEM_MOE_SUM=kernel"),
            "rope": ("moetandem.models.components.rope", "ROPE_FLIP", "MOETANDEM_ROPE=cat"),
            "router_weights": ("moetandem.models.components.routers", "ROUTER_WEIGHTS_CAST",
                               "MOETANDEM_ROUTER_WEIGHTS=cast"),
            "qk_rope": ("moetandem.models.components.attention", "QK_ROPE_FUSED", "MOETANDEM_QK_ROPE=ops")}


def add_switches_argument(ap: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """--switches NAME...: the switches on for the run (default: all, as shipped); `--switches` alone: all off."""
    names = [k for k in SWITCHES if k not in exclude]
    ap.add_argument("--switches", nargs="*", default=names, choices=names,
                    help=f"decode-step switches on (bench/switches.py; default: all, as shipped: {names}); "
                         "--switches alone: all off")


@contextlib.contextmanager
def opt_ins(on: tuple[str, ...] | list[str]) -> Iterator[None]:
    """The SWITCHES named in `on` set, the others cleared, whatever the environment says; restored afterwards."""
    unknown = set(on) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown switches {sorted(unknown)}; known: {list(SWITCHES)}")
    mods = {k: importlib.import_module(m) for k, (m, _, _) in SWITCHES.items()}
    before = {k: getattr(mods[k], a) for k, (_, a, _) in SWITCHES.items()}
    for k, (_, a, _) in SWITCHES.items():
        setattr(mods[k], a, k in on)
    try:
        yield
    finally:
        for k, (_, a, _) in SWITCHES.items():
            setattr(mods[k], a, before[k])
