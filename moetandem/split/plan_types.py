"""What the split scheduler reads and what it answers: SplitProfile (measured compute of both sides, memory,
routing, the link, the codecs) and SplitPlan (cut, expert placement, codec per crossing, micro-batches, and
the predictions). The search and the cost model are in split/plan.py."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moetandem.errors import InvalidRequestError


@dataclass
class SplitProfile:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    end_layer_s: list[float]  # [L] attention + router (+ norms) per token on the end, seconds
    cloud_layer_s: list[float]  # [L] the same in the cloud
    end_expert_s: float  # one expert FFN for one token on the end (experts of a model share one shape)
    cloud_expert_s: float
    expert_bytes: int  # one expert's weights
    end_expert_budget: int  # bytes the end may spend on experts
    routing_freq: list[list[float]]  # [L][E] fraction of tokens routed to each expert (a row sums to top_k)
    bandwidth_bps: float  # link bytes per second, each direction
    rtt_s: float
    codec_bytes: dict[int, int] = field(default_factory=dict)  # rank → bytes per token (r + 2)
    codec_quality: dict[int, float] = field(default_factory=dict)  # rank → perplexity increase per crossing
    max_ppl_increase: float = 0.01
    concurrency: int = 1  # requests decoding together (one token each per step)
    end_head_s: float = 0.0  # embedding + norm + lm_head per token on the end
    cloud_head_s: float = 0.0
    end_step_overhead_s: float = 0.0  # fixed cost of one step of one micro-batch
    cloud_step_overhead_s: float = 0.0
    token_bytes: int = 4
    cloud_available: bool = True
    #: the cloud side: its replicas (moetandem cloud --replicas) and the micro-batches of other ends queued on
    #: the whole cloud; the front spreads them, so ours waits behind queue_depth / replicas of them on average
    cloud_replicas: int = 1
    cloud_queue_depth: float = 0.0
    end_layer_fixed_s: list[float] | None = None  # [L] fixed cost of a layer per step (None: 0)
    cloud_layer_fixed_s: list[float] | None = None
    frame_bytes: int = 0  # per frame on the link besides its tensors (magic, header)
    row_bytes: int = 0  # per token up besides the hidden states (pos, rows: 16 with int64)
    #: cut → rank → (bytes per token, perplexity increase) of the calibrated low-rank codecs at that cut; a cut
    #: not listed uses codec_bytes / codec_quality
    cut_codecs: dict[int, dict[int, tuple[int, float]]] = field(default_factory=dict)
    wire_bytes: int = 2  # bytes per element of uncompressed hidden states on the link (fp16)
    #: per token routed to an end expert beyond the end's budget (a committee miss: fetch or host compute); 0
    #: when the measured layer times already include the committee's misses (split.costs)
    end_miss_s: float = 0.0
    #: once per engine step, whatever the micro-batching: scheduling, sampling, Python around the forward
    engine_overhead_s: float = 0.0
    #: end and cloud compute at the same time (separate hardware); False when they share cores (a CPU test bed):
    #: micro-batches then overlap only the link, not the two sides' compute
    overlap: bool = True
    #: K > 0 (split option cloud_head_topk): a plan whose cloud layers reach the last one has the cloud run norm +
    #: lm_head (cloud_head_s) instead of the end (end_head_s), and K logits go down per token, not hidden states
    cloud_head_topk: int = 0
    cloud_head_fixed_s: float = 0.0  # the cloud's head per step of a micro-batch, charged when it runs the head
    #: k > 0 (split option cloud_decode_tokens): the cloud-only plan with the head in the cloud makes k greedy
    #: tokens per exchange (split/decode.py): one round trip and k cloud steps per k tokens
    cloud_decode_tokens: int = 0

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        if len(self.end_layer_s) != L or len(self.cloud_layer_s) != L:
            raise InvalidRequestError(f"profile needs {L} per-layer times on end and cloud")
        if len(self.routing_freq) != L or any(len(r) != E for r in self.routing_freq):
            raise InvalidRequestError(f"routing_freq must be [{L}][{E}] (layers × experts)")
        if self.cloud_available and (self.bandwidth_bps <= 0 or self.rtt_s < 0):
            raise InvalidRequestError(f"link needs bandwidth > 0 bytes/s and RTT >= 0 (got {self.bandwidth_bps}, "
                                      f"{self.rtt_s})")
        if self.cloud_replicas < 1 or self.cloud_queue_depth < 0:
            raise InvalidRequestError("cloud_replicas must be >= 1 and cloud_queue_depth >= 0")
        if self.cloud_head_topk < 0 or self.cloud_decode_tokens < 0:
            raise InvalidRequestError(f"cloud_head_topk and cloud_decode_tokens must be >= 0 (0: off), got "
                                      f"{self.cloud_head_topk}, {self.cloud_decode_tokens}")
        if self.concurrency < 1 or self.expert_bytes <= 0:
            raise InvalidRequestError("concurrency must be >= 1 and expert_bytes > 0")
        for name in ("end_layer_fixed_s", "cloud_layer_fixed_s"):
            v = getattr(self, name)
            if v is not None and len(v) != L:
                raise InvalidRequestError(f"{name} needs {L} per-layer times")

    def head_in_cloud(self, a: int, b: int) -> bool:
        """True when the plan (a, b) has the cloud run the LM head: the option is on, there are cloud layers and
        the cloud's reach the last layer (no end tail layers)."""
        return self.cloud_head_topk > 0 and b == 0 and a < self.num_layers

    def codecs_at(self, cut: int) -> list[tuple[int | None, int, float]]:
        """(rank or None for fp16, bytes per token, perplexity increase) of every codec at `cut` within the
        bound."""
        table = self.cut_codecs.get(cut)
        if table is None:
            table = {r: (self.codec_bytes.get(r, r + 2), q) for r, q in self.codec_quality.items()}
        return [(None, self.wire_bytes * self.hidden_size, 0.0)] + sorted(
            (int(r), int(b), max(0.0, float(q))) for r, (b, q) in table.items() if q <= self.max_ppl_increase)


