"""Where the time of one decode step goes: torch profiler (CUDA activity) over eager batch-1 decode steps, kernels
grouped by role, with time per layer and the bytes each role must read (its weights), against the HBM roofline.

    python bench/profile_decode.py --shapes olmoe-1b-7b qwen3-30b-a3b --out out/profile
    python bench/profile_decode.py --graphs --moe-sum kernel graph   # MOETANDEM_MOE_SUM off / on, side by side
    python bench/profile_decode.py --graphs --moe-sum kernel --switches   # every switch off (the shipped: none given)
    python bench/profile_decode.py --graphs --shapes qwen3.5-35b-a3b-8l --load "" \
        "expert_budget=0.5,fidelity=balanced,miss_format=int4,miss_tier=device"   # all resident vs the int4 tier

Each profile also reports the decode's wall time per token (the engine's own tok/s over the profiled steps), so
the gap between it and the kernels' sum (host work between steps: a committee's refresh and swaps) shows.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moetandem  # noqa: E402
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402
from bench.switches import SWITCHES, add_switches_argument, opt_ins  # noqa: E402

ROLES = [  # first match wins: (role, regex over the kernel name)
    ("moe: fused kernels", r"_gate_up_kernel|_down_kernel|_sum_kernel|_align_kernel"),
    ("moe: grouped GEMM", r"grouped|Grouped|enable_3x_kernel"),
    ("attention (SDPA)", r"flash|fmha|attention|sdpa|softmax_warp|efficient"),
    ("GEMM / GEMV (projections, router, lm_head)", r"gemm|gemv|cublas|cutlass|sm90_xmma|nvjet|splitK"),
    ("sort / top-k / scan", r"sort|topk|radix|scan|cub|bitonic"),
    ("index / gather / scatter / copy", r"index|gather|scatter|copy|Copy|cat|Cat"),
    ("triton (inductor fused)", r"triton_"),
    ("elementwise / reduce", r"elementwise|reduce|Reduce|vectorized|unrolled"),
]


def role(name: str) -> str:
    return next((r for r, pat in ROLES if re.search(pat, name)), "other")


Tally = dict[str, list[float]]  # name -> [µs, launches]


def tally(prof: torch.profiler.profile) -> tuple[Tally, Tally, dict[str, collections.Counter]]:
    """A profile's CUDA kernels: µs and launches per role and per kernel name (90 characters), and each role's
    kernel names (60 characters) with their launch counts."""
    per: Tally = collections.defaultdict(lambda: [0.0, 0])
    kernels: Tally = collections.defaultdict(lambda: [0.0, 0])
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r, us = role(ev.name), ev.time_range.elapsed_us()
            for table, key in ((per, r), (kernels, ev.name[:90])):
                table[key][0] += us
                table[key][1] += 1
            names[r][ev.name[:60]] += 1
    return per, kernels, names


def weight_bytes(cfg: dict) -> dict[str, float]:
    """Bytes one batch-1 token must read per role (bf16), from config.json."""
    H, L, k = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    I = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    attn = (2 * nq * D * H + 2 * nkv * D * H) * 2
    return {"experts": L * k * 3 * I * H * 2, "attention weights": L * attn,
            "lm_head + embed row": cfg["vocab_size"] * H * 2}


def profile(path: Path, steps: int, graphs: bool = False, moe_sum: str = "graph",
            switches: tuple[str, ...] = tuple(k for k in SWITCHES if k != "moe_sum"),
            load_kw: dict | None = None) -> dict:
    """graphs: profile the shipped decode path (CUDA graph + torch.compile; CUPTI reports the kernels a graph
    replay runs) instead of eager steps. moe_sum "graph" (shipped): MOETANDEM_MOE_SUM=graph for this engine (the sum
    over k inside the compiled step: no _sum_kernel, one launch less per MoE layer), "kernel": off. switches: the
    other switches of bench/switches.py on for this engine (default: all, as shipped); every switch not named is
    off, whatever the environment says. load_kw: more moetandem.load keywords (a committee: expert_budget, ...)."""
    with opt_ins(switches + (("moe_sum",) if moe_sum == "graph" else ())):  # read when the step is traced
        return _profile(path, steps, graphs, load_kw or {})


def _profile(path: Path, steps: int, graphs: bool, load_kw: dict) -> dict:
    eng = moetandem.load(path, device="cuda", progress=False, use_graphs=graphs, compile="on" if graphs else "off",
                         **load_kw)
    prompt = list(range(2, 34))
    eng.generate([prompt], max_new_tokens=8, stop_on_eos=False)  # warm-up, kernel tuning
    acts = [torch.profiler.ProfilerActivity.CUDA]
    before = eng.expert_stats()  # the committee's counters since load: the profiled window is their difference
    with torch.profiler.profile(activities=acts) as prof:
        eng.generate([prompt], max_new_tokens=steps + 1, stop_on_eos=False)
        torch.cuda.synchronize()
    wall_us = 1e6 / eng.last_stats.decode_tok_s  # under the profiler: its overhead included
    per, kernels, names = tally(prof)
    cfg = json.loads((path / "config.json").read_text())
    n_tok = steps + 1  # decode steps profiled (the prefill is one more forward; small next to them)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {"roles": {r: {"us_per_token": t / n_tok, "kernels_per_token": c / n_tok,
                          "top": names[r].most_common(3)} for r, (t, c) in per.items()},
            "kernels": [{"name": n, "us_per_token": round(t / n_tok, 2), "per_token": round(c / n_tok, 2)}
                        for n, (t, c) in top],
            "bytes": weight_bytes(cfg), "layers": cfg["num_hidden_layers"], "wall_us_per_token": wall_us,
            "expert_stats": eng.expert_stats(), "window_stats": window_stats(before, eng.expert_stats(), n_tok)}


def window_stats(before: dict, after: dict, tokens: int) -> dict:
    """A committee's counters over the profiled steps, per token (swaps, MiB swapped in, hits, misses); {} without
    a committee."""
    if not after:
        return {}
    d = {k: (after.get(k, 0) - before.get(k, 0)) / tokens for k in ("swaps", "hits", "misses", "bytes_moved")}
    return {"swaps": d["swaps"], "swapped_mib": d["bytes_moved"] / 2**20, "hits": d["hits"], "misses": d["misses"]}


def parse_load_kw(text: str) -> dict:
    """'expert_budget=0.5,fidelity=balanced' -> {'expert_budget': 0.5, 'fidelity': 'balanced'} ('' -> {})."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--load: {item!r} is not key=value")
        try:
            out[key] = float(val) if "." in val else int(val)
        except ValueError:
            out[key] = val
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b"], choices=list(SHAPES))
    ap.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("out/profile"))
    ap.add_argument("--graphs", action="store_true", help="profile CUDA graph + torch.compile decode (shipped path)")
    ap.add_argument("--moe-sum", nargs="+", default=None, choices=["kernel", "graph"],
                    help="the sum over k: the fused MoE's kernel, or (MOETANDEM_MOE_SUM=graph, shipped; a compiled "
                         "step only) fused into the compiled step; several: one profile each. Default: graph with "
                         "--graphs, else kernel")
    add_switches_argument(ap, exclude=("moe_sum",))
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the roofline (H200: 4.8e12)")
    ap.add_argument("--load", nargs="+", default=[""], metavar="KW",
                    help="moetandem.load keywords per profile, 'key=value,...' ('' = all resident, the default); "
                         "several: one profile each")
    args = ap.parse_args()
    args.moe_sum = args.moe_sum or (["graph"] if args.graphs else ["kernel"])
    if "graph" in args.moe_sum and not args.graphs:
        ap.error("--moe-sum graph needs --graphs: only a compiled step sums in the graph")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| shape | role | µs / token | µs / layer | kernels / token |", "|---|---|---|---|---|"]
    out = {}
    for name, mode, kw in [(s, m, k) for s in args.shapes for m in args.moe_sum for k in args.load]:
        shape = name if len(args.moe_sum) == 1 else f"{name} (moe sum: {mode})"
        shape = shape if len(args.load) == 1 else f"{shape} [{kw or 'all resident'}]"
        path = args.ckpt_root / name
        if not (path / "model.safetensors.index.json").exists():
            build_random_checkpoint(name, path, device="cuda")
        res = out[shape] = profile(path, args.steps, args.graphs, mode, tuple(args.switches), parse_load_kw(kw))
        total = sum(v["us_per_token"] for v in res["roles"].values())
        for r, v in sorted(res["roles"].items(), key=lambda kv: -kv[1]["us_per_token"]):
            lines.append(f"| {shape} | {r} | {v['us_per_token']:.1f} | {v['us_per_token'] / res['layers']:.1f} | "
                         f"{v['kernels_per_token']:.0f} |")
        nbytes = sum(res["bytes"].values())
        floor = nbytes / args.bandwidth * 1e6
        lines.append(f"| {shape} | **all kernels** | {total:.1f} | {total / res['layers']:.1f} | "
                     f"{sum(v['kernels_per_token'] for v in res['roles'].values()):.0f} |")
        lines.append(f"| {shape} | roofline: {nbytes / 1e9:.2f} GB / token at {args.bandwidth / 1e12:.1f} TB/s | "
                     f"{floor:.1f} | {floor / res['layers']:.1f} | – |")
        lines.append(f"| {shape} | wall time per token (profiler on) | {res['wall_us_per_token']:.1f} | "
                     f"{res['wall_us_per_token'] / res['layers']:.1f} | – |")
        if res["window_stats"]:
            w = res["window_stats"]
            lines.append(f"| {shape} | committee per token: {w['swaps']:.1f} swaps ({w['swapped_mib']:.1f} MiB), "
                         f"{w['hits']:.1f} hits, {w['misses']:.1f} misses | – | – | – |")
        lines += ["", f"top kernels ({shape}): µs / token, launches / token"]
        lines += [f"  {k['us_per_token']:8.1f} {k['per_token']:6.1f}  {k['name']}" for k in res["kernels"]]
    table = "\n".join(lines)
    print(table)
    (args.out / "profile.md").write_text(table + "\n")
    (args.out / "profile.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
