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
    """A cap of `nbytes` on this process's allocations on `device` (set by MemoryCap.apply), or, without
    --gpu-memory, the GPU's own memory (MemoryCap.of_device: given=False, nothing set, only checked against)."""

    nbytes: int
    device: torch.device
    given: bool = True

    @classmethod
    def of_device(cls, device: torch.device) -> "MemoryCap | None":
        """What this process can still allocate on a CUDA device now (free memory plus what its allocator holds
        unused), as the limit loads are checked against; None off CUDA."""
        if device.type != "cuda":
            return None
        index = torch.cuda.current_device() if device.index is None else device.index
        free, _ = torch.cuda.mem_get_info(index)
        held = torch.cuda.memory_reserved(index)
        return cls(free + held, torch.device("cuda", index), given=False)

    def room(self) -> int:
        """Bytes that can still be allocated under the limit."""
        return self.nbytes - self.in_use()

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
        if self.given:
            head = (f"--gpu-memory {self.nbytes / GIB:g} is too small for {what}: {in_use / GIB:.2f} GiB of the cap "
                    f"on {self.device} already held, {max(left, 0) / GIB:.2f} GiB left.")
            larger = "raise --gpu-memory"
        else:
            head = (f"{self.device} has too little free memory for {what}: {in_use / GIB:.2f} GiB already held by "
                    f"this process, {max(left, 0) / GIB:.2f} GiB free.")
            larger = "use a GPU with more free memory"
        if parallel:
            return InvalidRequestError(f"{head} Fixes: a larger --expert-parallel N shards the experts over more "
                                       f"GPUs; or {larger}")
        fit = ""
        budget = math.floor(left * EXPERT_SHARE / GIB * 10) / 10
        if suggest_budget and budget > 0:
            fit = (f" (about --expert-budget {budget:g}GiB fits, leaving the rest of the {left / GIB:.2f} GiB for "
                   "the KV cache and activations)")
        return InvalidRequestError(
            f"{head} Fixes: --expert-budget keeps only a committee of experts on the GPU (generate, serve, eval)"
            f"{fit}, or --expert-budget auto picks it; --expert-format int8 or int4 holds them in about 1/2 or 1/4 "
            f"of the bytes; `moetandem cloud --expert-parallel N` shards them over N GPUs; or {larger}")


def auto_budget(room: int | None, expert_bytes: int) -> int | None:
    """--expert-budget auto: None (every expert resident) when they fit in EXPERT_SHARE of the device memory left
    after the non-expert weights (room; None: no device limit, e.g. the CPU), else that share, in bytes."""
    if room is None:
        return None
    fit = int(max(room, 0) * EXPERT_SHARE)
    return None if expert_bytes <= fit else fit


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