@dataclass
class SplitPlan:
    num_layers: int
    end_layers_head: int  # layers [0, a) on the end
    end_layers_tail: int  # layers [L-b, L) + norm + lm_head on the end
    cloud_experts: dict[int, list[int]]  # end layer → its experts computed in the cloud
    codec_rank: int | None  # the up-link crossing at a; None: fp16 activations (or token ids only)
    micro_batches: int
    objective: str  # "latency" | "throughput"
    predicted_latency_s: float  # per decode step (one token for every request; per token with decode_tokens)
    predicted_throughput_tok_s: float
    predicted_bytes_per_token: float = 0.0  # both directions
    predicted_ppl_increase: float = 0.0
    round_trips_per_step: float = 0.0
    codec_rank_down: int | None = None  # the down-link crossing at L-b; None: fp16
    label: str = "adaptive"  # or the baseline it is: "end-only", "cloud-only", "naive"
    #: k > 0: greedy decode steps make k tokens per exchange (cloud-only, head in the cloud; split/decode.py); the
    #: predictions are then per token; 0: one exchange per token
    decode_tokens: int = 0

    @property
    def cloud_layers(self) -> range:
        return range(self.end_layers_head, self.num_layers - self.end_layers_tail)

    @property
    def mode(self) -> str:
        if self.end_layers_head >= self.num_layers:
            return "end-only" if not self.cloud_experts else "end layers, cloud experts"
        return "cloud-only" if self.end_layers_head == 0 and self.end_layers_tail == 0 else "split"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        L, a, b = self.num_layers, self.end_layers_head, self.end_layers_tail
        n_cloud = sum(len(v) for v in self.cloud_experts.values())
        parts = [f"{self.label} {self.mode}: end layers [0,{a})" + (f" + [{L - b},{L})" if b else ""),
                 f"cloud layers [{a},{L - b})" if a < L - b else "no cloud layers",
                 f"{n_cloud} end-layer experts in the cloud" if n_cloud else "all end-layer experts on the end",
                 f"codec up {_codec(self.codec_rank)}, down {_codec(self.codec_rank_down)}",
                 f"{self.micro_batches} micro-batch(es), {self.objective}"
                 + (f", {self.decode_tokens} greedy tokens per exchange" if self.decode_tokens else ""),
                 f"predicted {1e3 * self.predicted_latency_s:.2f} ms/step, {self.predicted_throughput_tok_s:.1f} tok/s,"
                 f" {self.predicted_bytes_per_token:.0f} B/token, {self.round_trips_per_step:.2f} round trips/step,"
                 f" Δppl ≤ {100 * self.predicted_ppl_increase:.2f}%"]
        return "; ".join(parts)


def _codec(rank: int | None) -> str:
    return "fp16" if rank is None else f"low-rank r{rank}"
