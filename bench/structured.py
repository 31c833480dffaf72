"""Cost of the grammar mask (llguidance, `moetandem/serve/structured.py`) against decode time on the demo MoE.

For each batch size, B sequences decode under a JSON schema (`response_format: json_schema`) through the batcher's
per-sequence hook; the time spent inside the hooks (mask, closing plan, matcher advance) is timed apart from the
rest of each step, and the same batch decodes again without a grammar for the plain step time.

    python bench/structured.py --out out/structured        # table on stdout, structured.json, structured.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import moetandem
from moetandem.assets import demo_model_path
from moetandem.batcher import Batcher, Request
from moetandem.serve.structured import Constraint, grammar_tokenizer, json_grammar

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "tags", "address"]}


class Timed:
    def __init__(self, c: Constraint, clock: list[float]) -> None:
        self.c, self.clock = c, clock

    def process(self, row: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.c.process(row)
        self.clock[0] += time.perf_counter() - t
        return out

    def accept(self, tok: int) -> None:
        t = time.perf_counter()
        self.c.accept(tok)
        self.clock[0] += time.perf_counter() - t


def run(engine: Any, batch: int, max_new: int, constrained: bool) -> dict[str, float]:
    b = Batcher(engine, batch, 512)
    prompt = engine.tokenizer("User: describe a person as JSON\n\nAssistant:")["input_ids"]
    clock = [0.0]
    gt = grammar_tokenizer(engine)
    grammar = json_grammar(SCHEMA)
    seqs = []
    for i in range(batch):
        r = Request(list(prompt), max_new, temperature=1.0, seed=i,
                    stop_ids=frozenset(engine.eos_ids) if constrained else frozenset())
        if constrained:
            t = Timed(Constraint(gt, grammar, max_new), clock)
            r.logits_processor, r.accept = t.process, t.accept
        seqs.append(r)
    b.add(seqs)
    clock[0] = 0.0  # decode steps only
    steps, tokens, t0 = 0, 0, time.perf_counter()
    while b.active:
        tokens += len(b.step())
        steps += 1
    wall = time.perf_counter() - t0
    return {"steps": steps, "tokens": tokens, "wall_s": wall, "hook_s": clock[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/structured"))
    a = ap.parse_args()
    torch.manual_seed(0)
    engine = moetandem.load(demo_model_path(), device="cpu", dtype="float32", progress=False)
    run(engine, 2, 64, True)  # warm-up: grammar tokenizer, kernels
    rows = []
    for batch in a.batches:
        con = [run(engine, batch, a.max_new, True) for _ in range(a.repeats)]
        plain = [run(engine, batch, a.max_new, False) for _ in range(a.repeats)]
        hook = sum(r["hook_s"] for r in con) / sum(r["steps"] for r in con)
        step_con = sum(r["wall_s"] for r in con) / sum(r["steps"] for r in con)
        step_plain = sum(r["wall_s"] for r in plain) / sum(r["steps"] for r in plain)
        rows.append({"batch": batch, "plain_ms_per_step": 1e3 * step_plain, "constrained_ms_per_step": 1e3 * step_con,
                     "mask_ms_per_step": 1e3 * hook, "mask_share_of_decode": hook / (step_con - hook),
                     "tokens_per_seq": sum(r["tokens"] for r in con) / (batch * a.repeats)})
    print("| batch | plain decode ms/step | constrained ms/step | in the mask hooks ms/step | hooks / rest of step "
          "| tokens/seq |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['plain_ms_per_step']:.2f} | {r['constrained_ms_per_step']:.2f} | "
              f"{r['mask_ms_per_step']:.3f} | {100 * r['mask_share_of_decode']:.1f}% | {r['tokens_per_seq']:.0f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "structured.json").write_text(json.dumps(rows, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [str(r["batch"]) for r in rows]
    ax.bar(xs, [r["constrained_ms_per_step"] - r["mask_ms_per_step"] for r in rows], label="decode")
    ax.bar(xs, [r["mask_ms_per_step"] for r in rows], bottom=[r["constrained_ms_per_step"] - r["mask_ms_per_step"]
                                                             for r in rows], label="grammar mask")
    ax.set_xlabel("batch"), ax.set_ylabel("ms per decode step"), ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "structured.png", dpi=120)


if __name__ == "__main__":
    main()
