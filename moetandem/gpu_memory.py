"""--gpu-memory GIB: run as if the GPU were smaller. The cap is this process's CUDA caching allocator limit on the
engine's device (torch.cuda.set_per_process_memory_fraction), set before any weight loads; a load that does not
fit under it ends with one message naming the cap, what was loading and the fixes, not a CUDA traceback. The cap
counts what PyTorch's allocator holds (weights, KV cache, activations, cuBLAS workspace), not the CUDA context or
NCCL's own buffers (together about 0.5 GiB more on a real card of that size)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moetandem.config import check_gpu_memory
from moetandem.errors import InvalidRequestError

GIB = 2**30
#: of what is left under the cap after the non-expert weights, the share a suggested --expert-budget takes; the rest
#: is for the KV cache and activations (a rule of thumb: their size depends on the batch and the context)
EXPERT_SHARE = 0.8


@dataclass(frozen=True)
class MemoryCap:
    """A cap of `nbytes` on this process's allocations on `device` (set by MemoryCap.apply)."""

    nbytes: int
    device: torch.device

    @classmethod
    def apply(cls, gib: float | None, device: torch.device) -> "MemoryCap | None":
        """Cap this process on `device` at `gib` GiB (None: no cap, nothing done). Call before anything is
        allocated there; the cap holds for the rest of the process."""
        if gib is None:
            return None
        check_gpu_memory(gib)
        if device.type != "cuda":
            raise InvalidRequestError(f"--gpu-memory needs a CUDA device, but the engine runs on {device}; use "
                                      "--device cuda, or drop --gpu-memory")
        index = torch.cuda.current_device() if device.index is None else device.index
        total = torch.cuda.get_device_properties(index).total_memory
        cap = int(gib * GIB)
        if cap > total:
            raise InvalidRequestError(f"--gpu-memory {gib:g}: cuda:{index} has only {total / GIB:.1f} GiB; choose a "
                                      f"cap of at most {math.floor(total / GIB * 10) / 10:g}")
        torch.cuda.set_per_process_memory_fraction(cap / total, index)
        return cls(cap, torch.device("cuda", index))

    def in_use(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def error(self, what: str, in_use: int, suggest_budget: bool = False, parallel: bool = False
              ) -> InvalidRequestError:
        """The message of a load that does not fit: `what` was loading with `in_use` bytes already held.
        suggest_budget: no --expert-budget was given, so name one that would fit. parallel: an expert-parallel rank
        (bf16 experts, no per-command budget), whose fix is more ranks."""
        left = self.nbytes - in_use
        head = (f"--gpu-memory {self.nbytes / GIB:g} is too small for {what}: {in_use / GIB:.2f} GiB of the cap on "
                f"{self.device} already held, {max(left, 0) / GIB:.2f} GiB left.")
        if parallel:
            return InvalidRequestError(f"{head} Fixes: a larger --expert-parallel N shards the experts over more "
                                       "GPUs; or raise --gpu-memory")
        fit = ""
        budget = math.floor(left * EXPERT_SHARE / GIB * 10) / 10
        if suggest_budget and budget > 0:
            fit = (f" (about --expert-budget {budget:g}GiB fits, leaving the rest of the {left / GIB:.2f} GiB for "
                   "the KV cache and activations)")
        return InvalidRequestError(
            f"{head} Fixes: --expert-budget keeps only a committee of experts on the GPU (generate, serve, eval)"
            f"{fit}; --expert-format int8 or int4 holds them in about 1/2 or 1/4 of the bytes; `moetandem cloud "
            "--expert-parallel N` shards them over N GPUs; or raise --gpu-memory")


@contextmanager
def loading(cap: MemoryCap | None, what: str, suggest_budget: bool = False, parallel: bool = False
            ) -> Iterator[None]:
    """Load `what` under the cap: a CUDA out-of-memory error becomes cap.error (without a cap: nothing changes)."""
    if cap is None:
        yield
        return
    before = cap.in_use()
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise cap.error(what, before, suggest_budget, parallel) from e
