"""Calibrating activation codecs on text: collect the residual stream at candidate cuts, fit PCA codecs,
fine-tune them by KL distillation through the rest of the model, measure perplexity with the codec inserted,
and keep them in one safetensors file next to the checkpoint keyed by its fingerprint (never recomputed
silently: load_codec raises when a codec is missing or made for another checkpoint).

A cut c in 0..L means "the activations entering layer c": c = 0 is the embedding output, c = L the last
layer's output (what norm + lm_head read)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from moetandem.analysis.eval import encode_text, evaluate_ids, windows
from moetandem.checkpoint import Checkpoint
from moetandem.errors import CalibrationError, InvalidRequestError
from moetandem.products import product_path, read_product, write_product
from moetandem.models import KVCache
from moetandem.split.codec import ActivationCodec, fit_pca

if TYPE_CHECKING:
    from moetandem.engine import Engine

FILE = "moetandem-codec.safetensors"
KIND = "activation-codec"


def _cut_module(engine: "Engine", cut: int) -> torch.nn.Module:
    L = engine.args.num_layers
    if not 0 <= cut <= L:
        raise InvalidRequestError(f"cut must be in 0..{L} (activations entering that layer), got {cut}")
    return engine.model.model.embed_tokens if cut == 0 else engine.model.model.layers[cut - 1]


@contextmanager
def codec_inserted(engine: "Engine", cut: int, codec: ActivationCodec, quantize: bool = True) -> Iterator[None]:
    """Every forward of the engine's model passes the activations at `cut` through decode(encode(·)) (with the
    forward's token ids, for a codec with token side information)."""
    ids: dict[str, torch.Tensor] = {}
    tap = engine.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: ids.__setitem__("t", a[0]))
    hook = _cut_module(engine, cut).register_forward_hook(
        lambda m, i, out: codec.roundtrip(out, quantize, ids.get("t") if codec.side is not None else None))
    try:
        yield
    finally:
        hook.remove()
        tap.remove()


def _forward(engine: "Engine", batch: list[list[int]]) -> torch.Tensor:
    """Logits [B, n, V] of equal-length windows, over a fresh KV cache."""
    n = len(batch[0])
    ids = torch.tensor(batch, device=engine.device)  # [B, n]
    pos = torch.arange(n, device=engine.device).expand(len(batch), n)
    cache = KVCache(engine.args, len(batch), n, engine.device, engine.dtype)
    return engine.forward(ids, pos, cache, kv_len=n)


def calibration_windows(engine: "Engine", ids: Sequence[int], context: int, max_tokens: int) -> list[list[int]]:
    """Full windows of `context` tokens from the first max_tokens ids."""
    wins = windows(list(ids[:max_tokens]), context, engine.args.max_position_embeddings)
    return [w for w in wins if len(w) == context] or wins[:1]


class _Stop(Exception):
    pass


