"""Engine: generate with a built model (prefill + decode over a static KV cache, CUDA graphs on GPU)."""
from __future__ import annotations

import copy
import math
import resource
import sys
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch

from moetandem.batcher import Batcher, Request, cache_positions
from moetandem.config import parse_budget
from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.budget import total_expert_bytes
from moetandem.experts.store import ExpertStore
from moetandem.graphs import DecodeGraphs
from moetandem.models import KVCache

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens only
    text: str | None
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    peak_memory_bytes: int

    decode_tokens: int  # tokens produced by decode steps (the first token of each sequence comes from prefill)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Engine:
    """A loaded model ready to generate. Built by moetandem.runtime.build_engine (or moetandem.load), which
    chooses every feature up front: `experts` maps each MoE layer to the ExpertProvider that computes it,
    `provider` is the local provider behind them (its stats and budget), `model` is the model or a stand-in with
    the same call (split execution). Nothing is attached afterwards; `view()` makes a second engine over the
    same weights with wrapped providers (routing taps for trace / calibrate)."""

    def __init__(self, model: Any, tokenizer: Any, experts: Mapping[int, ExpertProvider], provider: ExpertProvider,
                 store: ExpertStore, device: torch.device, dtype: torch.dtype, use_graphs: bool = True,
                 gate: Any = None, split: Any = None, compile: bool = False) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.experts: dict[int, ExpertProvider] = dict(experts)
        self.provider = provider
        self.args, self.device, self.dtype = model.args, device, dtype
        self.gate, self.split = gate, split  # gating.GatedRouter / split.end.SplitModel, or None
        self.eos_ids = set(self.args.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.last_stats: GenerationStats | None = None
        #: an encoder-decoder: generate() and evaluation go through moetandem.text2text (no batcher)
        self.seq2seq = bool(getattr(self.args, "is_seq2seq", False))
        #: seq2seq generate captures its decoder step as a CUDA graph per call (graphs.Seq2SeqStep; graph-safe experts)
        self.capture_seq2seq = use_graphs and self.seq2seq and device.type == "cuda"
        use_graphs = use_graphs and not self.seq2seq
        # decode steps through static buffers: captured CUDA graphs on a GPU, the same bookkeeping run eagerly on CPU
        self.graphs = (DecodeGraphs(self.model, self.experts, compile and device.type == "cuda",
                                    capture=device.type == "cuda") if use_graphs else None)
        self._caches: dict[tuple[int, int], KVCache] = {}

    @property
    def graph_safe(self) -> bool:
        """True when a decode step may be one CUDA graph: every provider runs without host syncs."""
        return all(p.graph_safe for p in self.experts.values())

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
                valid: torch.Tensor | None = None, last_only: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The model's forward with this engine's experts (see MoEForCausalLM.forward); logits [B, L|1, V]."""
        logits = self.model(input_ids, pos, cache, kv_len, self.experts, valid, last_only, rows)
        self.after_step()
        return logits

    def after_step(self) -> None:
        """Between-step bookkeeping of the providers (committee refresh, publishing finished swaps), outside any
        CUDA graph; called after every forward and graph replay."""
        for p in {id(p): p for p in self.experts.values()}.values():
            p.after_step()

    def view(self, wrap: Callable[[int, ExpertProvider], ExpertProvider]) -> "Engine":
        """A second engine over the same weights and caches whose MoE layer l runs wrap(l, provider_l); no CUDA
        graphs. The original engine is untouched (so a split engine keeps its cloud routing)."""
        other = copy.copy(self)
        other.experts = {l: wrap(l, p) for l, p in self.experts.items()}
        other.graphs, other._caches, other.capture_seq2seq = None, {}, False
        return other

    def set_expert_budget(self, budget: str | int | float) -> None:
        """Change the committee's budget at run time (between steps): shrinking evicts, growing admits."""
        set_budget = getattr(self.provider, "set_budget", None)
        if set_budget is None:
            raise InvalidRequestError("this engine runs all experts resident; start it with an expert budget")
        nbytes = parse_budget(budget, total_expert_bytes(self.store, self.dtype))
        try:
            set_budget(nbytes)
        finally:  # slot buffers were reallocated (some of them, when a copy failed half-way)
            if self.graphs is not None:
                self.graphs.clear()

    def expert_stats(self) -> dict[str, float]:
        """Committee counters (hits, misses, substitutions, skips, fetches, host computes, swaps, bytes moved,
        stall seconds); empty when every expert is resident."""
        stats = getattr(self.provider, "stats", None)
        return stats.as_dict() if stats is not None else {}

    # ---------------------------------------------------------------- generation
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint ships no tokenizer; pass token ids instead of text")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise InvalidRequestError("a prompt is text or a list of integer token ids") from None
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.args.vocab_size})")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache of this shape, reused across calls (CUDA graphs stay bound to it); a few are kept."""
        key = (batch, max_len)
        if key not in self._caches:
            if len(self._caches) >= 4:
                old = self._caches.pop(next(iter(self._caches)))
                if self.graphs is not None:
                    self.graphs.forget(old)
                pieces = getattr(self.split, "pieces", None)
                if pieces is not None:
                    pieces.forget(old)
            self._caches[key] = KVCache(self.args, batch, max_len, self.device, self.dtype)
        return self._caches[key]

    def make_sequence(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, stop_on_eos: bool = True,
                      stop_ids: Sequence[int] = ()) -> Request:
        """Validate one request and turn it into a batcher Sequence."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
            raise InvalidRequestError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        ids = self.encode(prompt)
        limit = self.args.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                     f"model's context of {limit} tokens")
        stops = frozenset(stop_ids) | (frozenset(self.eos_ids) if stop_on_eos else frozenset())
        return Request(ids, max_new_tokens, temperature, top_p, seed, stops)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_on_eos: bool = True,
                 on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (text or token ids) of any lengths. With a seed, sequence i samples
        from its own generator seeded seed + i. on_token(sequence index, token id) streams tokens as produced."""
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise InvalidRequestError("no prompts given")
        seqs = [self.make_sequence(p, max_new_tokens, temperature, top_p, None if seed is None else seed + i,
                                   stop_on_eos) for i, p in enumerate(prompts)]
        if self.seq2seq:  # text-to-text: the prompts are sources, the outputs decoder tokens
            from moetandem.text2text import generate_seq2seq
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            enc_s, dec_s = generate_seq2seq(self, seqs, on_token)
            n_gen = sum(len(s.out) for s in seqs)
            self.last_stats = GenerationStats(sum(len(s.prompt) for s in seqs), n_gen, enc_s, dec_s,
                                              self.peak_memory(), n_gen)
            return [Generation(s.out, self.decode_text(s.out), len(s.prompt), s.finish_reason or "length")
                    for s in seqs]
        index = {id(s): i for i, s in enumerate(seqs)}
        need = max(len(s.prompt) for s in seqs) + max_new_tokens
        S = cache_positions(need, self.args.max_position_embeddings)
        batcher = Batcher(self, len(seqs), S)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        events = batcher.add(seqs)
        prefill_s = self._sync_time(t0)
        t1 = time.perf_counter()
        while True:
            if on_token is not None:
                for s, tok in events:
                    on_token(index[id(s)], tok)
            if not batcher.active:
                break
            events = batcher.step()
        decode_s = self._sync_time(t1)
        n_gen = sum(len(s.out) for s in seqs)
        self.last_stats = GenerationStats(sum(len(s.prompt) for s in seqs), n_gen, prefill_s, decode_s,
                                          self.peak_memory(), n_gen - len(seqs))
        return [Generation(s.out, self.decode_text(s.out), len(s.prompt), s.finish_reason or "length")
                for s in seqs]

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB
