"""A thin end for cloud capacity runs (bench/capacity.py): an end device that is only load. With the cloud-only plan,
the LM head in the cloud (`cloud_head_topk`, split/logits.py) and k greedy tokens per exchange
(`cloud_decode_tokens`, split/decode.py), an end does no model compute: it sends token ids, the cloud embeds, runs
every layer and the head, and decodes k tokens. So a thin end loads no weights, only the checkpoint's config and
fingerprint (for hello), and speaks the real protocol with the project's own client (CloudLink, the Session
stream, split/frames.py and split/decode.py frames): one Session stream, one KV cache row of every layer."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetandem.errors import CloudError, MoetandemError
from moetandem.split.decode import decode_frame, read_decode_reply
from moetandem.split.frames import alloc_frame, layers_frame
from moetandem.split.link import CloudLink, LinkOptions
from moetandem.split.logits import check_topk, unpack_topk

CACHE_ID = 1


@dataclass(frozen=True)
class ModelInfo:
    """What a thin end needs of the checkpoint: no weights."""

    path: Path
    vocab: int
    num_layers: int
    max_positions: int
    fingerprint: str  # what the cloud checks in hello (Checkpoint.fingerprint: config + shard headers)


def model_info(path: str | Path) -> ModelInfo:
    """The checkpoint's config and fingerprint (safetensors headers only); SystemExit with one line when it cannot
    be a thin end's model."""
    from moetandem.checkpoint import Checkpoint
    from moetandem.models import get_family
    try:
        ckpt = Checkpoint(path, check_family=get_family)
        family = get_family(ckpt.config.get("model_type"))
        if family.seq2seq:
            raise SystemExit(f"capacity: {ckpt.path} is an encoder-decoder model ({family.model_type}); thin ends "
                             "decode causal LMs with the whole model in the cloud")
        args = family.args(ckpt.config, ckpt.path)
    except MoetandemError as e:
        raise SystemExit(f"capacity: {e}") from None
    return ModelInfo(ckpt.path, args.vocab_size, args.num_layers, args.max_position_embeddings, ckpt.fingerprint())


def cache_len(info: ModelInfo, need: int) -> int:
    """KV positions per row: the engine's rule for a batcher of `need` positions (Engine.generate), so the thin ends
    lease rows of the same shared cloud cache as the reference end (one pool: their decode steps batch together)."""
    from moetandem.batcher import cache_positions
    return cache_positions(need, info.max_positions)


@dataclass
class EndRun:
    """One request of a thin end: its tokens, time to the first (the prefill exchange), the decode phase's wall
    time, and the tokens of each decode exchange."""

    tokens: list[int]
    ttft_s: float
    decode_s: float
    exchanges: list[int] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        """Per-output-token time of the decode phase (the first token is the prefill's)."""
        return self.decode_s / max(1, len(self.tokens) - 1)


class ThinEnd:
    """One end: `connect()` (Session stream + KV cache), then `generate(prompt, n)` as often as wanted, `close()`."""

    def __init__(self, address: str, token: str, info: ModelInfo, head_topk: int, decode_tokens: int,
                 max_len: int) -> None:
        self.info, self.k, self.max_len = info, decode_tokens, max_len
        try:
            self.head_topk = check_topk(head_topk, info.vocab)
        except MoetandemError as e:
            raise SystemExit(f"capacity: {e}") from None
        # a bench measures: an exchange slowed by load is waited for, not failed over (no fallback here); a busy
        # host's late ping acknowledgement is no outage either
        self.link = CloudLink(LinkOptions(address, token, timeout_s=600.0, deadline_floor_s=600.0,
                                          connect_timeout_s=30.0, keepalive_timeout_s=10.0), info.fingerprint)
        self.session = None

    def connect(self) -> None:
        """Open the Session stream (hello) and allocate the cache: one row of every layer, the head's top-K.
        SystemExit with one line when the cloud refuses us or cannot decode."""
        address = self.link.opts.address
        session, why = self.link.session(), None
        if session is None:
            why = f"no session on the cloud at {address}: {self.link.last_error}"
        elif not self.link.info.get("decode"):
            why = (f"the cloud at {address} does not serve `decode` frames (an older moetandem cloud, or "
                   "--expert-parallel): thin ends need k tokens per exchange")
        else:
            try:
                session.request(alloc_frame(CACHE_ID, 1, self.max_len, 0, self.info.num_layers,
                                            head_topk=self.head_topk))
            except CloudError as e:
                why = f"the cloud at {address} refused the KV cache: {e}"
        if why is not None:
            self.close()
            raise SystemExit(f"capacity: {why}")
        self.session = session

    def generate(self, prompt: list[int], new: int) -> EndRun:
        """Prefill `prompt` (token ids up, the top-K logits of its last position down; greedy argmax), then decode
        frames of k tokens until `new` tokens. CloudError / FrameError when an exchange fails."""
        assert self.session is not None, "connect() first"
        P, V = len(prompt), self.info.vocab
        t0 = time.perf_counter()
        frame = layers_frame(CACHE_ID, P, torch.arange(P)[None], torch.zeros(1, dtype=torch.long),
                             {"ids": torch.tensor(prompt, dtype=torch.long)}, last=torch.tensor([P - 1]), out="topk")
        logits = unpack_topk(self.session.request(frame).tensors, 1, self.head_topk, V, torch.float32,
                             torch.device("cpu"))  # [1, V]: the argmax first, strictly (split/logits.py)
        tokens = [int(logits.argmax(-1))]
        t1 = time.perf_counter()
        run = EndRun(tokens, t1 - t0, 0.0)
        pos = P  # where the newest token goes
        while len(tokens) < new:
            budget = new - len(tokens)
            frame = decode_frame(CACHE_ID, self.k, [tokens[-1]], [pos], [0], [budget], [frozenset()])
            got = read_decode_reply(self.session.request(frame), 1, self.k, [budget], V)[0]
            run.exchanges.append(len(got))
            tokens += got
            pos += len(got)
        run.decode_s = time.perf_counter() - t1
        return run

    def close(self) -> None:
        self.link.close()

