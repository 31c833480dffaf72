"""Batch-1 decode speed: moetandem all-resident (several execution variants) vs HF transformers `generate`,
on random bf16 checkpoints of real MoE shapes, in one process, one after the other.

    python bench/decode.py --shapes olmoe-1b-7b qwen3-30b-a3b --out out/decode
"""
from __future__ import annotations

import moetandem
import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402
from bench.switches import SWITCHES, opt_ins  # noqa: E402

SHIPPED = "moetandem CUDA graph + torch.compile"
ONLY = {"moe_sum": "MoE sum in graph", "rope": "RoPE flip", "router_weights": "router weights in kernel",
        "qk_rope": "fused QK RoPE"}
#: name -> moetandem.load keywords + switches (bench/switches.py's on for it, the rest off; all on is as shipped)
VARIANTS = {
    "moetandem eager": {"use_graphs": False, "compile": "off", "switches": tuple(SWITCHES)},
    "moetandem CUDA graph": {"use_graphs": True, "compile": "off", "switches": tuple(SWITCHES)},
    SHIPPED: {"use_graphs": True, "compile": "on", "switches": tuple(SWITCHES)},
    f"{SHIPPED}, switches off": {"use_graphs": True, "compile": "on", "switches": ()},
    **{f"{SHIPPED}, only {label}": {"use_graphs": True, "compile": "on", "switches": (k,)}
       for k, label in ONLY.items()},
}
AB = tuple(v for v in VARIANTS if v.startswith(f"{SHIPPED}, "))  # the switches' A/B: run when named


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks the caching host allocator keeps
        if empty_host is not None:
            empty_host()
        torch.cuda.reset_peak_memory_stats()


def bench_ours(path: Path, device: str, prompts: list[list[int]], new: int, kw: dict, repeats: int) -> dict:
    """prompts: the batch (one row per sequence). tok/s counts every sequence's tokens; prefill_tok_s is the
    prompt tokens over the prefill's time. kw: moetandem.load's keywords and switches (see opt_ins)."""
    kw = dict(kw)
    with opt_ins(kw.pop("switches", ())):
        eng = moetandem.load(path, device=device, progress=False, **kw)
        t = time.perf_counter()
        eng.generate(prompts, max_new_tokens=new)  # warm-up (graph capture, compilation, kernel tuning)
        warm_s = time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            _sync()
            t = time.perf_counter()
            g = eng.generate(prompts, max_new_tokens=new, stop_on_eos=False)[0]
            _sync()
            st = eng.last_stats
            runs.append((time.perf_counter() - t, st.decode_tok_s, st.prompt_tokens / max(st.prefill_s, 1e-9)))
        assert len(g.token_ids) == new
        e2e = statistics.median(r[0] for r in runs)
        res = {"tok_s": len(prompts) * new / e2e, "decode_tok_s": statistics.median(r[1] for r in runs),
               "prefill_tok_s": statistics.median(r[2] for r in runs), "warmup_s": warm_s,
               "peak_gib": eng.peak_memory() / 2**30, "tokens": g.token_ids[:16]}
        del eng
        _free()
    return res


def bench_hf(path: Path, device: str, prompts: list[list[int]], new: int, impl: str | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    kw = {"experts_implementation": impl} if impl else {}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the same dtype moetandem picks
    seq2seq = _seq2seq(path)  # the prompt is the encoder's input; outputs start with the decoder start token
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, device_map=device, **kw).eval()
    ids = torch.tensor(prompts, device=device)  # [B, P] (equal lengths: no padding)
    prompt = prompts[0]
    gen_kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **gen_kw)
        _sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen_kw)
        _sync()
        dt = time.perf_counter() - t
        pre = []  # prefill alone: one forward over the prompts (the decoder's first token for a seq2seq model)
        for _ in range(3):
            t = time.perf_counter()
            if seq2seq:
                model(input_ids=ids, decoder_input_ids=out[:, :1])
            else:
                model(ids, attention_mask=gen_kw["attention_mask"])
            _sync()
            pre.append(time.perf_counter() - t)
    res = {"tok_s": len(prompts) * new / dt, "prefill_tok_s": ids.numel() / statistics.median(pre),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0,
           "tokens": out[0, 1:17].tolist() if seq2seq else out[0, len(prompt):len(prompt) + 16].tolist()}
    del model
    _free()
    return res


