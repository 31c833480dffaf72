"""The GPU side of the host-miss handoff (experts/host_misses.py): a decode step hands its exact misses to a host
worker through pinned (mapped) host memory and flags, with no host sync in the stream, so it stays one CUDA graph.

One layer's `Channel` (host memory unless noted): x rows [MAX_T, H], the miss list [MAX_T, k] (expert id, -1 where
the host has nothing to compute), the worker's answers resp [MAX_T, k, H] (x's dtype), flags [16] int64 (0: the
request epoch, 1: the step's T, 8: the response epoch, on separate cache lines), the layer's epoch counter (device),
and two flags shared by every layer: `err` (host int32, set on a timeout) and `off` (device int32, 1 after a
fallback). Per layer and step:

    publish (1 program) ─► the fused kernel over the hits ─► collect (1 program per token row)

- publish writes x and the miss list, bumps the device epoch (a CUDA-graph replay gets a fresh one), stores T and
  then the epoch into the request flag (release, system scope, after a CTA barrier). It returns the slot ids the
  device computes (misses -1), so whatever runs the hits orders after it. With `off` set it publishes nothing and
  returns the misses as mapped host experts (slot n + e: today's zero-copy reads).
- collect spins (volatile loads, at most `max_polls`) until the response flag equals the epoch, acquires it (an
  acquire load at system scope: Triton lowers `atomic_add(p, 0, sem="acquire", scope="sys")` to one), then
  adds Σ_k w·resp over the misses to the hits' output in fp32. A row without misses never waits. On a timeout
  it adds nothing for the row's misses (as deferred) and sets `err`; it never hangs.

Triton on CUDA (and under TRITON_INTERPRET=1); `publish_reference` / `collect_reference` in PyTorch elsewhere. Both
are custom ops (`moetandem::host_publish` / `host_collect`) keyed by the channel's id, so torch.compile sees only the
device tensors and CUDA graphs capture the launches."""
from __future__ import annotations

import itertools
import os
import time
import weakref
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference needs none of this
    triton = None

REQ, TOKENS, RESP = 0, 1, 8  # flag columns
#: the default spin bound: each poll is a read over the host bus (~1 µs), so about a second
MAX_POLLS = 1 << 20


@dataclass(eq=False)
class Channel:
    """One layer's handoff buffers (see the module docstring); `key` names it to the custom ops."""

    x: torch.Tensor  # [MAX_T, H] host
    miss: torch.Tensor  # [MAX_T, k] int32 host
    resp: torch.Tensor  # [MAX_T, k, H] host, x's dtype
    flags: torch.Tensor  # [16] int64 host
    epoch: torch.Tensor  # [1] int64 device
    err: torch.Tensor  # [1] int32 host, shared
    off: torch.Tensor  # [1] int32 device, shared
    max_polls: int = MAX_POLLS
    key: int = -1


_CHANNELS: "weakref.WeakValueDictionary[int, Channel]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def new_channel(max_t: int, k: int, hidden: int, dtype: torch.dtype, device: torch.device, err: torch.Tensor,
                off: torch.Tensor, pin: bool, max_polls: int = MAX_POLLS, flags: torch.Tensor | None = None) -> Channel:
    """A registered channel for steps of at most max_t tokens (pin: page-locked, so the GPU reads it in place);
    flags: its [16] int64 (host) flags, e.g. a row of one block the worker polls at once (default: its own)."""
    ch = Channel(x=torch.zeros(max_t, hidden, dtype=dtype, pin_memory=pin),
                 miss=torch.full((max_t, k), -1, dtype=torch.int32, pin_memory=pin),
                 resp=torch.zeros(max_t, k, hidden, dtype=dtype, pin_memory=pin),
                 flags=torch.zeros(16, dtype=torch.int64, pin_memory=pin) if flags is None else flags,
                 epoch=torch.zeros(1, dtype=torch.int64, device=device), err=err, off=off, max_polls=max_polls,
                 key=next(_KEYS))
    _CHANNELS[ch.key] = ch
    return ch


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# ------------------------------------------------------------------ reference (PyTorch)
def publish_reference(ch: Channel, x: torch.Tensor, miss: torch.Tensor, slots: torch.Tensor, n: int,
                      epoch: torch.Tensor | None = None) -> torch.Tensor:
    """publish in PyTorch (the CPU, tests): the same effects in the same order. epoch: the counter to bump (the
    op's argument, which torch.compile may hand over as a copy it writes back; default the channel's)."""
    epoch = ch.epoch if epoch is None else epoch
    if int(ch.off[0]):
        return torch.where(miss >= 0, n + miss, slots).to(torch.int32)
    T = x.shape[0]
    ch.x[:T].copy_(x)
    ch.miss[:T].copy_(miss)
    epoch += 1
    ch.flags[TOKENS] = T
    ch.flags[REQ] = int(epoch[0])  # last: the worker reads the rest after it sees this
    return torch.where(miss >= 0, -1, slots).to(torch.int32)


