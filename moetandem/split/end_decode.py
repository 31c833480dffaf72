"""The end's side of k tokens per exchange (`--cloud-decode-tokens`): a batcher step of plain sequences as one
`decode` exchange in which the cloud makes up to k tokens per sequence (the frame: split/decode.py), with its
deadline, the sampled rows' generator states and the end's bookkeeping of the cloud's K/V rows. A part of
`SplitModel` kept in a file of its own: it reads and updates the model's rows (`_rows`) and cloud cache as the
model's own methods do."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moetandem.errors import CloudError
from moetandem.models import KVCache
from moetandem.split.decode import (RowSampler, decode_frame, generator_state_bytes, read_decode_reply,
                                    read_reply_states)
from moetandem.split.link import CloudLink
from moetandem.split.transport.frame import FrameError

if TYPE_CHECKING:
    from moetandem.split.end import SplitModel


def decode_exchange(m: SplitModel, tokens: list[int], pos: list[int], rows: list[int], budget: list[int],
                    stops: list[frozenset[int]], cache: KVCache, sampling: list[RowSampler] | None = None
                    ) -> list[list[int]] | None:
    """A decode step (each row's last token at `pos`, `budget` tokens left, its stop ids, its (temperature,
    top_p, generator): None = all greedy) as one `decode` exchange: the cloud makes up to decode_k tokens per
    row (split/decode.py) and each generator is set to its state after them. Returns the tokens in order, or
    None when this step cannot go that way (option off or not this plan, the cloud down, older or behind after
    an outage, sampled rows a cloud cannot reproduce, the exchange failed): the caller then runs one ordinary
    step (__call__)."""
    st = m._rows.get(cache)
    if not m.decode_tokens or st is None:
        return None  # the option is off (no re-planning here: the ordinary step does it)
    m._maybe_replan()
    if not m.decode_k or m.link.session() is None or not m.link.info.get("decode"):
        return None
    if sampling is not None and not any(t > 0 for t, _, _ in sampling):
        sampling = None  # every row greedy: the frame of any cloud that serves `decode`
    gens = [g for _, _, g in sampling or () if g is not None]
    if sampling is not None and not _cloud_samples(m, gens):
        return None
    r, p = torch.tensor(rows), torch.tensor(pos)
    try:
        session = m._ensure_cloud_cache(st, cache)
        if bool((st.cloud_len[r] < p).any()):
            return None  # the cloud's K/V are behind (refilled by ordinary steps)
        frame = decode_frame(st.cloud_id, m.decode_k, tokens, pos, rows, budget, stops, sampling,
                             m.model.lm_head.weight.dtype)
        fut = session.submit(frame)
        reply = session.wait(fut, timeout_s=decode_deadline_s(m.link, getattr(fut, "sent_bytes", 0),
                                                                  m.decode_k))
        out = read_decode_reply(reply, len(rows), m.decode_k, budget, m.args.vocab_size)
        states = read_reply_states(reply, len(gens))
    except (CloudError, FrameError) as e:  # as a failed `layers` exchange: the step runs on the end
        m.stats["fallbacks"] += 1
        m.link.lost(e if isinstance(e, CloudError) else CloudError(f"bad decode reply from the cloud: {e}"))
        return None
    for g, state in zip(gens, states):  # the stream goes on after the tokens the cloud drew
        g.set_state(state)
    for i, (row, first, toks) in enumerate(zip(rows, pos, out)):  # fed: the last token, then all but the newest
        st.tokens[row, first: first + len(toks)] = torch.tensor([tokens[i], *toks[:-1]])
        st.cloud_len[row], st.local_len[row] = first + len(toks), min(int(st.local_len[row]), first)
    m.stats["decode_exchanges"] += 1
    m.stats["decode_tokens"] += sum(map(len, out))
    return out

def _cloud_samples(m: SplitModel, gens: list[torch.Generator]) -> bool:
    """Whether the cloud can sample this step's rows: it says `decode_sample` in hello, and for seeded rows its
    generator state has this torch's size and the generators are CPU ones (an end on a GPU samples with CUDA
    generators: those rows stay per token)."""
    cap = m.link.info.get("decode_sample")
    if not cap:
        return False
    return not gens or (cap == generator_state_bytes() and all(g.device.type == "cpu" for g in gens))


def decode_deadline_s(link: CloudLink, sent: int, k: int) -> float:
    """How long a `decode` exchange of k steps may take: k times the link's deadline for a frame of its size (which
    follows the measured exchanges, per-token ones among them), within the configured timeout. With the per-token
    deadline alone a loaded cloud's k-step replies timed out and fell back to the end."""
    return min(link.opts.timeout_s, k * link.deadline_s(sent))
