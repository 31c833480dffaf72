"""Routing traces: record, for every token and MoE layer, the routed expert ids and gate weights on real text,
then compute the PC-MoE observations on them (moetandem.analysis.locality) and save files and plots."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moetandem.analysis import locality
from moetandem.analysis.eval import encode_text, windows
from moetandem.experts.plan import RoutingRecorder
from moetandem.models import KVCache

if TYPE_CHECKING:
    from moetandem.engine import Engine


@contextmanager
def recording(engine: "Engine") -> Iterator[RoutingRecorder]:
    """A RoutingRecorder (ids and gate weights per MoE layer, on the host) and `tap.engine`, a view of `engine`
    that routes through it; `engine` itself is untouched."""
    tap = RoutingRecorder(engine.experts)
    tap.engine = engine.view(lambda layer, provider: tap)
    yield tap


@dataclass
class Trace:
    ids: torch.Tensor  # [N, L, k] routed experts per token and MoE layer
    weights: torch.Tensor  # [N, L, k] their gate weights
    layers: list[int]  # model layer index of each of the L MoE layers
    num_experts: int
    context: int

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights) [N, k] of the i-th MoE layer as numpy."""
        return self.ids[:, i].numpy().astype(np.int64), self.weights[:, i].float().numpy()

    def summary(self, progress: bool = False) -> dict[str, Any]:
        """Per-layer and overall observations; per-layer co-activation matrices are left out (see analyse())."""
        return self._summarise(self.analyse(progress))

    def _summarise(self, per: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {"tokens": int(self.ids.shape[0]), "num_experts": self.num_experts, "top_k": int(self.ids.shape[2]),
                "context": self.context, "overall": locality.overall(per),
                "layers": {str(l): {k: v for k, v in s.items() if k != "coactivation"} for l, s in per.items()}}

    def frequencies(self, num_layers: int, prior_tokens: float = 64.0) -> list[list[float]]:
        """[num_layers][E] the share of tokens routed to each expert (a row sums to top_k): the split scheduler's
        routing_freq (SplitProfile), from which it chooses the experts an end layer keeps local. Shrunk towards
        uniform routing by `prior_tokens` pseudo-tokens, so a short trace does not make noise look like hot
        experts; a layer without experts (dense) is uniform."""
        N, k, E = self.ids.shape[0], self.ids.shape[2], self.num_experts
        out = [[k / E] * E for _ in range(num_layers)]
        for i, layer in enumerate(self.layers):
            counts = torch.bincount(self.ids[:, i].reshape(-1).long(), minlength=E).double()
            out[layer] = ((counts + prior_tokens * k / E) / (N + prior_tokens)).tolist()
        return out

    def analyse(self, progress: bool = False) -> dict[int, dict[str, Any]]:
        out = {}
        for i, l in enumerate(tqdm(self.layers, desc="analyse", unit="layer", disable=not progress)):
            out[l] = locality.layer_summary(*self.layer(i), self.num_experts)
        return out

    def save(self, out_dir: str | Path, progress: bool = False) -> dict[str, Any]:
        """trace.safetensors, summary.json, summary.md and PNG plots in out_dir; returns the summary."""
        from moetandem.analysis import plots
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dt = torch.int16 if self.num_experts <= torch.iinfo(torch.int16).max else torch.int32
        meta = {"layers": json.dumps(self.layers), "num_experts": str(self.num_experts), "context": str(self.context)}
        per = self.analyse(progress)
        co = torch.from_numpy(np.stack([per[l]["coactivation"] for l in self.layers])).float()  # [L, E, E]
        save_file({"ids": self.ids.to(dt).contiguous(), "weights": self.weights.to(torch.float16).contiguous(),
                   "coactivation": co.contiguous()}, str(out / "trace.safetensors"), metadata=meta)
        summary = self._summarise(per)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(summary_markdown(summary))
        plots.save_all(self, per, out)
        return summary

    @staticmethod
    def load(path: str | Path) -> "Trace":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return Trace(f.get_tensor("ids").long(), f.get_tensor("weights").float(), json.loads(meta["layers"]),
                         int(meta["num_experts"]), int(meta["context"]))


def trace_ids(engine: "Engine", ids: Sequence[int], *, context: int = 256, progress: bool = True) -> Trace:
    """trace() on token ids (no tokenizer needed)."""
    wins = windows(ids, context, engine.args.max_position_embeddings)
    with recording(engine) as tap, torch.inference_mode():
        for w in tqdm(wins, desc="trace", unit="window", disable=not progress):
            n = len(w)
            cache = KVCache(engine.args, 1, n, engine.device, engine.dtype)
            pos = torch.arange(n, device=engine.device)[None]
            last = torch.tensor([n - 1], device=engine.device)  # routing is all we want: skip most of lm_head
            tap.engine.forward(torch.tensor([w], device=engine.device), pos, cache, kv_len=n, last_only=last)
    routing = tap.routing()
    layers = sorted(routing)
    rid = torch.stack([routing[l][0] for l in layers], dim=1)  # [N, L, k]
    rw = torch.stack([routing[l][1] for l in layers], dim=1)
    return Trace(rid, rw, layers, engine.args.num_experts, context)


def trace(engine: "Engine", text: str, *, context: int = 256, max_tokens: int | None = None,
          progress: bool = True) -> Trace:
    """Route `text` (whole windows of `context` tokens, each from a fresh KV cache) and record every MoE layer's
    expert ids and gate weights per token."""
    return trace_ids(engine, encode_text(engine, text, max_tokens), context=context, progress=progress)


def summary_markdown(s: dict[str, Any]) -> str:
    """A table of the observations, one row per MoE layer and one for all layers."""
    E = s["num_experts"]
    sizes = sorted({max(1, E // 8), max(1, E // 4), max(1, E // 2)})
    head = (["layer", "reuse median", "reuse mean"] + [f"OPT@{c}" for c in sizes] + [f"LRU@{c}" for c in sizes]
            + ["top10% share", "top25% share", "gini", "H/Hmax"] + [f"w{k}" for k in s["overall"]["low_weight"]]
            + ["top pair (lift)"])
    rows = []
    for l, x in s["layers"].items():
        p, r = x["popularity"], x["reuse"]
        pair = x["top_pairs"][0] if x["top_pairs"] else None
        rows.append([l, _f(r["median"], 0), _f(r["mean"], 1)]
                    + [_f(x["hit_rate_optimal"][c - 1]) for c in sizes] + [_f(x["hit_rate_lru"][c - 1]) for c in sizes]
                    + [_f(p["top10_share"]), _f(p["top25_share"]), _f(p["gini"]), _f(p["entropy_ratio"])]
                    + [_f(v) for v in x["low_weight"].values()]
                    + [f"{pair['a']}+{pair['b']} ({pair['lift']:.1f})" if pair else "-"])
    o = s["overall"]
    rows.append(["**all**", _f(o["reuse_median"], 0), _f(o["reuse_mean"], 1)]
                + [_f(o["hit_rate_optimal"][c - 1]) for c in sizes] + [_f(o["hit_rate_lru"][c - 1]) for c in sizes]
                + [_f(o["top10_share"]), _f(o["top25_share"]), _f(o["gini"]), _f(o["entropy_ratio"])]
                + [_f(v) for v in o["low_weight"].values()] + [""])
    lines = [f"Routing trace: {s['tokens']} tokens, {len(s['layers'])} MoE layers, {E} experts, top-{s['top_k']}, "
             f"windows of {s['context']} tokens. OPT@c / LRU@c: hit rate of a warm cache of c experts per layer "
             f"(Belady optimal / LRU); w<t: share of routed experts with gate weight below t.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
