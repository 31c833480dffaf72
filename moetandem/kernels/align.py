"""Assignments bucketed by slot and padded to BLOCK_M rows, on the device, with no host sync.

Layout (the idea of vLLM's moe_align_block_size; own code): the T*k assignments that carry work (slot >= 0,
weight != 0) are grouped by slot; each slot's group is padded to a multiple of BLOCK_M, so every block of BLOCK_M
consecutive entries of `sorted_ids` belongs to one slot. Per block, `block_slot` names the slot (-1: past the
end, the GEMM programs exit at once) and `block_rows` how many of its rows are real (the rest are never read).
The number of blocks has a fixed upper bound, so grids are fixed and the whole path can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

#: above this many assignments the quadratic in-kernel ranking gives way to the torch (argsort) path
TRITON_ALIGN_MAX = 8192


@dataclass
class Aligned:
    sorted_ids: torch.Tensor  # [num_blocks * BLOCK_M] int32 assignment index (t*k + j); padding rows unwritten
    block_slot: torch.Tensor  # [num_blocks] int32 slot of each block, -1 = no work
    block_rows: torch.Tensor  # [num_blocks] int32 real rows in each block
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_slot.numel()


def num_blocks_bound(m: int, n_slots: int, block_m: int) -> int:
    """At most min(m, n_slots) slots are busy, each wasting < block_m rows to padding."""
    return max(1, triton_cdiv(m + min(m, n_slots) * (block_m - 1), block_m))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def slot_keys(expert_ids: torch.Tensor, weights: torch.Tensor, slot_table: torch.Tensor | None,
              n_slots: int) -> torch.Tensor:
    """[T, k] -> [T*k] slot of each assignment, n_slots where it carries no work (not resident or weight 0)."""
    ids = expert_ids.reshape(-1).long()  # [T*k]
    slots = ids if slot_table is None else slot_table.long()[ids]  # [T*k]
    valid = (slots >= 0) & (slots < n_slots) & (weights.reshape(-1) != 0)  # [T*k]
    return torch.where(valid, slots, torch.full_like(slots, n_slots))


def align_torch(expert_ids: torch.Tensor, weights: torch.Tensor, slot_table: torch.Tensor | None, n_slots: int,
                block_m: int) -> Aligned:
    """Same layout with torch ops (argsort; several launches). Any size; also the test oracle of the kernel."""
    key = slot_keys(expert_ids, weights, slot_table, n_slots)  # [M]
    m, dev = key.numel(), key.device
    nblk = num_blocks_bound(m, n_slots, block_m)
    counts = torch.zeros(n_slots + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m  # [N+1]
    padded[n_slots] = 0
    pend = padded.cumsum(0)  # [N+1]
    pstart = pend - padded
    cstart = counts.cumsum(0) - counts
    order = torch.argsort(key, stable=True)  # [M]
    sk = key[order]
    dest = pstart[sk] + torch.arange(m, device=dev) - cstart[sk]  # [M]
    dest = torch.where(sk < n_slots, dest, torch.full_like(dest, nblk * block_m))  # no-work rows -> scratch entry
    sorted_ids = torch.zeros(nblk * block_m + 1, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    pos = torch.arange(nblk, device=dev) * block_m  # [nblk]
    s = torch.searchsorted(pend[:n_slots].contiguous(), pos, right=True)  # [nblk] in 0..N
    rows = torch.where(s < n_slots, (pstart + counts)[s] - pos, torch.zeros_like(pos))  # [nblk]
    slot = torch.where(s < n_slots, s, torch.full_like(s, -1))
    return Aligned(sorted_ids[:-1], slot.to(torch.int32), rows.clamp(0, block_m).to(torch.int32), block_m)


if triton is not None:
    @triton.jit
    def _keys(ids_ptr, w_ptr, table_ptr, offs, M, N, HAS_TABLE: tl.constexpr):
        inb = offs < M
        e = tl.load(ids_ptr + offs, mask=inb, other=0)
        w = tl.load(w_ptr + offs, mask=inb, other=0.0)
        if HAS_TABLE:
            s = tl.load(table_ptr + e, mask=inb, other=-1)
        else:
            s = e
        ok = inb & (s >= 0) & (s < N) & (w != 0)
        return tl.where(ok, s, N).to(tl.int32)

    @triton.jit
    def _align_kernel(ids_ptr, w_ptr, table_ptr, sorted_ptr, bslot_ptr, brows_ptr, M, N, NBLK,
                      HAS_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr, BI: tl.constexpr):
        pid = tl.program_id(0)
        bins = tl.arange(0, NB)
        counts = tl.zeros([NB], dtype=tl.int32)
        for c in range(0, (M + BI - 1) // BI):  # every program histograms all keys (M is small here)
            counts += tl.histogram(_keys(ids_ptr, w_ptr, table_ptr, c * BI + tl.arange(0, BI), M, N, HAS_TABLE), NB)
        padded = tl.where(bins < N, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)  # [NB]
        pend = tl.cumsum(padded, 0)
        pstart = pend - padded
        offs_i = pid * BI + tl.arange(0, BI)
        key_i = _keys(ids_ptr, w_ptr, table_ptr, offs_i, M, N, HAS_TABLE)  # [BI]
        rank = tl.zeros([BI], dtype=tl.int32)
        for c in range(0, pid + 1):  # rank = earlier assignments with the same slot
            offs_j = c * BI + tl.arange(0, BI)
            key_j = _keys(ids_ptr, w_ptr, table_ptr, offs_j, M, N, HAS_TABLE)
            same = (key_j[None, :] == key_i[:, None]) & (offs_j[None, :] < offs_i[:, None])  # [BI, BI]
            rank += tl.sum(same.to(tl.int32), axis=1)
        start_i = tl.sum(tl.where(key_i[:, None] == bins[None, :], pstart[None, :], 0), axis=1)  # [BI]
        tl.store(sorted_ptr + start_i + rank, offs_i, mask=key_i < N)
        for b0 in range(pid * BI, NBLK, tl.num_programs(0) * BI):  # block -> slot map
            b = b0 + tl.arange(0, BI)
            pos = b * BLOCK_M
            s = tl.sum(((pend[None, :] <= pos[:, None]) & (bins[None, :] < N)).to(tl.int32), axis=1)  # [BI]
            end = tl.sum(tl.where(s[:, None] == bins[None, :], (pstart + counts)[None, :], 0), axis=1)
            tl.store(bslot_ptr + b, tl.where(s < N, s, -1), mask=b < NBLK)
            rows = tl.where(s < N, tl.minimum(tl.maximum(end - pos, 0), BLOCK_M), 0)
            tl.store(brows_ptr + b, rows, mask=b < NBLK)


def align(expert_ids: torch.Tensor, weights: torch.Tensor, slot_table: torch.Tensor | None, n_slots: int,
          block_m: int) -> Aligned:
    """One small Triton launch for decode-sized batches; the torch path above TRITON_ALIGN_MAX assignments."""
    m = expert_ids.numel()
    if triton is None or m > TRITON_ALIGN_MAX or not expert_ids.is_cuda and not _interpreting():
        return align_torch(expert_ids, weights, slot_table, n_slots, block_m)
    dev = expert_ids.device
    nblk = num_blocks_bound(m, n_slots, block_m)
    nb = triton.next_power_of_2(n_slots + 1)
    bi = max(16, min(128, 8192 // nb, triton.next_power_of_2(m)))
    sorted_ids = torch.empty(nblk * block_m, dtype=torch.int32, device=dev)  # [nblk*BM]
    bslot = torch.empty(nblk, dtype=torch.int32, device=dev)
    brows = torch.empty(nblk, dtype=torch.int32, device=dev)
    ids = expert_ids.reshape(-1).contiguous()  # [M]
    w = weights.reshape(-1).contiguous()  # [M]
    table = slot_table.contiguous() if slot_table is not None else ids
    _align_kernel[(triton_cdiv(m, bi),)](ids, w, table, sorted_ids, bslot, brows, m, n_slots, nblk,
                                         HAS_TABLE=slot_table is not None, BLOCK_M=block_m, NB=nb, BI=bi,
                                         num_warps=4)
    return Aligned(sorted_ids, bslot, brows, block_m)


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"