def collect_reference(ch: Channel, out: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor,
                      epoch_t: torch.Tensor | None = None) -> torch.Tensor:
    """collect in PyTorch: wait (yielding to the worker thread) for at most max_polls polls."""
    if int(ch.off[0]) or not bool((miss >= 0).any()):
        return out.clone()
    epoch, polls = int((ch.epoch if epoch_t is None else epoch_t)[0]), 0
    while int(ch.flags[RESP]) != epoch and polls < ch.max_polls:
        time.sleep(0)
        polls += 1
    T = out.shape[0]
    need = (miss >= 0) & (int(ch.flags[RESP]) == epoch)  # [T, k]
    if int(ch.flags[RESP]) != epoch:
        ch.err[0] = 1
    resp = ch.resp[:T].to(out.device, torch.float32)  # [T, k, H]
    add = (resp * (weights.float() * need)[..., None]).sum(1)  # [T, H]
    return (out.float() + add).to(out.dtype)


# ------------------------------------------------------------------ Triton
if triton is not None:
    @triton.jit(do_not_specialize=["T"])  # one kernel for every T (an int of 1 would be specialized as constexpr)
    def _publish_kernel(x_ptr, miss_ptr, slots_ptr, hit_ptr, epoch_ptr, off_ptr, rx_ptr, rmiss_ptr, flags_ptr, T,
                        H, K, n, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program: x [T, H] and miss [T, K] (contiguous) into the host buffers, then the epoch."""
        off = tl.load(off_ptr)
        ko = tl.arange(0, BLOCK_K)
        for t in range(T):
            m = tl.load(miss_ptr + t * K + ko, mask=ko < K, other=-1)
            s = tl.load(slots_ptr + t * K + ko, mask=ko < K, other=-1)
            if off != 0:  # fallen back: the misses are read zero-copy as mapped host experts
                tl.store(hit_ptr + t * K + ko, tl.where(m >= 0, n + m, s), mask=ko < K)
            else:
                tl.store(hit_ptr + t * K + ko, tl.where(m >= 0, -1, s), mask=ko < K)
                tl.store(rmiss_ptr + t * K + ko, m, mask=ko < K)
        if off == 0:
            for i in range(0, T * H, BLOCK):
                o = i + tl.arange(0, BLOCK)
                tl.store(rx_ptr + o, tl.load(x_ptr + o, mask=o < T * H), mask=o < T * H)
            e = tl.load(epoch_ptr) + 1
            tl.store(epoch_ptr, e)
            tl.store(flags_ptr + 1, T)
            tl.debug_barrier()  # every thread's writes before the one release below
            tl.atomic_xchg(flags_ptr, e, sem="release", scope="sys")

    @triton.jit
    def _collect_kernel(out_ptr, y_ptr, w_ptr, miss_ptr, epoch_ptr, off_ptr, resp_ptr, flags_ptr, err_ptr, H, K,
                        max_polls, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """Token row t: wait for the layer's answer if the row has misses, then y = out + Σ_k w·resp."""
        t = tl.program_id(0)
        ko = tl.arange(0, BLOCK_K)
        m = tl.load(miss_ptr + t * K + ko, mask=ko < K, other=-1)
        w = tl.load(w_ptr + t * K + ko, mask=ko < K, other=0.0).to(tl.float32)
        need = (tl.sum((m >= 0).to(tl.int32), axis=0) > 0) & (tl.load(off_ptr) == 0)
        ok = need
        if need:
            e = tl.load(epoch_ptr)
            seen = tl.load(flags_ptr + 8, volatile=True)
            polls = 0
            while (seen != e) & (polls < max_polls):
                seen = tl.load(flags_ptr + 8, volatile=True)
                polls += 1
            # orders the reads of resp (Triton emits it as one thread's ld.acquire.sys, broadcast through a barrier)
            seen = tl.atomic_add(flags_ptr + 8, 0, sem="acquire", scope="sys")
            ok = seen == e
            if seen != e:
                tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="sys")
        use = (m >= 0) & ok
        for h0 in range(0, H, BLOCK_H):
            oh = h0 + tl.arange(0, BLOCK_H)
            acc = tl.load(out_ptr + t * H + oh, mask=oh < H, other=0.0).to(tl.float32)
            r = tl.load(resp_ptr + (t * K + ko)[:, None] * H + oh[None, :], mask=use[:, None] & (oh < H)[None, :],
                        other=0.0).to(tl.float32)  # [BK, BH], after the acquire (and the barrier broadcasting it)
            acc += tl.sum(r * w[:, None], axis=0)
            tl.store(y_ptr + t * H + oh, acc.to(y_ptr.dtype.element_ty), mask=oh < H)


