"""Engine: load a checkpoint and generate (prefill + decode over a static KV cache, CUDA graphs on GPU)."""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moetandem.batcher import Batcher
from moetandem.batcher import Request
from moetandem.checkpoint import Checkpoint
from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.factory import build_provider
from moetandem.experts.store import ExpertStore
from moetandem.graphs import DecodeGraphs
from moetandem.loader import load_dense
from moetandem.models import KVCache, get_family

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
    def __init__(self, model: Any, tokenizer: Any, provider: ExpertProvider, store: ExpertStore,
                 device: torch.device, dtype: torch.dtype, use_graphs: bool = True) -> None:
        self.model, self.tokenizer, self.provider, self.store = model, tokenizer, provider, store
        self.args, self.device, self.dtype = model.args, device, dtype
        self.eos_ids = set(self.args.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.last_stats: GenerationStats | None = None
        self.gate: Any = None  # the GatedRouter when a hardware-aware gate is attached (moetandem.gating)
        self.graphs = DecodeGraphs(model) if use_graphs and device.type == "cuda" else None
        self._caches: dict[tuple[int, int], KVCache] = {}
        self.set_provider(provider)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = "auto", progress: bool = True,
                        use_graphs: bool = True, expert_budget: str | int | float | None = None,
                        policy: str | None = None, fidelity: str = "balanced", skip_threshold: float | None = None,
                        refresh_every: int = 16, score: str = "importance", plan: Any = None,
                        async_swaps: bool = True, gate: str = "off", gate_cost: float = math.inf,
                        gate_latency_budget: float = 0.0, cloud: str | None = None,
                        token_file: str | Path | None = None, split: dict[str, Any] | None = None) -> "Engine":
        """Load a hub-format MoE checkpoint. With expert_budget (bytes, '6GiB', or a fraction like 0.5 of all
        expert bytes) only a committee of experts stays on the device; policy / fidelity say what a miss gets.
        gate="group" / "masked" routes to the experts that are local now (moetandem.gating.attach_gate)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        ckpt = Checkpoint(path, check_family=get_family)
        family = get_family(ckpt.config.get("model_type"))
        args = family.args(ckpt.config, ckpt.path)
        model = load_dense(ckpt, family, args, dev, dt, progress)
        store = ExpertStore(ckpt, family, args)
        provider = build_provider(ckpt, store, args.top_k, dev, dt, expert_budget, policy, fidelity,
                                  skip_threshold, refresh_every, score=score, plan=plan, progress=progress, async_swaps=async_swaps)
        engine = cls(model, ckpt.tokenizer(), provider, store, dev, dt, use_graphs)
        if gate != "off":
            from moetandem.gating import attach_gate
            attach_gate(engine, gate, gate_cost, gate_latency_budget)
        if cloud is not None:  # split execution: the middle layers run on a `moetandem cloud` server
            from moetandem.split.end import attach_cloud
            attach_cloud(engine, cloud, token_file, **(split or {}))  # split: attach_cloud's keyword options
        return engine

    def set_provider(self, provider: ExpertProvider) -> None:
        """Swap where experts are computed; model files stay untouched."""
        self.provider = provider
        for block in self.model.moe_blocks():
            block.provider = provider
        if self.graphs is not None:
            self.graphs.clear()

    def set_expert_budget(self, budget: str | int | float) -> None:
        """Change the committee's budget at run time (between steps): shrinking evicts, growing admits."""
        from moetandem.experts.committee import CommitteeProvider
        from moetandem.experts.factory import parse_budget
        if not isinstance(self.provider, CommitteeProvider):
            raise InvalidRequestError("this engine runs all experts resident; start it with an expert budget")
        total = self.store.expert_bytes(self.dtype) * self.store.num_experts * len(self.store.layers)
        self.provider.set_budget(min(parse_budget(budget, total), total))

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
        index = {id(s): i for i, s in enumerate(seqs)}
        need = max(len(s.prompt) for s in seqs) + max_new_tokens
        S = min(max(128, 1 << (need - 1).bit_length()), max(self.args.max_position_embeddings, need))
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
