"""Calibration products of the committee: expert weight norms ‖E_i‖ and expert similarity (for substitution),
from weights or from expert outputs on calibration text. Saved next to the checkpoint (or in the user cache when
the checkpoint directory is read-only), keyed by the checkpoint's fingerprint; never recomputed silently."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from moetandem.checkpoint import Checkpoint
from moetandem.products import product_path, read_product, write_product
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.store import ExpertStore, flat_views
from moetandem.experts.tap import Tap

if TYPE_CHECKING:
    from moetandem.engine import Engine

FILE = "moetandem-calibration.safetensors"
KIND = "expert-similarity"


def calibration_path(ckpt: Checkpoint, file: str = FILE) -> Path:
    """Where this checkpoint's expert similarity file lives (moetandem.products.product_path)."""
    return product_path(ckpt, file)


def save_calibration(ckpt: Checkpoint, similarity: dict[int, torch.Tensor], norms: dict[int, torch.Tensor],
                     source: str) -> Path:
    tensors = {f"similarity.{l}": s.float() for l, s in similarity.items()}
    tensors |= {f"norm.{l}": n.float() for l, n in norms.items()}
    return write_product(ckpt, FILE, KIND, tensors, {"similarity": source})


def load_calibration(ckpt: Checkpoint) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None:
    """(similarity, norms) by layer, or None when absent, or stale (made for another checkpoint or format
    version: a warning says it is rebuilt). A corrupt file is a CalibrationError."""
    got = read_product(ckpt, calibration_path(ckpt), KIND, f"moetandem calibrate {ckpt.path}", stale="none")
    if got is None:
        return None
    tensors = got[0]
    sim = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("similarity.")}
    norms = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("norm.")}
    return sim, norms


def _cosine(v: torch.Tensor) -> torch.Tensor:
    v = torch.nn.functional.normalize(v.float().flatten(1), dim=1)  # [E, n]
    return v @ v.T  # [E, E]


def _gram(w: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """w [E, n] in any float dtype -> W Wᵀ [E, E] in float32, over column chunks (no float32 copy of all of w)."""
    g = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float32)
    for c in range(0, w.shape[1], chunk):
        part = w[:, c:c + chunk].float()  # [E, chunk]
        g += part @ part.T
    return g


def weight_calibration(store: ExpertStore, progress: bool = True) -> tuple[dict[int, torch.Tensor],
                                                                         dict[int, torch.Tensor]]:
    """Norms and cosine similarity of the flattened expert weights (reads every expert once, in the checkpoint's
    dtype: one Gram matrix per layer gives both)."""
    sim, norms = {}, {}
    dtype = store.read(store.layers[0], 0)[0].dtype if store.layers else torch.float32
    for l in tqdm(store.layers, desc="expert weights", unit="layer", disable=not progress):
        w = torch.empty(store.num_experts, store.expert_numel(), dtype=dtype)  # [E, 3IH (+ biases)]
        for e in range(store.num_experts):
            store.read_flat(l, e, dtype, out=w[e])
        g = _gram(w)  # [E, E]
        norms[l] = g.diagonal().clamp_min(0).sqrt()
        sim[l] = g / (norms[l][:, None] * norms[l][None, :]).clamp_min(1e-12)
    return sim, norms


class RowRecorder(Tap):
    """Keeps up to `limit` input rows per MoE layer."""

    def __init__(self, inner: Mapping[int, ExpertProvider], limit: int) -> None:
        super().__init__(inner)
        self.limit, self.rows = limit, {}

    def record(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        have = self.rows.setdefault(layer, [])
        room = self.limit - sum(r.shape[0] for r in have)
        if room > 0:
            have.append(x[:room].float().cpu())


def record_rows(engine: "Engine", texts: list[str] | list[list[int]], rows: int, progress: bool = True) -> dict[int, torch.Tensor]:
    """Up to `rows` input rows [N, H] of every MoE layer, from prefilling calibration texts until all are full.
    Runs on a view of `engine` (engine itself is untouched)."""
    rec = RowRecorder(engine.experts, rows)
    view = engine.view(lambda layer, provider: rec)
    for text in tqdm(texts, desc="calibration text", unit="chunk", disable=not progress):
        if all(sum(r.shape[0] for r in rec.rows.get(l, [])) >= rows for l in engine.store.layers):
            break
        view.generate([text], max_new_tokens=1)
    return {l: torch.cat(rec.rows[l]) for l in rec.rows}


def output_calibration(engine: "Engine", texts: list[str], rows: int = 512, progress: bool = True
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Similarity of expert *outputs*: every expert applied to the same calibration rows of its layer."""
    store, I, H = engine.store, engine.store.inter, engine.store.hidden
    recorded = record_rows(engine, texts, rows, progress)
    sim, norms = {}, {}
    for l in tqdm(store.layers, desc="expert outputs", unit="layer", disable=not progress):
        x = recorded[l]  # [N, H]
        outs, n = [], []
        for e in range(store.num_experts):
            flat = store.read_flat(l, e, torch.float32)
            w13, w2 = flat_views(flat, I, H, store.activation.gated)
            outs.append(store.activation.ffn(x, w13, w2))  # [N, H]
            n.append(flat.norm())
        sim[l], norms[l] = _cosine(torch.stack(outs)), torch.stack(n)
    return sim, norms
