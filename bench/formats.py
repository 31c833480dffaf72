"""Expert formats: quality against bf16 (perplexity, top-1 agreement, KL) and GPU decode speed / peak memory.

    # quality on the shipped demo MoE and the WikiText-2 validation text (CPU is fine)
    python bench/formats.py quality --device cpu --max-tokens 32768
    # batch-1 decode on random checkpoints of real shapes: every expert resident, and an expert budget of 30% of
    # the bf16 expert bytes (--expert-budget 0.3: a fraction is always of the bf16 bytes), per format
    python bench/formats.py speed --shapes olmoe-1b-7b qwen3-30b-a3b-24l
    # both, and one table per format: bytes per expert, Δppl / top-1 / KL, and per shape tok/s, × bf16, peak memory
    python bench/formats.py table --shapes olmoe-1b-7b qwen3-30b-a3b-24l --max-tokens 32768

Each mode prints a markdown table and writes it, with the rows as JSON, under --out."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moetandem  # noqa: E402
from moetandem.experts.formats import ExpertFormat  # noqa: E402

FORMATS = ("bf16", "int8", "fp8", "int4", "mxfp4")
WIKITEXT = Path("/work/shared/data/eval/wikitext2_valid.txt")


def bytes_per_expert(engine: moetandem.Engine, name: str) -> int:
    """One expert's bytes in `name` with bf16 compute (as on a GPU), whatever dtype this run computes in."""
    st = engine.store
    return ExpertFormat(name, st.inter, st.hidden, torch.bfloat16, bias=st.activation.bias).nbytes


