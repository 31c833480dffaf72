"""Exact miss handling (policies exact/auto, fetch, host, lru, host-only): the misses a policy left for the host
are fetched into a victim slot or computed on the host. This is the committee's only host round trip in compute:
one transfer of the step's routing, then one decision per missed expert (never per assignment).

With --miss-format (approximate policies only), both read the expert's lower-precision host copy: a host compute
dequantizes it on use, a fetch moves its bytes and dequantizes into the slot (fetch_miss)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from moetandem.errors import InvalidRequestError
from moetandem.experts.executor import HostRows
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.policies import Assignment, MissPolicy
from moetandem.models.expert_activation import ExpertActivation

if TYPE_CHECKING:
    from moetandem.experts.committee import CommitteeProvider


def resolve_exact(c: "CommitteeProvider", layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                  asg: Assignment) -> HostRows | None:
    """Fetch or host-compute the assignments `asg.exact` marks; fetched ones get their new slot in asg.slots.
    Returns the host-computed rows (None if there are none)."""
    st, pol = c.layers[layer], c.policy
    assert asg.exact is not None
    routing = torch.stack([expert_ids.long(), asg.slots.long(), asg.exact.long()]).cpu()  # [3, T, k] one sync
    ids, slots, need = routing[0], routing[1], routing[2].bool()
    if pol.lru:  # every expert computed from a slot this step counts as used now
        on_slot = slots >= 0
        used = torch.tensor([st.expert_of[s] for s in slots[on_slot].unique().tolist()], dtype=torch.long)
        c.last_use[layer][used[used >= 0]] = c.tick
    if not bool(need.any()):
        return None
    experts, rows = torch.unique(ids[need], return_counts=True)  # the step's missed experts, [m] each
    in_use = set(slots[slots >= 0].unique().tolist())  # slots this step reads: never victims
    host: list[int] = []
    for e, n in zip(experts.tolist(), rows.tolist()):
        fetch = pol.exact == "fetch" or (pol.exact == "auto" and not c.cost.prefer_host(n))
        victims = [s for s in range(st.n) if s not in st.incoming and s not in in_use]
        if not fetch or not victims:
            host.append(e)
            c.counters.host.host_computes += n
            continue
        t0 = time.perf_counter()
        slot = _victim(c, layer, victims)
        if st.expert_of[slot] >= 0:
            st.unpublish(st.expert_of[slot])
        fetch_miss(c, layer, slot, e)
        in_use.add(slot)
        asg.slots = torch.where((expert_ids == e) & asg.exact, slot, asg.slots)  # [T, k] device
        if pol.lru:
            c.last_use[layer][e] = c.tick
        c.counters.host.fetches += 1
        c.counters.host.stall_s += time.perf_counter() - t0
    if not host:
        return None
    return _host_compute(c, layer, x, ids, need, host)


def miss_row(c: "CommitteeProvider", layer: int, expert: int) -> torch.Tensor:
    """The host copy a miss reads: the expert's row in c.host_fmt (counted in miss_bytes)."""
    c.counters.host.miss_bytes += c.host_fmt.nbytes
    if c.miss_rows is None:
        return c.host_flat(layer, expert, pin=False)
    return c.miss_rows.get(layer, expert)


def fetch_miss(c: "CommitteeProvider", layer: int, slot: int, expert: int) -> None:
    """A miss fetched into a free slot. With a miss format: its host copy (those bytes over the bus), dequantized
    there into the slot's format; the slot is lossy until the layer's next refresh frees it (committee.refresh)."""
    if c.miss_fmt is None:
        c.counters.host.miss_bytes += c.expert_size
        return c.load(layer, slot, expert)
    st = c.layers[layer]
    row = miss_row(c, layer, expert).to(c.device)  # [miss row] on the device
    w13, w2, b13, b2 = c.miss_fmt.unpack(row)  # in the compute dtype
    st.buf[slot].copy_(c.fmt.pack(w13, w2, None if b13 is None or b2 is None else (b13, b2)))
    st.publish(slot, expert)
    st.lossy.add(slot)
    c.counters.host.bytes_moved += c.miss_fmt.nbytes


def _victim(c: "CommitteeProvider", layer: int, victims: list[int]) -> int:
    """A free slot, else the least recently used (lru) or the least important published expert's slot."""
    st = c.layers[layer]
    free = [s for s in victims if st.expert_of[s] < 0]
    if free:
        return free[0]
    if c.policy.lru:
        last = c.last_use[layer]
        return min(victims, key=lambda s: int(last[st.expert_of[s]]))
    score = c.scorer.scores(layer)  # [E] host
    return min(victims, key=lambda s: float(score[st.expert_of[s]]))


def _host_compute(c: "CommitteeProvider", layer: int, x: torch.Tensor, ids: torch.Tensor, need: torch.Tensor,
                  experts: list[int]) -> HostRows:
    """Each host expert runs once on all its rows, from host memory."""
    t0 = time.perf_counter()
    toks, cols, ys = [], [], []
    for e in experts:
        tok, col = torch.nonzero((ids == e) & need, as_tuple=True)  # host [r], [r]
        rows = x[tok.to(x.device)].to("cpu")  # [r, H]
        ys.append(expert_ffn(c.host_fmt, c.act, miss_row(c, layer, e), rows).to(x.device, x.dtype))  # [r, H]
        toks.append(tok)
        cols.append(col)
    out = HostRows(token=torch.cat(toks).to(x.device), col=torch.cat(cols).to(x.device), y=torch.cat(ys))
    c.counters.host.stall_s += time.perf_counter() - t0
    return out


def expert_ffn(fmt: ExpertFormat, act: ExpertActivation, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert on the host: its row in `fmt` (dequantized on use), rows x [r, H] (host) -> [r, H] in the compute
    dtype. The host computes of eager steps and the host-miss worker (host_misses.py) both run here."""
    w13, w2, b13, b2 = fmt.unpack(row)  # in the compute dtype
    return act.ffn(x.to(w13.dtype), w13, w2, b13, b2)


def check_miss_format(miss: ExpertFormat | None, slots: ExpertFormat, policy: MissPolicy) -> ExpertFormat | None:
    """The committee's miss format, or None where misses read the slots' own format (none given, or the same).
    Refused with an exact policy (its misses are computed as they are) and over packed slots."""
    if miss is None or miss.name == slots.name:
        return None
    if not policy.graph:
        raise InvalidRequestError(f"--miss-format {miss.name} reads a lower-precision copy of a missed expert, "
                                  "which exact policies never allow; use --fidelity balanced or fast, or drop "
                                  "--miss-format")
    if not slots.dense:
        raise InvalidRequestError(f"--miss-format {miss.name} needs bf16 slots, but the experts are held in "
                                  f"{slots.name}; use --expert-format bf16, or drop --miss-format (a packed "
                                  "format's misses already move its smaller bytes)")
    return miss