def publish_triton(ch: Channel, x: torch.Tensor, miss: torch.Tensor, slots: torch.Tensor, n: int,
                   epoch: torch.Tensor | None = None) -> torch.Tensor:
    """publish as one Triton program (see the module docstring) -> the device's slot ids [T, k] int32."""
    T, K = miss.shape
    x, miss, slots = x.contiguous(), miss.to(torch.int32).contiguous(), slots.to(torch.int32).contiguous()
    hit, epoch = torch.empty_like(slots), ch.epoch if epoch is None else epoch
    _publish_kernel[(1,)](x, miss, slots, hit, epoch, ch.off, ch.x, ch.miss, ch.flags, T, x.shape[1], K, n,
                          BLOCK=1024, BLOCK_K=triton.next_power_of_2(K))
    return hit


def collect_triton(ch: Channel, out: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor,
                   epoch: torch.Tensor | None = None) -> torch.Tensor:
    """collect as one Triton program per token row -> out + the misses' weighted answers [T, H]."""
    T, K = miss.shape
    out, weights, miss = out.contiguous(), weights.contiguous(), miss.to(torch.int32).contiguous()
    y, epoch = torch.empty_like(out), ch.epoch if epoch is None else epoch
    H = out.shape[1]
    _collect_kernel[(T,)](out, y, weights, miss, epoch, ch.off, ch.resp, ch.flags, ch.err, H, K, ch.max_polls,
                          BLOCK_H=min(256, triton.next_power_of_2(H)), BLOCK_K=triton.next_power_of_2(K))
    return y


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("moetandem::host_publish", mutates_args=("epoch",))
def host_publish(x: torch.Tensor, miss: torch.Tensor, slots: torch.Tensor, epoch: torch.Tensor, key: int,
                 n: int) -> torch.Tensor:
    """Publish a step's misses on channel `key` (epoch: its counter, declared so the compiler keeps the call)
    -> the slot ids [T, k] int32 the device computes. n: the device slots (n + e reads mapped host expert e).
    The kernels bump and read `epoch` as handed over (under torch.compile, maybe a copy written back after)."""
    return (publish_triton if _use_triton(x) else publish_reference)(_CHANNELS[key], x, miss, slots, n, epoch)


@host_publish.register_fake
def _(x: torch.Tensor, miss: torch.Tensor, slots: torch.Tensor, epoch: torch.Tensor, key: int,
      n: int) -> torch.Tensor:
    return torch.empty_like(slots, dtype=torch.int32)


@torch.library.custom_op("moetandem::host_collect", mutates_args=())
def host_collect(out: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor, epoch: torch.Tensor,
                 key: int) -> torch.Tensor:
    """Wait for channel `key`'s answer and add it: out [T, H] + Σ_k weights·resp over miss >= 0 -> [T, H]."""
    return (collect_triton if _use_triton(out) else collect_reference)(_CHANNELS[key], out, weights, miss, epoch)


@host_collect.register_fake
def _(out: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor, epoch: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(out)
