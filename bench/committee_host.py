"""The committee's host work per decode step: `provider.after_step()` (publish finished swaps, count tokens, read the
due layers' scores and plan swaps every --refresh-every tokens, rebuild substitute tables), in µs per step averaged
over many steps, and the refresh's score read alone (every layer at once) against one layer at a time.

On a GPU this runs between two replays of the step's CUDA graph, so every µs adds to the step; on a CPU it is the
same Python and torch work. Random shapes from bench/shapes.py (built on first use) or --model.

    python bench/committee_host.py --shapes olmoe-1b-7b-4l --device cpu
    python bench/committee_host.py --shapes olmoe-1b-7b qwen3-30b-a3b-24l --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moetandem  # noqa: E402
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, device: str, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean µs of `calls` back-to-back calls."""
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(out)[len(out) // 2]


def measure(path: Path, device: str, budget: float, fidelity: str, steps: int) -> dict:
    eng = moetandem.load(path, device=device, progress=False, expert_budget=budget, fidelity=fidelity,
                         dtype="bfloat16")
    eng.generate([[5, 6, 7, 8]], max_new_tokens=8, stop_on_eos=False)  # routing seen: scores, swaps
    c = eng.provider
    layers = list(c.store.layers)
    row = {"layers": len(layers), "experts": c.E, "budget": budget, "fidelity": fidelity,
           "after_step_us": per_call_us(lambda: c.after_step(1), device, steps),
           "scores_all_us": per_call_us(lambda: c.scorer.scores_many(layers).cpu(), device, 20),
           "scores_per_layer_us": per_call_us(
               lambda: torch.stack([c.scorer.scores_device(l) for l in layers]).cpu(), device, 20)}
    del eng
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b-4l"], choices=list(SHAPES))
    ap.add_argument("--model", type=Path, nargs="*", default=[], help="existing checkpoints instead of shapes")
    ap.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--fidelities", nargs="+", default=["exact", "balanced"])
    ap.add_argument("--steps", type=int, default=1600, help="after_step calls per repeat (a refresh every 16)")
    args = ap.parse_args()
    paths = list(args.model)
    for shape in [] if args.model else args.shapes:
        path = args.ckpt_root / shape
        if not (path / "model.safetensors.index.json").exists():
            build_random_checkpoint(shape, path, device=args.device)
        paths.append(path)
    lines = ["| model | layers × experts | budget | fidelity | after_step µs/step | score read, all layers µs | "
             "score read, layer by layer µs |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        for fid in args.fidelities:
            r = measure(path, args.device, args.budget, fid, args.steps)
            print(json.dumps({"model": path.name, **r}), flush=True)
            lines.append(f"| {path.name} | {r['layers']} × {r['experts']} | {r['budget']} | {fid} | "
                         f"{r['after_step_us']:.1f} | {r['scores_all_us']:.0f} | {r['scores_per_layer_us']:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
