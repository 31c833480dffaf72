"""Engine: load a checkpoint and generate (prefill + decode over a static KV cache, CUDA graphs on GPU)."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moetandem.checkpoint import Checkpoint
from moetandem.errors import ContextLengthError, InvalidRequestError, MoetandemError
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.resident import ResidentProvider
from moetandem.experts.store import ExpertStore
from moetandem.graphs import DecodeGraphs
from moetandem.loader import load_dense
from moetandem.models import KVCache, get_family
from moetandem.sampling import sample

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
        raise MoetandemError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoetandemError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
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
        self.graphs = DecodeGraphs(model) if use_graphs and device.type == "cuda" else None
        self.set_provider(provider)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = "auto", progress: bool = True,
                        use_graphs: bool = True) -> "Engine":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        ckpt = Checkpoint(path)
        family = get_family(ckpt.config.get("model_type"))
        args = family.args(ckpt.config, ckpt.path)
        model = load_dense(ckpt, family, args, dev, dt, progress)
        store = ExpertStore(ckpt, family, args)
        provider = ResidentProvider(store, dev, dt, progress)
        return cls(model, ckpt.tokenizer(), provider, store, dev, dt, use_graphs)

    def set_provider(self, provider: ExpertProvider) -> None:
        """Swap where experts are computed; model files stay untouched."""
        self.provider = provider
        for block in self.model.moe_blocks():
            block.provider = provider
        if self.graphs is not None:
            self.graphs.clear()

    # ---------------------------------------------------------------- generation
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint ships no tokenizer; pass token ids instead of text")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.args.vocab_size})")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_on_eos: bool = True,
                 on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (text or token ids) of any lengths.
        on_token(sequence index, token id) is called as each token is produced (for streaming)."""
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise InvalidRequestError("no prompts given")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InvalidRequestError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        seqs = [self.encode(p) for p in prompts]
        lens = [len(s) for s in seqs]
        limit = self.args.max_position_embeddings
        if max(lens) + max_new_tokens > limit:
            raise ContextLengthError(f"prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                     f"model's context of {limit} tokens")
        B, Lp, dev = len(seqs), max(lens), self.device
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        S = min(max(128, 1 << (Lp + max_new_tokens - 1).bit_length()), max(limit, Lp + max_new_tokens))
        cache = self.graphs.cache(B, S, self.dtype) if self.graphs else KVCache(self.args, B, S, dev, self.dtype)

        t0 = time.perf_counter()
        ids = torch.zeros(B, Lp, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        ids = ids.to(dev)
        pos = torch.arange(Lp, device=dev).expand(B, Lp)
        lens_t = torch.tensor(lens, device=dev)
        valid = pos < lens_t[:, None] if min(lens) != Lp else None
        logits = self.model(ids, pos, cache, Lp, valid=valid, last_only=lens_t - 1)[:, -1]  # [B, V]
        nxt = sample(logits, temperature, top_p, gen)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        prefill_s = self._sync_time(t0)
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            toks = nxt.tolist()
            for b, tok in enumerate(toks):
                if done[b]:
                    continue
                out[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                if (stop_on_eos and tok in self.eos_ids) or len(out[b]) >= max_new_tokens:
                    done[b] = True
            if all(done):
                break
            step_pos = (lens_t + step)[:, None]  # [B, 1]
            if self.graphs is not None and self.provider.graph_safe:
                logits = self.graphs.step(nxt[:, None], step_pos, cache)
            else:
                logits = self.model(nxt[:, None], step_pos, cache, S)[:, -1]
            nxt = sample(logits, temperature, top_p, gen)
        decode_s = self._sync_time(t1)
        n_gen = sum(len(o) for o in out)
        self.last_stats = GenerationStats(sum(lens), n_gen, prefill_s, decode_s, self.peak_memory(), n_gen - B)
        eos = self.eos_ids if stop_on_eos else set()
        return [Generation(o, self.decode_text(o), n, "stop" if o and o[-1] in eos else "length")
                for o, n in zip(out, lens)]

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
