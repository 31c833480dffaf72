"""Where a long prompt's prefill time goes, ours beside transformers' in one run: torch profiler (CUDA activity)
over one prefill each, kernels grouped by role (the roles of bench/profile_decode.py), and the top kernels.

    python bench/profile_prefill.py --shapes qwen3-30b-a3b-24l --prompt-len 512 --out out/profile_prefill

Our side is `generate(max_new_tokens=1)`: the prefill forward, the first token and the batcher's setup, as
`bench/decode.py` times it; transformers' is one forward over the prompt (as `bench/decode.py` times it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moetandem  # noqa: E402
from bench.profile_decode import tally  # noqa: E402
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402


def kernels(fn: Callable[[], object], repeats: int = 3) -> dict:
    """Profile `repeats` calls of fn (after one warm-up call): µs per call by role and the top kernels."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    roles, names, _ = tally(prof)
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:20]
    return {"roles": {r: {"us": t / repeats, "kernels": c / repeats} for r, (t, c) in roles.items()},
            "top": [{"name": n, "us": round(t / repeats, 1), "launches": c / repeats} for n, (t, c) in top]}


def ours(path: Path, prompt: list[int]) -> dict:
    eng = moetandem.load(path, device="cuda", progress=False)
    return kernels(lambda: eng.generate([prompt], max_new_tokens=1, stop_on_eos=False))


def hf(path: Path, prompt: list[int]) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        return kernels(lambda: model(ids, attention_mask=torch.ones_like(ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b-24l"], choices=list(SHAPES))
    ap.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("out/profile_prefill"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_prefill needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| shape | role | ours µs | kernels | transformers µs | kernels |", "|---|---|---|---|---|---|"]
    out = {}
    for name in args.shapes:
        path = args.ckpt_root / name
        if not (path / "model.safetensors.index.json").exists():
            build_random_checkpoint(name, path, device="cuda")
        vocab = SHAPES[name]["vocab_size"]
        prompt = torch.randint(2, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        res = out[name] = {"ours": ours(path, prompt)}
        torch.cuda.empty_cache()  # each side's model is freed when its function returns
        res["hf"] = hf(path, prompt)
        torch.cuda.empty_cache()
        a, b = res["ours"]["roles"], res["hf"]["roles"]
        for r in sorted(set(a) | set(b), key=lambda r: -max(a.get(r, {"us": 0})["us"], b.get(r, {"us": 0})["us"])):
            x, y = a.get(r, {"us": 0.0, "kernels": 0}), b.get(r, {"us": 0.0, "kernels": 0})
            lines.append(f"| {name} | {r} | {x['us']:.0f} | {x['kernels']:.0f} | {y['us']:.0f} | {y['kernels']:.0f} |")
        tot = [sum(v["us"] for v in d.values()) for d in (a, b)]
        lines.append(f"| {name} | **all kernels** | {tot[0]:.0f} | – | {tot[1]:.0f} | – |")
        for side in ("ours", "hf"):
            lines += ["", f"top kernels, {side} ({name}, {args.prompt_len}-token prompt): µs, launches"]
            lines += [f"  {k['us']:9.1f} {k['launches']:6.1f}  {k['name']}" for k in res[side]["top"]]
    table = "\n".join(lines)
    print(table)
    (args.out / "profile_prefill.md").write_text(table + "\n")
    (args.out / "profile_prefill.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
