"""Parameter Committee speed on the GPU: batch-1 decode tok/s and peak GPU memory versus expert budget, per
policy, against all-resident and HF transformers + accelerate offload capped at the same GPU memory, on random
bf16 checkpoints of real shapes (random routers: speed only; quality figures come from bench/committee.py).

    python bench/committee_speed.py --shapes olmoe-1b-7b qwen3-30b-a3b --out out/committee-speed
"""
from __future__ import annotations

import moetandem
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import _free  # noqa: E402
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402
from moetandem.config import parse_budget  # noqa: E402
from moetandem.experts.budget import total_expert_bytes  # noqa: E402

CONFIGS = {"exact (auto)": {"policy": "auto"}, "balanced": {"fidelity": "balanced"}, "fast": {"fidelity": "fast"},
           "lru": {"policy": "lru"}, "host-only": {"policy": "host-only"},
           # --miss-format: balanced / fast misses read an int8 / int4 host copy zero-copy (not in the default set)
           "balanced, int8 misses": {"fidelity": "balanced", "miss_format": "int8"},
           "balanced, int4 misses": {"fidelity": "balanced", "miss_format": "int4"},
           "fast, int4 misses": {"fidelity": "fast", "miss_format": "int4"},
           # --miss-reads: at most N exact (zero-copy) misses per token and layer, the rest deferred (not default)
           "balanced, <= 1 miss read": {"fidelity": "balanced", "miss_reads": 1},
           "balanced, <= 2 miss reads": {"fidelity": "balanced", "miss_reads": 2},
           # both: at most N misses read per token and layer, each from its int4 host copy
           "balanced, int4 misses, <= 1 miss read": {"fidelity": "balanced", "miss_format": "int4", "miss_reads": 1},
           "balanced, int4 misses, <= 2 miss reads": {"fidelity": "balanced", "miss_format": "int4", "miss_reads": 2},
           # --miss-tier device: the int4 copy of every expert on the GPU inside the budget; no miss crosses the bus
           "balanced, int4 miss tier": {"fidelity": "balanced", "miss_format": "int4", "miss_tier": "device"},
           "fast, int4 miss tier": {"fidelity": "fast", "miss_format": "int4", "miss_tier": "device"},
           # the tier's refresh hysteresis: --swap-margin 0 (swap on any lead: the tier before the margin) and 3
           "balanced, int4 miss tier, swap margin 0": {"fidelity": "balanced", "miss_format": "int4",
                                                       "miss_tier": "device", "swap_margin": 0.0},
           "balanced, int4 miss tier, swap margin 3": {"fidelity": "balanced", "miss_format": "int4",
                                                       "miss_tier": "device", "swap_margin": 3.0},
           # misses over the bus with the refresh's hysteresis (default margin 0 there: swaps share the bus)
           "balanced, swap margin 1": {"fidelity": "balanced", "swap_margin": 1.0},
           "exact (auto), swap margin 1": {"policy": "auto", "swap_margin": 1.0},
           # --miss-compute host (experimental): decode steps compute exact misses on the CPU while the GPU runs the
           # hits (one CUDA graph; threads: MOETANDEM_HOST_MISS_THREADS); A/B against "exact (auto)" (not default)
           "exact, host misses": {"policy": "auto", "miss_compute": "host"},
           # --expert-format: packed experts in the committee (a budget stays a fraction of the bf16 expert bytes)
           "exact, int8 experts": {"policy": "auto", "expert_format": "int8"},
           "exact, fp8 experts": {"policy": "auto", "expert_format": "fp8"},
           "exact, int4 experts": {"policy": "auto", "expert_format": "int4"},
           "balanced, int4 experts": {"fidelity": "balanced", "expert_format": "int4"}}
DEFAULT_CONFIGS = ["exact (auto)", "balanced", "fast", "lru", "host-only"]


def ours(path: Path, device: str, prompts: list[list[int]], new: int, budget: float | None, kw: dict,
         temperature: float = 0.0, repeats: int = 1) -> dict:
    """prompts: the batch, decoded together (tok/s counts every sequence). temperature > 0 samples (seeded: every
    config sees the same draws), so a random-weight model does not fall into repeating one token, whose routing then
    repeats too and flatters every cache. repeats: timed runs after the warm-up; tok/s is their median (each run's
    figure in `tok_s_runs`), the byte counters are per token over all of them."""
    # GPU memory still held when this row starts (earlier rows' engines should have left none): the row's peak is
    # counted above it, and it is reported, so a leak across loads shows instead of eating into the bound
    left = torch.cuda.memory_allocated() if device == "cuda" else 0
    t0 = time.perf_counter()
    eng = moetandem.load(path, device=device, progress=False, expert_budget=budget, compile="on", **kw)
    t1 = time.perf_counter()
    gen = dict(max_new_tokens=new, stop_on_eos=False, temperature=temperature, seed=0)
    eng.generate(prompts, **gen)  # warm-up: same cache, graph, compile, tuning
    _free()
    t2 = time.perf_counter()
    before = eng.expert_stats()
    runs = []
    for _ in range(repeats):
        eng.generate(prompts, **gen)
        runs.append(eng.last_stats.decode_tok_s)
    after = eng.expert_stats()
    # this run's share (the counters run from the load on, the warm-up's converging committee included)
    read, moved = (after.get(k, 0) - before.get(k, 0) for k in ("miss_bytes", "bytes_moved"))
    dense = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    kv = sum(c.nbytes() for c in eng._caches.values())
    # the bound: non-expert weights + the budget (as the engine read it: a fraction is of the bf16 expert
    # bytes) + KV cache + 5%
    held = (eng.provider.expert_bytes() if budget is None else
            parse_budget(budget, total_expert_bytes(eng.store, torch.bfloat16)))
    tokens = sum(len(p) + new for p in prompts) * repeats
    res = {"tok_s": statistics.median(runs), "tok_s_runs": runs, "peak_gib": (eng.peak_memory() - left) / 2**30,
           "left_before_mib": left / 2**20,
           "graph_safe": eng.graph_safe,
           "load_s": t1 - t0, "warmup_s": t2 - t1, "run_s": time.perf_counter() - t2,  # where a row's time goes
           "bound_gib": (dense + held + kv) * 1.05 / 2**30, "expert_gib": eng.provider.expert_bytes() / 2**30,
           "miss_mib_tok": read / tokens / 2**20, "moved_mib_tok": moved / tokens / 2**20,
           "run_swaps": after.get("swaps", 0) - before.get("swaps", 0), **after}
    del eng
    _free()
    return res