def _seq2seq(path: Path) -> bool:
    return bool(json.loads((path / "config.json").read_text()).get("is_encoder_decoder"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b"], choices=list(SHAPES))
    ap.add_argument("--model", type=Path, nargs="*", default=[], help="existing checkpoints to run instead")
    ap.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    ap.add_argument("--out", type=Path, default=Path("out/decode"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=32, help="512 with --new-tokens 1..8 measures prefill")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (tok/s counts them all)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in AB], choices=list(VARIANTS),
                    help=f"default: all but the switches' A/B {list(AB)}")
    ap.add_argument("--hf", nargs="*", default=["default"],
                    help="HF experts_implementation values to run (default, or --hf alone: 'default')")
    ap.add_argument("--no-hf", action="store_true", help="no transformers baseline")
    ap.add_argument("--cleanup", action="store_true", help="delete each built checkpoint after its shape (RAM disk)")
    args = ap.parse_args()
    args.hf = [] if args.no_hf else args.hf or ["default"]  # `--hf` alone used to mean none: it ran no baseline
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    todo = [(p.name, p) for p in args.model] or [(s, args.ckpt_root / s) for s in args.shapes]
    for shape, path in todo:
        if not args.model and not (path / "model.safetensors.index.json").exists():
            t = time.perf_counter()
            build_random_checkpoint(shape, path, device=args.device)
            print(f"built {shape} in {time.perf_counter() - t:.0f} s", flush=True)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=gen).tolist()
        for name in args.variants:  # ours first: a slow or failing transformers baseline cannot hide them
            if args.device != "cuda" and VARIANTS[name]["use_graphs"]:
                continue
            if _seq2seq(path) and VARIANTS[name]["compile"] == "on":
                continue  # an encoder-decoder's captured step (graphs.Seq2SeqStep) is not compiled
            r = bench_ours(path, args.device, prompts, args.new_tokens, VARIANTS[name], args.repeats)
            record(results, {"shape": shape, "engine": name, **r}, args)
        for impl in args.hf:
            try:
                r = bench_hf(path, args.device, prompts, args.new_tokens, None if impl == "default" else impl)
            except Exception as e:  # an HF variant missing in this transformers version is reported, not fatal
                print(f"HF {impl} failed: {e}", flush=True)
                continue
            record(results, {"shape": shape, "engine": f"HF transformers ({impl})", **r}, args)
        if args.cleanup and not args.model:
            shutil.rmtree(path, ignore_errors=True)
    report(results, args)
    plot(results, args)


def record(results: list[dict], row: dict, args: argparse.Namespace) -> None:
    """Keep a finished row and rewrite decode.json / decode.md at once, so a run stopped by a time limit leaves
    every row it finished."""
    results.append(row)
    print(json.dumps(row), flush=True)
    (args.out / "decode.json").write_text(json.dumps(results, indent=1))
    report(results, args, echo=False)


def report(results: list[dict], args: argparse.Namespace, echo: bool = True) -> None:
    lines = [f"batch {args.batch}, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy, "
             f"{'bf16' if args.device == 'cuda' else 'fp32'} "
             f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__})", "",
             "| shape | engine | tok/s (end to end) | decode tok/s | prefill tok/s | × HF default | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        base = next((b["tok_s"] for b in results if b["shape"] == r["shape"]
                     and b["engine"] == "HF transformers (default)"), None)
        ratio = f"{r['tok_s'] / base:.1f}×" if base else "–"
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "–"
        pre = f"{r['prefill_tok_s']:.0f}" if "prefill_tok_s" in r else "–"
        lines.append(f"| {r['shape']} | {r['engine']} | {r['tok_s']:.1f} | {dec} | {pre} | {ratio} | "
                     f"{r['peak_gib']:.1f} |")
    table = "\n".join(lines)
    if echo:
        print(table)
    (args.out / "decode.md").write_text(table + "\n")


def plot(results: list[dict], args: argparse.Namespace) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in results if r["shape"] == shape]
        ax.barh([r["engine"] for r in rows], [r["tok_s"] for r in rows], color="tab:blue")
        ax.set_title(f"{shape}: batch-1 decode")
        ax.set_xlabel("tokens / s (higher is better)")
    fig.tight_layout()
    fig.savefig(args.out / "decode.png", dpi=120)


if __name__ == "__main__":
    main()