def collect_activations(engine: "Engine", wins: list[list[int]], cuts: Sequence[int], progress: bool = True
                        ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The activations [N, H] (float32, host) entering each cut layer over the windows, and their token ids [N].
    The forward stops after the last cut (no later layers, no lm_head)."""
    rows: dict[int, list[torch.Tensor]] = {c: [] for c in cuts}
    last = max(cuts)

    def keep(c: int, out: torch.Tensor) -> None:
        rows[c].append(out.reshape(-1, out.shape[-1]).float().cpu())
        if c == last:
            raise _Stop

    hooks = [_cut_module(engine, c).register_forward_hook(lambda m, i, out, c=c: keep(c, out)) for c in cuts]
    try:
        with torch.inference_mode():
            for w in tqdm(wins, desc="activations", unit="window", disable=not progress):
                try:
                    _forward(engine, [w])
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {c: torch.cat(r) for c, r in rows.items()}, torch.tensor([t for w in wins for t in w])


def finetune(engine: "Engine", codec: ActivationCodec, cut: int, wins: list[list[int]], steps: int = 100,
             lr: float = 1e-3, batch: int = 4, progress: bool = True) -> list[float]:
    """Distil: train enc/dec/mean so the model's next-token distribution with the codec (straight-through int8)
    matches the model without it, KL(teacher || student). Returns the loss per step."""
    if steps <= 0:
        return []
    with torch.inference_mode():
        teacher = [F.log_softmax(_forward(engine, wins[i:i + batch]).float(), -1)
                   for i in range(0, len(wins), batch)]  # [b, n, V] each
    params = codec.parameters()
    frozen = [p for p in engine.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    try:
        with codec_inserted(engine, cut, codec), torch.enable_grad():
            for step in tqdm(range(steps), desc=f"fine-tune cut {cut} r{codec.rank}", disable=not progress):
                j = step % len(teacher)
                logp = F.log_softmax(_forward(engine, wins[j * batch:(j + 1) * batch]).float(), -1)  # [b, n, V]
                t = teacher[j]
                loss = (t.exp() * (t - logp)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    codec.info["finetune_steps"] = codec.info.get("finetune_steps", 0) + steps
    return losses


def codec_perplexity(engine: "Engine", ids: Sequence[int], cut: int, codec: ActivationCodec | None,
                     context: int = 256) -> float:
    """Perplexity on ids with the codec inserted at `cut` (None: without a codec)."""
    if codec is None:
        return evaluate_ids(engine, ids, context=context, progress=False).perplexity
    with codec_inserted(engine, cut, codec):
        return evaluate_ids(engine, ids, context=context, progress=False).perplexity


def fit_codecs(engine: "Engine", texts: Sequence[str] | Sequence[int], cut_layers: Sequence[int],
               ranks: Sequence[int], max_tokens: int = 16384, finetune_steps: int = 0, finetune_tokens: int = 4096,
               lr: float = 1e-3, eval_ids: Sequence[int] | None = None, context: int = 128,
               side_info: bool = True, progress: bool = True) -> dict[tuple[int, int], ActivationCodec]:
    """A codec per (cut, rank) from calibration text (training text, never the eval text; strings, or token
    ids): PCA of the activations entering each cut over max_tokens tokens, then finetune_steps of KL
    distillation on the first finetune_tokens. side_info: condition on the token ids (see codec.py). With eval_ids, each codec's info gets its perplexity and the
    increase over no codec ("ppl", "base_ppl", "ppl_increase")."""
    ids = list(texts) if not texts or isinstance(texts[0], int) else [
        t for x in texts for t in encode_text(engine, str(x), max_tokens)]
    wins = calibration_windows(engine, ids, context, max_tokens)
    acts, tokens = collect_activations(engine, wins, cut_layers, progress)
    n_tune = max(1, finetune_tokens // context)
    tune = wins[:: max(1, len(wins) // n_tune)][:n_tune]  # spread over the calibration text
    base = codec_perplexity(engine, eval_ids, 0, None) if eval_ids is not None else None
    out = {}
    bar = tqdm(total=len(cut_layers) * len(ranks), desc="codecs", unit="codec", disable=not progress)
    for c in cut_layers:
        for r in ranks:
            codec = fit_pca(acts[c], r, engine.dtype, tokens=tokens if side_info else None,
                            vocab_size=engine.args.vocab_size)
            codec.info["cut_layer"] = c
            finetune(engine, codec, c, tune, finetune_steps, lr, progress=False)
            if eval_ids is not None and base is not None:
                ppl = codec_perplexity(engine, eval_ids, c, codec)
                codec.info |= {"ppl": ppl, "base_ppl": base, "ppl_increase": ppl / base - 1,
                               "eval_tokens": len(eval_ids)}
            out[(c, r)] = codec
            bar.update(1)
    bar.close()
    return out


# ------------------------------------------------------------------ the codec file of a checkpoint

def codec_path(ckpt: Checkpoint) -> Path:
    """Next to the checkpoint, or in ~/.cache/moetandem keyed by the fingerprint when it is read-only."""
    return product_path(ckpt, FILE)


def save_codecs(ckpt: Checkpoint, codecs: dict[tuple[int, int], ActivationCodec]) -> Path:
    """Add these codecs to the checkpoint's codec file; they replace every codec of their cuts (the ranks of a
    cut share one side table, fitted together)."""
    path = codec_path(ckpt)
    tensors, infos = _read_all(path, ckpt.fingerprint()) if path.is_file() else ({}, {})
    cuts = {c for c, _ in codecs}
    tensors = {k: v for k, v in tensors.items() if int(k.split(".")[0][3:]) not in cuts}
    infos = {k: v for k, v in infos.items() if int(k.split(".")[0]) not in cuts}
    for (c, r), codec in codecs.items():  # the side table is one per cut, shared by its ranks
        tensors |= codec.tensors(f"cut{c}.r{r}.", side_key=f"cut{c}.side")
        infos[f"{c}.{r}"] = codec.info
    return write_product(ckpt, FILE, KIND, tensors, {"codecs": json.dumps(infos)}, path)


def _read_all(path: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    got = read_product(None, path, KIND, "moetandem calibrate --codec", fingerprint=fingerprint)
    if got is None:
        raise CalibrationError(f"no codec file at {path}; run `moetandem calibrate --codec`")
    tensors, meta = got
    try:
        return tensors, json.loads(meta.get("codecs") or "{}")
    except ValueError:
        raise CalibrationError(f"{path} has unreadable codec metadata; run `moetandem calibrate --codec`") from None


def codec_table(ckpt_or_path: Checkpoint | str | Path, fingerprint: str | None = None) -> dict[tuple[int, int], dict]:
    """(cut, rank) → info (measured quality included) of every codec in the file."""
    path, fp = _locate(ckpt_or_path, fingerprint)
    if not path.is_file():
        return {}
    _, infos = _read_all(path, fp) if fp else _read_all(path, _file_fingerprint(path))
    return {(int(k.split(".")[0]), int(k.split(".")[1])): v for k, v in infos.items()}


def load_codec(ckpt_or_path: Checkpoint | str | Path, cut_layer: int, rank: int, dtype: torch.dtype = torch.float32,
               fingerprint: str | None = None) -> ActivationCodec:
    """The codec for (cut_layer, rank) of a checkpoint (a Checkpoint or its directory: fingerprint checked) or
    from a codec file (checked against `fingerprint` when given). CalibrationError when absent or foreign."""
    path, fp = _locate(ckpt_or_path, fingerprint)
    if not path.is_file():
        raise CalibrationError(f"no codec file at {path}; run `moetandem calibrate --codec --cuts {cut_layer} "
                               f"--ranks {rank}`")
    tensors, infos = _read_all(path, fp or _file_fingerprint(path))
    p = f"cut{cut_layer}.r{rank}."
    if p + "enc" not in tensors:
        have = ", ".join(f"cut {k.split('.')[0]} rank {k.split('.')[1]}" for k in sorted(infos)) or "none"
        raise CalibrationError(f"{path} has no codec for cut {cut_layer} rank {rank} (has: {have}); run "
                               f"`moetandem calibrate --codec --cuts {cut_layer} --ranks {rank}`")
    info = infos.get(f"{cut_layer}.{rank}", {})
    side = tensors.get(f"cut{cut_layer}.side") if info.get("side") else None
    if info.get("side") and side is None:
        raise CalibrationError(f"{path} lacks the side table of cut {cut_layer}; run `moetandem calibrate --codec` again")
    return ActivationCodec(tensors[p + "mean"], tensors[p + "enc"], tensors[p + "dec"], dtype, info, side)


def _locate(ckpt_or_path: Checkpoint | str | Path, fingerprint: str | None) -> tuple[Path, str | None]:
    if isinstance(ckpt_or_path, Checkpoint):
        return codec_path(ckpt_or_path), ckpt_or_path.fingerprint()
    p = Path(ckpt_or_path)
    if p.is_dir():
        ckpt = Checkpoint(p)
        return codec_path(ckpt), ckpt.fingerprint()
    return p, fingerprint


def _file_fingerprint(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint", "")
    except Exception as e:
        raise CalibrationError(f"cannot read codec file {path} ({e}); run `moetandem calibrate --codec`") from None


def codec_profile(ckpt_or_path: Checkpoint | str | Path, cut: int) -> tuple[dict[int, int], dict[int, float]]:
    """(bytes per token, measured perplexity increase) by rank of the calibrated codecs at `cut`: the
    codec_bytes / codec_quality of a SplitProfile. Ranks calibrated without --eval-data have no quality entry."""
    table = {r: info for (c, r), info in codec_table(ckpt_or_path).items() if c == cut}
    nbytes = {r: r + 2 + (2 if info.get("side") else 0) for r, info in table.items()}
    return nbytes, {r: float(info["ppl_increase"]) for r, info in table.items() if "ppl_increase" in info}


def cut_codecs(ckpt_or_path: Checkpoint | str | Path) -> dict[int, dict[int, tuple[int, float]]]:
    """cut → rank → (bytes per token, measured perplexity increase) of every calibrated codec with a quality
    figure (a SplitProfile's cut_codecs); {} when the checkpoint has no codec file."""
    from moetandem.errors import MoetandemError
    try:
        table = codec_table(ckpt_or_path)
    except (MoetandemError, OSError):
        return {}
    out: dict[int, dict[int, tuple[int, float]]] = {}
    for (c, r), info in table.items():
        if "ppl_increase" in info:
            out.setdefault(c, {})[r] = (r + 2 + (2 if info.get("side") else 0), float(info["ppl_increase"]))
    return out