def accelerate_offload(path: Path, prompt: list[int], new: int, gpu_gib: float) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: f"{gpu_gib:.2f}GiB", "cpu": "500GiB"}).eval()
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        torch.cuda.synchronize()
        _free()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
    res = {"tok_s": new / (time.perf_counter() - t), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model
    _free()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b"], choices=list(SHAPES))
    ap.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row after the warm-up (median)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (tok/s counts them all)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (seeded) instead of greedy decoding")
    ap.add_argument("--hf-new-tokens", type=int, default=8, help="accelerate offload is slow: fewer tokens (0: skip it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("out/committee-speed"))
    ap.add_argument("--from-json", type=Path, nargs="+", default=[],
                    help="make the table and plot from committee_speed.json files of earlier runs instead of running")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [r for f in args.from_json for r in json.loads(f.read_text())]
    for shape in [] if args.from_json else args.shapes:
        path = args.ckpt_root / shape
        if not (path / "model.safetensors.index.json").exists():
            build_random_checkpoint(shape, path, device=args.device)
        prompts = torch.randint(2, SHAPES[shape]["vocab_size"], (args.batch, 32),
                                generator=torch.Generator().manual_seed(0)).tolist()
        full = ours(path, args.device, prompts, args.new_tokens, None, {}, args.temperature, args.repeats)
        rows.append({"shape": shape, "budget": 1.0, "config": "all resident", **full})
        keep(rows, args.out)
        for b in args.budgets:
            for label in args.configs:
                r = ours(path, args.device, prompts, args.new_tokens, b, CONFIGS[label], args.temperature,
                         args.repeats)
                rows.append({"shape": shape, "budget": b, "config": label, **r})
                keep(rows, args.out)
            if args.device == "cuda" and args.hf_new_tokens > 0:  # the GPU memory our balanced run peaked at
                at_b = [r for r in rows if r["budget"] == b and r["shape"] == shape]
                gib = next((r["peak_gib"] for r in at_b if r["config"] == "balanced"),
                           max(r["peak_gib"] for r in at_b))
                r = accelerate_offload(path, prompts[0], args.hf_new_tokens, gib)
                rows.append({"shape": shape, "budget": b, "config": "HF + accelerate offload", **r})
                keep(rows, args.out)
    lines = ["| shape | budget | config | decode tok/s | × all-resident | peak GiB | bound GiB | one CUDA graph | "
             "hit rate | swaps (since load) | misses read MiB/tok | swapped in MiB/tok | load / warm-up s |",
             "|---" * 13 + "|"]
    for r in rows:
        base = next(x["tok_s"] for x in rows if x["shape"] == r["shape"] and x["config"] == "all resident")
        looked = r.get("hits", 0) + r.get("misses", 0)
        hit = f"{r['hits'] / looked:.2f}" if looked else "–"
        lines.append(f"| {r['shape']} | {r['budget']:.2f} | {r['config']} | {r['tok_s']:.2f} | "
                     f"{r['tok_s'] / base:.2f} | {r['peak_gib']:.2f} | {r.get('bound_gib', 0):.2f} | "
                     f"{'yes' if r.get('graph_safe') else 'no'} | {hit} | {r.get('swaps', '–')} | "
                     f"{r.get('miss_mib_tok', 0):.2f} | {r.get('moved_mib_tok', float('nan')):.2f} | "
                     f"{r.get('load_s', float('nan')):.0f} / {r.get('warmup_s', float('nan')):.0f} |")
    print("\n".join(lines))
    (args.out / "committee_speed.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "committee_speed.png")


def keep(rows: list[dict], out: Path) -> None:
    """Print the row just added and rewrite committee_speed.json, so a run stopped by a time limit keeps what it
    finished."""
    print(json.dumps(rows[-1]), flush=True)
    (out / "committee_speed.json").write_text(json.dumps(rows, indent=1))


def plot(rows: list[dict], out: Path) -> None:
    """tok/s vs expert budget, one line per policy, one panel per shape (all-resident as a dashed line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        for label in dict.fromkeys(r["config"] for r in mine if r["config"] != "all resident"):
            pts = sorted((r["budget"], r["tok_s"]) for r in mine if r["config"] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        full = next(r["tok_s"] for r in mine if r["config"] == "all resident")
        ax.axhline(full, color="gray", linestyle="--", label="all resident")
        ax.set(title=shape, xlabel="expert budget (fraction of expert bytes)", ylabel="decode tok/s")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
