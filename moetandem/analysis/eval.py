"""Quality measurement: perplexity of an engine on a text, and agreement with a reference engine.

The text is tokenized whole and cut into non-overlapping windows of `context` tokens; each window starts from a
fresh KV cache and predicts its tokens 1..n-1 from the prefix. With `step` each window is fed in pieces of `step`
tokens over one KV cache (`step=1` is decode-time behaviour: what a budgeted committee sees while generating).

A text-to-text (encoder-decoder) model scores each window as a source and its target: the first half of the window
is the encoder's input, the decoder predicts the second half teacher-forced from the decoder start token
(moetandem.text2text.target_logits), so the perplexity is that of the target given the source; `step` feeds the
decoder in pieces the same way."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.models import KVCache

if TYPE_CHECKING:
    from moetandem.engine import Engine


@dataclass
class EvalResult:
    tokens: int  # predicted positions (each window of n tokens predicts n-1)
    nll: float  # mean negative log-likelihood per predicted token, nats
    perplexity: float
    windows: int
    context: int
    step: int | None
    wall_s: float  # the whole evaluation, reference included
    engine_s: float  # forward passes of the evaluated engine only
    top1_agreement: float | None = None  # with a reference: fraction of positions whose argmax agrees
    mean_kl: float | None = None  # with a reference: KL(reference || engine) per position, nats
    reference_perplexity: float | None = None
    expert_stats: dict[str, float] = field(default_factory=dict)  # committee counters during this evaluation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_text(engine: "Engine", text: str, max_tokens: int | None = None) -> list[int]:
    """The whole text as token ids (one tokenizer call, so BOS appears once at the start), truncated."""
    if engine.tokenizer is None:
        raise InvalidRequestError("this checkpoint ships no tokenizer, so text cannot be evaluated")
    ids = [int(t) for t in engine.tokenizer(text, verbose=False)["input_ids"]]
    ids = ids[:max_tokens] if max_tokens is not None else ids
    bad = [t for t in ids if not 0 <= t < engine.args.vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the model's vocabulary ({engine.args.vocab_size})")
    return ids


def windows(ids: Sequence[int], context: int, max_positions: int) -> list[list[int]]:
    """Non-overlapping windows of `context` tokens; a last window of one token predicts nothing and is dropped."""
    if context < 2:
        raise InvalidRequestError(f"context must be at least 2 tokens, got {context}")
    if context > max_positions:
        raise ContextLengthError(f"context {context} exceeds the model's {max_positions} positions")
    out = [list(ids[i:i + context]) for i in range(0, len(ids), context)]
    out = [w for w in out if len(w) > 1]
    if not out:
        raise InvalidRequestError(f"the text has {len(ids)} token(s); evaluation needs at least 2")
    return out


def window_logits(engine: "Engine", window: Sequence[int], context: int, step: int | None):
    """Yield (start, logits [b-a, V] float32) for the pieces [a, b) of one window, over a fresh KV cache."""
    n = len(window)
    ids = torch.tensor([window], device=engine.device)
    pos = torch.arange(n, device=engine.device)[None]
    cache = KVCache(engine.args, 1, context, engine.device, engine.dtype)
    piece = step or n
    for a in range(0, n, piece):
        b = min(n, a + piece)
        yield a, engine.forward(ids[:, a:b], pos[:, a:b], cache, kv_len=b)[0].float()


def window_pieces(engine: "Engine", window: Sequence[int], context: int, step: int | None
                  ) -> tuple[list[int], Iterator[tuple[int, torch.Tensor]]]:
    """The tokens a window predicts and its pieces (start a, logits [b-a, V]): row i of a piece predicts
    targets[a + i]. Decoder-only: the window's tokens 1..n-1; text-to-text: its second half (see the module doc)."""
    if not engine.seq2seq:
        return list(window[1:]), window_logits(engine, window, context, step)
    from moetandem.text2text import target_logits
    half = len(window) // 2
    return list(window[half:]), target_logits(engine, window[:half], window[half:], step)


def _sync(engine: "Engine") -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before.get(k, 0) for k in after}
    if "hits" in d and "misses" in d:
        d["hit_rate"] = d["hits"] / max(1.0, d["hits"] + d["misses"])
    return d


def evaluate_ids(engine: "Engine", ids: Sequence[int], *, context: int = 256, step: int | None = None,
                 reference: "Engine | None" = None, progress: bool = True) -> EvalResult:
    """evaluate() on token ids (no tokenizer needed)."""
    if step is not None and step < 1:
        raise InvalidRequestError(f"step must be >= 1, got {step}")
    if reference is not None and reference.args.vocab_size != engine.args.vocab_size:
        raise InvalidRequestError("the reference model has another vocabulary; it must be the same model")
    wins = windows(ids, context, engine.args.max_position_embeddings)
    total = sum(len(w) - (len(w) // 2 if engine.seq2seq else 1) for w in wins)
    before = engine.expert_stats()
    nll = ref_nll = kl = 0.0
    agree, engine_s = 0, 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="eval", unit="tok", disable=not progress)
    with torch.inference_mode():
        for w in wins:
            targets, pieces = window_pieces(engine, w, context, step)
            target = torch.tensor(targets, device=engine.device)
            ref_pieces = window_pieces(reference, w, context, step)[1] if reference is not None else None
            while True:
                t1 = time.perf_counter()
                got = next(pieces, None)
                _sync(engine)
                engine_s += time.perf_counter() - t1
                if got is None:
                    break
                a, logits = got
                rlogits = next(ref_pieces)[1] if ref_pieces is not None else None  # the same piece
                m = min(logits.shape[0], len(targets) - a)  # rows with a next token to predict
                if m <= 0:
                    continue
                logp = F.log_softmax(logits[:m], dim=-1)  # [m, V]
                tgt = target[a:a + m]
                nll -= float(logp.gather(1, tgt[:, None]).sum())
                if rlogits is not None:
                    rlogp = F.log_softmax(rlogits[:m].to(logp.device), dim=-1)
                    ref_nll -= float(rlogp.gather(1, tgt[:, None]).sum())
                    agree += int((rlogp.argmax(-1) == logp.argmax(-1)).sum())
                    kl += float((rlogp.exp() * (rlogp - logp)).sum())
                bar.update(m)
    bar.close()
    mean = nll / total
    res = EvalResult(tokens=total, nll=mean, perplexity=math.exp(mean), windows=len(wins), context=context,
                     step=step, wall_s=time.perf_counter() - t0, engine_s=engine_s)
    if reference is not None:
        res.top1_agreement, res.mean_kl = agree / total, kl / total
        res.reference_perplexity = math.exp(ref_nll / total)
    after = engine.expert_stats()
    if after:
        res.expert_stats = _stats_delta(before, after)
    return res


def evaluate(engine: "Engine", text: str, *, context: int = 256, step: int | None = None,
             max_tokens: int | None = None, reference: "Engine | None" = None, progress: bool = True) -> EvalResult:
    """Perplexity of `engine` on `text` over non-overlapping windows of `context` tokens (see the module doc).
    With a reference engine (same model, e.g. all experts resident) also the top-1 agreement and the mean
    KL(reference || engine) over the same windows and pieces. max_tokens truncates the tokenized text."""
    return evaluate_ids(engine, encode_text(engine, text, max_tokens), context=context, step=step,
                        reference=reference, progress=progress)