def quality(args: argparse.Namespace) -> list[dict]:
    """Every format on the same windows, each window's bf16 logits computed once: perplexity, and top-1 agreement
    and mean KL(bf16 || format) per predicted token."""
    import math

    import torch.nn.functional as F
    from moetandem.analysis.eval import encode_text, window_logits, windows
    from moetandem.assets import demo_model_path
    model = args.model or demo_model_path()
    kw = dict(device=args.device, progress=True, use_graphs=False)
    engines, load_s = {}, {}
    for name in args.formats:
        t = time.perf_counter()
        engines[name] = moetandem.load(model, expert_format=name, **kw)
        load_s[name] = time.perf_counter() - t
    ref = engines["bf16"]
    ids = encode_text(ref, args.data.read_text(encoding="utf-8"), args.max_tokens)
    acc = {n: {"nll": 0.0, "agree": 0, "kl": 0.0} for n in engines}
    total = 0
    with torch.inference_mode():
        for w in windows(ids, args.context, ref.args.max_position_embeddings):
            tgt = torch.tensor(w[1:], device=ref.device)[:, None]
            rlogp = None
            for name, eng in engines.items():  # bf16 first
                logp = F.log_softmax(next(window_logits(eng, w, args.context, None))[1][:-1], dim=-1)  # [n-1, V]
                rlogp = logp if rlogp is None else rlogp
                a = acc[name]
                a["nll"] -= float(logp.gather(1, tgt).sum())
                a["agree"] += int((logp.argmax(-1) == rlogp.argmax(-1)).sum())
                a["kl"] += float((rlogp.exp() * (rlogp - logp)).sum())
            total += len(w) - 1
    base = math.exp(acc["bf16"]["nll"] / total)
    rows = []
    for name, a in acc.items():
        ppl = math.exp(a["nll"] / total)
        rows.append({"format": name, "bytes_per_expert": bytes_per_expert(ref, name), "ppl": ppl,
                     "dppl_pct": 100 * (ppl / base - 1), "top1": a["agree"] / total, "kl": a["kl"] / total,
                     "tokens": total, "load_s": load_s[name]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def speed(args: argparse.Namespace) -> list[dict]:
    from bench.decode import _free
    from bench.shapes import SHAPES, build_random_checkpoint
    rows = []
    for shape in args.shapes:
        path = args.ckpt_root / shape
        if not (path / "model.safetensors.index.json").exists():
            build_random_checkpoint(shape, path, device=args.device)
        prompt = torch.randint(2, SHAPES[shape]["vocab_size"], (32,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        for name in args.formats:
            for budget in (None, args.budget) if args.budget > 0 and name in args.budget_formats else (None,):
                eng = moetandem.load(path, device=args.device, progress=False, expert_budget=budget,
                                     compile=args.compile, expert_format=name)
                eng.generate([prompt], max_new_tokens=args.new_tokens, stop_on_eos=False)  # warm-up
                _free()
                eng.generate([prompt], max_new_tokens=args.new_tokens, stop_on_eos=False)
                slots = getattr(eng.provider, "layers", None)
                rows.append({"shape": shape, "format": name, "budget": "all" if budget is None else budget,
                             "bytes_per_expert": bytes_per_expert(eng, name), "tok_s": eng.last_stats.decode_tok_s,
                             "peak_gib": eng.peak_memory() / 2**30,
                             "resident": 1.0 if slots is None else
                             sum(s.n for s in slots.values()) / (eng.store.num_experts * len(slots)),
                             "graph_safe": eng.graph_safe, **eng.expert_stats()})
                print(json.dumps(rows[-1]), flush=True)
                del eng
                _free()
    return rows


def table(rows: list[dict], mode: str) -> str:
    if mode == "quality":
        out = ["| format | bytes / expert | ppl | Δ ppl vs bf16 | top-1 agreement | KL (nats) |",
               "|---|---|---|---|---|---|"]
        out += [f"| {r['format']} | {r['bytes_per_expert']:,} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f}% | "
                f"{r['top1']:.4f} | {r['kl']:.5f} |" for r in rows]
    else:
        out = ["| shape | format | budget | bytes / expert | experts resident | tok/s | peak GiB |",
               "|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['format']} | {r['budget']} | {r['bytes_per_expert']:,} | {r['resident']:.0%} | "
                f"{r['tok_s']:.1f} | {r['peak_gib']:.2f} |" for r in rows]
    return "\n".join(out)


def combined(qrows: list[dict], srows: list[dict]) -> str:
    """One row per format: its quality on the demo text and, per shape, all-resident decode speed and memory (and
    the budget row's, where the format has one)."""
    shapes = list(dict.fromkeys(r["shape"] for r in srows))
    head = (f"| format | bytes / expert ({shapes[0] if shapes else 'quality model'}) | Δ ppl vs bf16 (quality "
            "model) | top-1 agreement | KL (nats) |")
    rule = "|---|---|---|---|---|"
    for sh in shapes:
        head += f" {sh}: tok/s all resident (× bf16) | peak GiB | tok/s at budget (experts resident) |"
        rule += "---|---|---|"
    out = [head, rule]
    for q in qrows:
        fmt = q["format"]
        mine = [r for r in srows if r["format"] == fmt]
        nbytes = next((r["bytes_per_expert"] for r in mine if r["shape"] == shapes[0]), q["bytes_per_expert"])
        line = f"| {fmt} | {nbytes:,} | {q['dppl_pct']:+.2f}% | {q['top1']:.4f} | {q['kl']:.5f} |"
        for sh in shapes:
            full = next((r for r in mine if r["shape"] == sh and r["budget"] == "all"), None)
            base = next((r for r in srows if r["shape"] == sh and r["format"] == "bf16" and r["budget"] == "all"), None)
            part = next((r for r in mine if r["shape"] == sh and r["budget"] != "all"), None)
            speed = (f"{full['tok_s']:.1f} ({full['tok_s'] / base['tok_s']:.2f}×)" if full and base else "–")
            peak = f"{full['peak_gib']:.2f}" if full else "–"
            at = f"{part['tok_s']:.1f} ({part['resident']:.0%})" if part else "–"
            line += f" {speed} | {peak} | {at} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["quality", "speed", "table"])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("out/formats"))
    q = ap.add_argument_group("quality")
    q.add_argument("--model", help="checkpoint (default: the shipped demo MoE)")
    q.add_argument("--data", type=Path, default=WIKITEXT, help="evaluation text (default: WikiText-2 validation)")
    q.add_argument("--context", type=int, default=256)
    q.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    s = ap.add_argument_group("speed")
    s.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b-24l"])
    s.add_argument("--ckpt-root", type=Path, default=Path("/dev/shm/moetandem-bench"))
    s.add_argument("--budget", type=float, default=0.3, help="expert budget, a fraction of the bf16 expert bytes "
                   "(0: all-resident rows only)")
    s.add_argument("--budget-formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                   help="formats that also get a row at --budget (default: all)")
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--compile", default="on", choices=["auto", "on", "off"])
    args = ap.parse_args()
    if "bf16" not in args.formats:
        args.formats = ["bf16", *args.formats]  # the baseline
    args.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[dict]] = {}
    for mode in ("quality", "speed") if args.mode == "table" else (args.mode,):
        rows = done[mode] = quality(args) if mode == "quality" else speed(args)
        md = table(rows, mode)
        print(md)
        (args.out / f"{mode}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"{mode}.md").write_text(md + "\n")
    if args.mode == "table":
        md = combined(done["quality"], done["speed"])
        print(md)
        (args.out / "table.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
