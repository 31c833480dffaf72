"""Zero-copy exact misses: every expert pinned once in host memory, where the fused kernel reads a miss in place
(slot id n + e) with no copy and no host sync, so a committee step stays one CUDA graph. Whether a committee maps
its experts, and the pinning itself; --miss-tier device, where the same slot ids point at a quantized copy of every
expert on the device instead; and the host buffers swaps copy from."""
from __future__ import annotations

import logging
from functools import partial

import torch
from tqdm import tqdm

from moetandem.errors import InvalidRequestError
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.policies import MissPolicy
from moetandem.experts.rows import ExpertRows, load_pool
from moetandem.experts.swapper import pinned_cap
from moetandem.kernels import fused_moe_supported
from moetandem.models.expert_activation import ExpertActivation

log = logging.getLogger("moetandem.experts")


def maps_experts(device: torch.device, dtype: torch.dtype, act: ExpertActivation, policy: MissPolicy,
                 total: int) -> bool:
    """CUDA with the fused kernel and gated experts, a policy whose exact misses may be computed anywhere (auto; not
    the fetch / host / lru / host-only baselines), and every expert (`total` bytes) fitting the pinned cap."""
    if device.type != "cuda" or not _reads_mapped(device, dtype, act, policy):
        return False
    cap = pinned_cap(total, mapped=True)
    if total > cap:
        log.warning("exact misses are copied to the GPU, not read in place: pinning every expert takes %.1f GiB "
                    "of host memory and %.1f GiB may be pinned now (3/4 of what is available); free host memory "
                    "(a tmpfs such as /dev/shm counts as used) or set MOETANDEM_PINNED_BYTES", total / 2**30,
                    cap / 2**30)
        return False
    return True


def _reads_mapped(device: torch.device, dtype: torch.dtype, act: ExpertActivation, policy: MissPolicy) -> bool:
    """Misses can be read as slot ids n + e: gated experts, the fused kernel (or, on the CPU, its reference), and
    a policy whose exact misses may be computed anywhere (auto; not the fetch / host / lru / host-only baselines)."""
    kernel = device.type == "cpu" or fused_moe_supported(device, dtype)
    return act.gated and kernel and policy.exact == "auto" and not policy.lru and policy.refresh


def map_experts(rows: ExpertRows, layers: list[int], num_experts: int, fmt: ExpertFormat, pin: bool,
                progress: bool, device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """Per layer, every expert's row in `fmt` in one (pinned) buffer [E, row]; `rows` adopts it as its host copy
    (quantized rows are kept for swaps: one host copy, the pinned one). device: where the buffers live (a
    --miss-tier device copy: on the compute device, nothing pinned, nothing adopted)."""
    out = {}
    on_host = torch.device(device).type == "cpu"
    # experts in parallel: reading, transposing and quantizing are torch ops that release the GIL (a 2-core host
    # pinned gpt-oss-shaped experts 1.8x faster with 2 threads; the H200's host has 16 cores)
    with load_pool() as pool:
        for l in tqdm(layers, desc="pinning experts" if on_host else "miss tier", unit="layer",
                      disable=not progress, leave=False):
            buf = fmt.empty(num_experts, device=device, pin=pin and on_host)  # [E, row]
            list(pool.map(partial(_copy_expert, rows, l, buf), range(num_experts)))
            if on_host:
                rows.adopt(l, buf)
            out[l] = buf
    return out


def _copy_expert(rows: ExpertRows, layer: int, buf: torch.Tensor, expert: int) -> None:
    rows.copy_into(layer, expert, buf[expert])


def check_tier(miss_tier: str, miss_fmt: ExpertFormat | None, device: torch.device, dtype: torch.dtype,
               act: ExpertActivation, policy: MissPolicy) -> bool:
    """True for --miss-tier device, where its copy can serve misses: the mapped path of maps_experts without its
    pinned cap (the copy is on the device), or on the CPU its reference (the "device" is host memory there).
    Validated here as well as in CommitteeConfig: committees are also built without one."""
    if miss_tier == "host":
        return False
    if miss_tier != "device":
        raise InvalidRequestError(f"--miss-tier {miss_tier!r}: choose host or device")
    if miss_fmt is None:
        raise InvalidRequestError("--miss-tier device keeps a quantized copy of every expert beside the slots; "
                                  "choose its format with --miss-format int4")
    if not _reads_mapped(device, dtype, act, policy):
        raise InvalidRequestError("--miss-tier device needs gated experts, a policy that reads its misses "
                                  "(--fidelity balanced or fast), and a CUDA GPU with the fused MoE kernel; use "
                                  "--miss-tier host")
    return True


def swap_sources(rows: ExpertRows, layers: list[int], num_experts: int, fmt: ExpertFormat,
                 mapped: dict[int, torch.Tensor] | None, mapped_fmt: ExpertFormat, pin: bool,
                 progress: bool) -> dict[int, torch.Tensor] | None:
    """The pinned per-layer buffers that swaps copy slots from, or None (swaps pin each expert on first use).

    Mapped experts in the slots' own format on the host are those buffers. Mapped experts in a miss format
    (--miss-format int4) cannot fill a bf16 slot, so the slots' rows are pinned too when they fit the pinned cap
    beside the host miss copies (a --miss-tier device copy takes no host memory): otherwise each swap pins its
    expert on first use (about a millisecond per MiB, beside the decode) and, measured on the Qwen3.5 shape, the
    committee fell behind the routing (hit rate 0.27 where bf16 misses kept 0.52)."""
    if mapped is None:
        return None
    on_host = next(iter(mapped.values())).device.type == "cpu"
    if on_host and mapped_fmt.name == fmt.name:
        return mapped
    n = len(layers) * num_experts
    total = n * (fmt.nbytes + (mapped_fmt.nbytes if on_host else 0))
    if total > pinned_cap(total, mapped=True):
        log.warning("swaps pin each expert on first use: the %s slot copies%s take %.1f GiB of pinned host "
                    "memory, more than may be pinned now; free host memory or set MOETANDEM_PINNED_BYTES", fmt.name,
                    f" beside the {mapped_fmt.name} miss copies" if on_host else "", total / 2**30)
        return None
    return map_experts(rows, layers, num_experts, fmt, pin, progress)
