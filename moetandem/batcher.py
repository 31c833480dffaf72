"""Continuous batching over the slots of one KV cache: a sequence joins at the next step (its prompt is
prefilled into a free slot), decodes together with the others, and leaves when it finishes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import time
from typing import TYPE_CHECKING

import torch

from moetandem.errors import ContextLengthError
from moetandem.graphs import buckets
from moetandem.models import KVCache
from moetandem.sampling import TokenLogprob, sample, token_logprobs

if TYPE_CHECKING:
    from moetandem.engine import Engine


def cache_positions(need: int, max_positions: int) -> int:
    """KV positions per row of a batcher that must hold `need` (longest prompt + new tokens): a power of two from
    128, within the model's context unless `need` itself is longer. Clients that share a cloud cache pool with an
    engine (bench/thin_end.py) size their rows by the same rule."""
    return min(max(128, 1 << (need - 1).bit_length()), max(max_positions, need))


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    slot: int = -1
    generator: torch.Generator | None = None
    #: per-sequence hook on the sampler: maps this sequence's logits row [V] to the row it samples from (e.g. a
    #: grammar mask); `accept` then sees the token chosen. Sequences without one are untouched.
    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None
    accept: Callable[[int], None] | None = None
    #: None: no log-probabilities; k >= 0: `logprobs[i]` is out[i]'s logprob under the model's raw distribution
    #: (the step's logits before the hook, temperature and top-p) with its k best alternatives
    top_logprobs: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_pos(self) -> int:
        """Position of the last produced token, i.e. of the token fed into the next decode step."""
        return len(self.prompt) + len(self.out) - 1


class Batcher:
    def __init__(self, engine: "Engine", max_batch: int, max_len: int) -> None:
        self.engine, self.model = engine, engine.model
        self.max_batch, self.max_len = max_batch, max_len
        # one extra row: the scratch slot that padding rows of a CUDA-graph batch write into
        self.cache: KVCache = engine.kv_cache(max_batch + 1, max_len)
        self.slots: list[Request | None] = [None] * max_batch

    @property
    def active(self) -> list[Request]:
        return [s for s in self.slots if s is not None]

    def free_slots(self) -> int:
        return self.slots.count(None)

    def check_fits(self, seq: Request) -> None:
        limit = min(self.max_len, self.engine.args.max_position_embeddings)
        if len(seq.prompt) + seq.max_new_tokens > limit:
            raise ContextLengthError(f"prompt ({len(seq.prompt)} tokens) + max_new_tokens ({seq.max_new_tokens}) "
                                     f"exceeds the context of {limit} tokens")

    @torch.inference_mode()
    def add(self, seqs: list[Request]) -> list[tuple[Request, int]]:
        """Prefill new sequences (one right-padded batch) into free slots; returns their first tokens."""
        if len(seqs) > self.free_slots():
            raise RuntimeError(f"{len(seqs)} sequences but only {self.free_slots()} free slots")
        for s in seqs:
            self.check_fits(s)
        dev = self.engine.device
        for s in seqs:
            s.slot = self.slots.index(None)
            self.slots[s.slot] = s
            if s.seed is not None and s.temperature > 0:
                s.generator = torch.Generator(device=dev).manual_seed(s.seed)
        lens = [len(s.prompt) for s in seqs]
        n, Lp = len(seqs), max(lens)
        ids = torch.zeros(n, Lp, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : lens[b]] = torch.tensor(s.prompt)
        pos = torch.arange(Lp, device=dev).expand(n, Lp)
        lens_t = torch.tensor(lens, device=dev)
        valid = pos < lens_t[:, None] if min(lens) != Lp else None
        rows = torch.tensor([s.slot for s in seqs], device=dev)
        logits = self.engine.forward(ids.to(dev), pos, self.cache, Lp, valid=valid, last_only=lens_t - 1, rows=rows)
        return self._emit(seqs, logits[:, -1])

    @torch.inference_mode()
    def warm_up(self, on_size: Callable[[int, float], None] | None = None) -> list[int]:
        """Capture the decode step of every batch size the batcher can run now (CUDA graphs: compiled, tuned and
        captured), so the first batch of each size does not stall its sequences for seconds (a server calls
        this before it reports ready; on a CPU the steps run eagerly and cost a forward each). The steps are
        padding only: every row is the scratch row, so no slot's KV is touched. on_size(batch size, seconds)
        after each. Returns the sizes warmed; [] when decode steps do not go through the graphs (experts that
        are not graph-safe on a GPU decode eagerly)."""
        graphs = self.engine.graphs
        if graphs is None or graphs.capture and not self.engine.graph_safe:
            return []
        sizes = buckets(self.max_batch)
        for a in sizes:
            t = time.perf_counter()
            graphs.step([0] * a, [0] * a, [self.max_batch] * a, self.cache, scratch_row=self.max_batch)
            if on_size is not None:
                on_size(a, time.perf_counter() - t)
        return sizes

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """One decode step for every active sequence; returns (sequence, new token) pairs. A model with a
        `decode_exchange` method (split execution: split/end.py) may make several tokens per sequence in one step
        when every sequence decodes plainly (greedy or temperature / top-p, no logits processor, accept hook or
        logprobs; it advances the generators): the pairs then come in the order single steps make them."""
        seqs = self.active
        if not seqs:
            return []
        multi = getattr(self.model, "decode_exchange", None)
        if multi is not None and all(s.logits_processor is None and s.accept is None and s.top_logprobs is None
                                     for s in seqs):
            toks = multi([s.out[-1] for s in seqs], [s.next_pos for s in seqs], [s.slot for s in seqs],
                         [s.max_new_tokens - len(s.out) for s in seqs], [s.stop_ids for s in seqs], self.cache,
                         [(s.temperature, s.top_p, s.generator) for s in seqs])
            if toks is not None:
                self.engine.after_step()
                events: list[tuple[Request, int]] = []
                for j in range(max(map(len, toks), default=0)):
                    for s, t in zip(seqs, toks):
                        if j < len(t) and not s.done:
                            self._record(s, t[j], events)
                return events
        graphs = self.engine.graphs
        if graphs is not None and (not graphs.capture or self.engine.graph_safe):  # eager bookkeeping: any provider
            logits, greedy = graphs.step([s.out[-1] for s in seqs], [s.next_pos for s in seqs],
                                         [s.slot for s in seqs], self.cache, scratch_row=self.max_batch)
            self.engine.after_step()
            return self._emit(seqs, logits[: len(seqs)], greedy)
        dev = self.engine.device
        ids = torch.tensor([[s.out[-1]] for s in seqs], device=dev)  # [A, 1]
        pos = torch.tensor([[s.next_pos] for s in seqs], device=dev)  # [A, 1]
        rows = torch.tensor([s.slot for s in seqs], device=dev)  # [A]
        logits = self.engine.forward(ids, pos, self.cache, self.max_len, rows=rows)[:, -1]
        return self._emit(seqs, logits)

    def cancel(self, seq: Request) -> None:
        """Stop a sequence now and free its slot (its KV rows are simply overwritten by the next user)."""
        if not seq.done:
            seq.finish_reason = "cancelled"
        if 0 <= seq.slot < self.max_batch and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None

    def _emit(self, seqs: list[Request], logits: torch.Tensor, greedy: list[int] | None = None
              ) -> list[tuple[Request, int]]:
        # logits [A, V]; greedy rows share one argmax (`greedy`, when the step computed it already), sampled rows
        # use their own generator
        raw = logits
        processed = any(s.logits_processor is not None for s in seqs)
        if processed:
            logits = logits.clone()  # may be a CUDA-graph output buffer
            for i, s in enumerate(seqs):
                if s.logits_processor is not None:
                    logits[i] = s.logits_processor(logits[i])  # [V]
        toks = list(greedy) if greedy is not None and not processed else logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            if s.temperature > 0:
                try:
                    toks[i] = int(sample(logits[i: i + 1], s.temperature, s.top_p, s.generator)[0])
                except RuntimeError:  # e.g. non-finite probabilities: this row falls back to greedy, others go on
                    pass
        want = [i for i, s in enumerate(seqs) if s.top_logprobs is not None]
        if want:  # only then: one more read-back in this step
            k = max(seqs[i].top_logprobs or 0 for i in want)
            rows = raw if len(want) == len(seqs) else raw[torch.tensor(want, device=raw.device)]  # [W, V]
            for i, lp in zip(want, token_logprobs(rows, [toks[i] for i in want], k)):
                seqs[i].logprobs.append(lp._replace(top=lp.top[: seqs[i].top_logprobs]))
        events: list[tuple[Request, int]] = []
        for s, tok in zip(seqs, toks):
            self._record(s, tok, events)
        return events

    def _record(self, s: Request, tok: int, events: list[tuple[Request, int]]) -> None:
        """Append one new token to a sequence (and the event to `events`); end it at a stop id or its length."""
        s.out.append(tok)
        events.append((s, tok))
        if s.accept is not None:
            s.accept(tok)
        if tok in s.stop_ids:
            s.finish_reason = "stop"
        elif len(s.out) >= s.max_new_tokens:
            s.finish_reason = "length"
        if s.done:
            self.slots[s.slot] = None
