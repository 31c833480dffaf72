"""Typed configuration, parsed once: one dataclass per concern, each with `from_args` (argparse namespace) and
`validate()` raising a message a user can act on. The builder (moetandem.runtime) takes these; nothing deeper
re-reads flags.

    ModelConfig      checkpoint, device, dtype, CUDA graphs, expert format, GPU memory cap
    CommitteeConfig  expert budget, miss policy / fidelity, miss format, refresh, plan
    GateConfig       hardware-aware gate (off | masked | group)
    SplitConfig      end-cloud split: cloud address, token, TLS, codec, placement
    ServeConfig      the HTTP server
    CloudBatchConfig the split cloud's batching of exchanges across ends
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetandem.errors import InvalidRequestError

POLICIES = ("auto", "fetch", "host", "substitute", "skip")
BASELINES = ("lru", "static", "host-only")
FIDELITY = ("exact", "balanced", "fast")
GATES = ("off", "masked", "group")
CODECS = ("off", "fp16", "lowrank", "plan")
MAX_DECODE_TOKENS = 1024  # split option cloud_decode_tokens: the most greedy tokens one exchange may ask for
#: --expert-format: how routed experts are held (moetandem.experts.formats); auto = the checkpoint's own format
#: when it is pre-quantized (gpt-oss MXFP4, block FP8, compressed-tensors int4), else bf16
EXPERT_FORMATS = ("auto", "bf16", "fp8", "int8", "int4", "mxfp4")
#: --miss-format: the format of the host copy a balanced / fast miss reads (bf16: the expert as it is)
MISS_FORMATS = ("bf16", "int8", "int4")
#: policies whose misses may read a lower-precision copy or be capped (approximate ones; exact policies never are)
_APPROXIMATE = ("substitute", "skip")
#: --miss-compute: where a committee's exact misses are computed in a decode step (host: on the CPU meanwhile)
MISS_COMPUTE = ("gpu", "host")
#: --miss-tier: where the --miss-format copy of every expert lives: host (pinned, read over the bus) or device (on
#: the compute device beside the slots, inside --expert-budget: misses never cross the bus)
MISS_TIERS = ("host", "device")
#: --swap-margin's default with --miss-tier device (bench/committee.py and profile_decode measure it)
TIER_SWAP_MARGIN = 1.0
#: policies whose exact misses may be computed anywhere (those a committee reads zero-copy from pinned memory)
_ANYWHERE = ("auto", "substitute", "skip")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


AUTO_BUDGET = "auto"


def parse_budget(budget: str | int | float, total_bytes: int | None = None, allow_auto: bool = False
                 ) -> int | float | str:
    """An expert budget: bytes with a unit ('6GiB', '512MB', '1e9B'), a whole number of bytes (123456), or a
    fraction of all expert bytes in (0, 1] ('0.5', 0.5). With total_bytes, returns bytes (clamped to the total);
    without it, returns the fraction as a float or the bytes as an int, so a bad string fails before any load.
    allow_auto: 'auto' (what fits the device, decided at load: runtime.build_engine) is returned as is."""
    text = str(budget).strip()
    if text.lower() == AUTO_BUDGET:
        if not allow_auto:
            raise InvalidRequestError("--expert-budget auto is decided when the model loads; here give bytes "
                                      "(6GiB) or a fraction of all expert bytes (0.5)")
        return AUTO_BUDGET
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)", text)
    if isinstance(budget, bool) or not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise InvalidRequestError(f"--expert-budget {budget!r}: use bytes with a unit like 6GiB or 512MB, or a "
                                  "fraction of all expert bytes like 0.5")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"--expert-budget {budget!r} must be positive: a fraction in (0, 1] like 0.5, "
                                  "or bytes like 6GiB")
    if not unit and value <= 1:  # a fraction of all expert bytes
        return value if total_bytes is None else max(1, int(value * total_bytes))
    if not unit and ("." in m.group(1) or "e" in m.group(1).lower() or isinstance(budget, float)):
        raise InvalidRequestError(f"--expert-budget {budget!r}: a fraction must be in (0, 1]; "
                                  f"use {value:g}GiB for gibibytes")
    nbytes = int(value * _UNITS.get(unit, 1))
    return nbytes if total_bytes is None else min(total_bytes, nbytes)


def check_gpu_memory(gib: float | None) -> None:
    """--gpu-memory: a cap that can never be right, refused before anything loads."""
    if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib)
                            or gib <= 0):
        raise InvalidRequestError(f"--gpu-memory {gib!r}: must be a positive number of GiB, e.g. 12 for a 12 GiB "
                                  "card")


def _positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    device: str = "auto"
    dtype: str = "auto"
    use_graphs: bool = True
    progress: bool = True
    compile: str = "auto"  # torch.compile the captured decode step: auto | on | off
    #: a server (serve, cloud): "auto" compiles, since ~30 s once pays off over many requests; a one-shot
    #: generate / eval does not compile under "auto"
    long_running: bool = False
    #: shard the routed experts over the ranks of the initialised torch.distributed group (moetandem cloud
    #: --expert-parallel N); non-expert layers are replicated on every rank
    expert_parallel: bool = False
    #: how routed experts are held and moved: one of EXPERT_FORMATS (packed formats quantize on load)
    expert_format: str = "auto"
    #: --gpu-memory: cap this process's allocations on the CUDA device at this many GiB (as if the GPU were that
    #: small; moetandem.gpu_memory), set before any weight loads; None = the whole device
    gpu_memory: float | None = None

    def __post_init__(self) -> None:
        check_gpu_memory(self.gpu_memory)
        if self.compile not in ("auto", "on", "off"):
            raise InvalidRequestError(f"--compile {self.compile!r}: choose auto, on or off")
        if self.expert_format not in EXPERT_FORMATS:
            raise InvalidRequestError(f"--expert-format {self.expert_format!r}: choose one of "
                                      f"{', '.join(EXPERT_FORMATS)}")

    def compiles(self, device_type: str) -> bool:
        """Whether the CUDA-graph decode step goes through torch.compile."""
        return device_type == "cuda" and (self.compile == "on" or self.compile == "auto" and self.long_running)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, path: Path, **kw: Any) -> "ModelConfig":
        return cls(path=Path(path), device=getattr(ns, "device", "auto"), dtype=getattr(ns, "dtype", "auto"),
                   compile=getattr(ns, "compile", "auto"), expert_format=getattr(ns, "expert_format", "auto"),
                   gpu_memory=getattr(ns, "gpu_memory", None), **kw)


@dataclass(frozen=True)
class CommitteeConfig:
    """budget None = every expert resident. policy overrides fidelity."""

    budget: str | int | float | None = None
    policy: str | None = None
    fidelity: str = "balanced"
    skip_threshold: float | None = None
    refresh_every: int = 16
    window: int = 256
    score: str = "importance"
    plan: Any = None  # a Plan or a path to a plan JSON (moetandem plan)
    async_swaps: bool = True
    #: the format of the host copy a miss reads under an approximate fidelity (one of MISS_FORMATS)
    miss_format: str = "bf16"
    #: --miss-reads: per token and layer, at most this many misses an approximate fidelity would read exactly
    #: (zero-copy over the host bus, or fetched); the others are deferred. None: no cap
    miss_reads: int | None = None
    #: --miss-compute (experimental): "gpu" (exact misses read over the host bus) or "host" (computed on the CPU
    #: while the GPU runs the hits; CUDA only, experts/host_misses.py)
    miss_compute: str = "gpu"
    #: --miss-tier: "host" (the miss copies pinned in host memory) or "device" (a --miss-format copy of every
    #: expert on the compute device, counted in the budget: the slots get what it leaves)
    miss_tier: str = "host"
    #: --swap-margin: a refresh swaps an expert in only where its windowed score beats the resident one it would
    #: replace by more than (1 + margin) times. None: auto (TIER_SWAP_MARGIN with --miss-tier device, where a
    #: miss costs about what a hit does on the GPU and a swap buys only precision; else 0)
    swap_margin: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.budget is not None:
            parse_budget(self.budget, allow_auto=True)
        if self.policy is not None and self.policy not in POLICIES + BASELINES:
            raise InvalidRequestError(f"unknown policy {self.policy!r}; choose one of "
                                      f"{', '.join(POLICIES + BASELINES)}")
        if self.policy is not None and self.budget is None and self.plan is None:
            raise InvalidRequestError("--policy needs --expert-budget (with no budget every expert is resident)")
        if self.fidelity not in FIDELITY:
            raise InvalidRequestError(f"unknown fidelity {self.fidelity!r}; choose one of {', '.join(FIDELITY)}")
        if self.skip_threshold is not None and not 0 <= self.skip_threshold < 1:
            raise InvalidRequestError(f"--skip-threshold must be in [0, 1), got {self.skip_threshold}")
        _positive_int("--refresh-every", self.refresh_every)
        _positive_int("the committee window", self.window)
        m = self.swap_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < math.inf):
            raise InvalidRequestError(f"--swap-margin must be a number >= 0 (0: swap on any lead; 1: the newcomer "
                                      f"needs twice the score), got {m!r}")
        self._validate_miss_format()
        self._validate_miss_reads()
        self._validate_miss_compute()
        self._validate_miss_tier()

    def _validate_miss_format(self) -> None:
        m = self.miss_format
        if m not in MISS_FORMATS:
            raise InvalidRequestError(f"--miss-format {m!r}: choose one of {', '.join(MISS_FORMATS)}")
        if m != "bf16":
            self._approximate_only(f"--miss-format {m}", "reads a lower-precision copy of a missed expert")

    def _validate_miss_reads(self) -> None:
        n = self.miss_reads
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidRequestError(f"--miss-reads must be an integer >= 0, got {n!r}")
        self._approximate_only(f"--miss-reads {n}", "defers a token's misses beyond the cap")

    def _validate_miss_compute(self) -> None:
        m = self.miss_compute
        if m not in MISS_COMPUTE:
            raise InvalidRequestError(f"--miss-compute {m!r}: choose one of {', '.join(MISS_COMPUTE)}")
        if m == "gpu":
            return
        self._needs_budget("--miss-compute host")
        if self.policy is not None and self.policy not in _ANYWHERE:
            raise InvalidRequestError(f"--miss-compute host computes exact misses on the CPU, but --policy "
                                      f"{self.policy} decides itself where its misses go; use --policy auto (or a "
                                      "--fidelity), or drop --miss-compute")

    def _validate_miss_tier(self) -> None:
        t = self.miss_tier
        if t not in MISS_TIERS:
            raise InvalidRequestError(f"--miss-tier {t!r}: choose one of {', '.join(MISS_TIERS)}")
        if t == "host":
            return
        if self.miss_format == "bf16":
            raise InvalidRequestError("--miss-tier device keeps a quantized copy of every expert beside the slots; "
                                      "choose its format with --miss-format int4 (about 0.27 of the bf16 bytes; "
                                      "int8 about 0.52), or drop --miss-tier")
        if self.miss_compute != "gpu":
            raise InvalidRequestError("--miss-tier device reads misses on the GPU from its own copy; it cannot be "
                                      "combined with --miss-compute host")

    def _approximate_only(self, flag: str, what: str) -> None:
        """A flag that changes what a miss computes: it needs misses (a budget) and an approximate policy."""
        self._needs_budget(flag)
        if self.policy is not None and self.policy not in _APPROXIMATE:
            raise InvalidRequestError(f"{flag} {what}, which --policy {self.policy} never allows; use --fidelity "
                                      f"balanced or fast (or --policy {' / '.join(_APPROXIMATE)}), or drop "
                                      f"{flag.split()[0]}")
        if self.policy is None and self.fidelity == "exact":
            raise InvalidRequestError(f"{flag} {what}, which --fidelity exact never allows; use --fidelity balanced "
                                      f"or fast, or drop {flag.split()[0]}")

    def _needs_budget(self, flag: str) -> None:
        if not self.enabled:
            raise InvalidRequestError(f"{flag} needs --expert-budget: with every expert resident there are no "
                                      "misses")

    @property
    def enabled(self) -> bool:
        return self.budget is not None or self.plan is not None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CommitteeConfig":
        return cls(budget=getattr(ns, "expert_budget", None), policy=getattr(ns, "policy", None),
                   fidelity=getattr(ns, "fidelity", "balanced"), skip_threshold=getattr(ns, "skip_threshold", None),
                   refresh_every=getattr(ns, "refresh_every", 16), plan=getattr(ns, "plan", None),
                   miss_format=getattr(ns, "miss_format", "bf16"), miss_reads=getattr(ns, "miss_reads", None),
                   miss_compute=getattr(ns, "miss_compute", "gpu"), miss_tier=getattr(ns, "miss_tier", "host"),
                   swap_margin=getattr(ns, "swap_margin", None))

    @property
    def resolved_swap_margin(self) -> float:
        """The swap margin in force: the given one, else the auto default (see swap_margin)."""
        if self.swap_margin is not None:
            return float(self.swap_margin)
        return TIER_SWAP_MARGIN if self.miss_tier == "device" else 0.0


@dataclass(frozen=True)
class GateConfig:
    mode: str = "off"
    cost: float = math.inf  # gate weight above which a non-local pick is still used (inf: local experts only)
    latency_budget_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in GATES:
            raise InvalidRequestError(f"unknown gate {self.mode!r}; choose one of {', '.join(GATES)}")
        if not self.cost >= 0:
            raise InvalidRequestError(f"the gate cost must be >= 0, got {self.cost}")
        if not (math.isfinite(self.latency_budget_s) and self.latency_budget_s >= 0):
            raise InvalidRequestError(f"--gate-latency-budget must be >= 0 seconds, got {self.latency_budget_s}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "GateConfig":
        return cls(getattr(ns, "gate", "off"), getattr(ns, "gate_cost", math.inf),
                   getattr(ns, "gate_latency_budget", 0.0))


@dataclass(frozen=True)
class SplitConfig:
    """End side of split execution. token or token_file; link options go to split.link.LinkOptions."""

    address: str
    token: str | None = None
    token_file: str | Path | None = None
    plan: Any = None  # a SplitPlan / Placement or a JSON file of Placement's fields
    head: int | None = None
    tail: int | None = None
    cloud_experts: dict[int, list[int]] | None = None
    codec: str = "off"
    codec_rank: int | None = None
    micro_batches: int | None = None
    link: dict[str, Any] = field(default_factory=dict)  # timeout_s, emulate_rtt_ms, tls, tls_ca, ...
    #: K > 0: with no end tail layers the cloud runs norm + lm_head too and sends the top-K logits down
    #: (split/logits.py); None: the end runs the head (the checkpoint's vocabulary bounds K, checked at load)
    cloud_head_topk: int | None = None
    #: k >= 1: with the cloud-only plan and the head in the cloud, greedy decode steps run k tokens per exchange in
    #: the cloud (split/decode.py); None: one exchange per token. Ignored by other plans
    cloud_decode_tokens: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.address or ""):
            raise InvalidRequestError(f"--cloud wants HOST:PORT, got {self.address!r}")
        if self.token is None and self.token_file is None:
            raise InvalidRequestError("--cloud needs --token-file (the file holding the cloud's token)")
        if self.codec not in CODECS:
            raise InvalidRequestError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        for name, v in (("--split-head", self.head), ("--split-tail", self.tail)):
            if v is not None and v < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {v}")
        _positive_int("--codec-rank", self.codec_rank)
        _positive_int("--micro-batches", self.micro_batches)
        if self.cloud_head_topk is not None and (isinstance(self.cloud_head_topk, bool)
                                                 or not isinstance(self.cloud_head_topk, int)
                                                 or self.cloud_head_topk < 1):
            raise InvalidRequestError(f"--cloud-head-topk {self.cloud_head_topk!r}: must be an integer >= 1 (the "
                                      "logits sent down per token, e.g. 64); leave it out to run the LM head on "
                                      "the end")
        k = self.cloud_decode_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DECODE_TOKENS):
            raise InvalidRequestError(f"--cloud-decode-tokens {k!r}: must be an integer in 1..{MAX_DECODE_TOKENS} "
                                      "(greedy tokens the cloud decodes per exchange, e.g. 8; it needs "
                                      "--cloud-head-topk and a cloud-only plan); leave it out for one exchange per "
                                      "token")
        for flag in ("emulate_rtt_ms", "emulate_rate_mbit", "emulate_jitter_ms"):
            v = self.link.get(flag, 0.0)
            if not (math.isfinite(v) and v >= 0):
                raise InvalidRequestError(f"--{flag.replace('_', '-')} {v}: must be a number >= 0 (0 = off)")
        if not 0 <= self.link.get("emulate_loss", 0.0) < 1:
            raise InvalidRequestError(f"--emulate-loss {self.link['emulate_loss']}: a packet-loss probability in "
                                      "[0, 1), e.g. 0.001")
        timeout = self.link.get("timeout_s", 30.0)
        if not (math.isfinite(timeout) and timeout > 0):
            raise InvalidRequestError(f"--cloud-timeout must be a positive number of seconds, got {timeout}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "SplitConfig | None":
        if not getattr(ns, "cloud", None):
            return None
        link: dict[str, Any] = {"timeout_s": ns.cloud_timeout, "emulate_rtt_ms": ns.emulate_rtt_ms}
        link.update({k: getattr(ns, k) for k in ("emulate_rate_mbit", "emulate_jitter_ms", "emulate_loss")
                     if getattr(ns, k, 0.0)})
        if ns.tls_ca:
            link.update(tls=True, tls_ca=ns.tls_ca)
        return cls(ns.cloud, token_file=ns.token_file, plan=ns.split_plan, head=ns.split_head, tail=ns.split_tail,
                   codec=ns.codec, codec_rank=ns.codec_rank, micro_batches=ns.micro_batches, link=link,
                   cloud_head_topk=getattr(ns, "cloud_head_topk", None),
                   cloud_decode_tokens=getattr(ns, "cloud_decode_tokens", None))


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: Path | None = None
    served_model_name: str | None = None
    max_batch: int = 8
    max_waiting: int = 64
    max_model_len: int | None = None
    log_level: str = "info"
    drain_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        _positive_int("--max-batch", self.max_batch)
        _positive_int("--max-model-len", self.max_model_len)
        if self.max_waiting < 0:
            raise InvalidRequestError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"--port must be 0..65535, got {self.port}")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise InvalidRequestError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout_s}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ServeConfig":
        return cls(ns.host, ns.port, ns.api_key_file, ns.served_model_name, ns.max_batch, ns.max_waiting,
                   ns.max_model_len, ns.log_level, ns.drain_timeout)


@dataclass(frozen=True)
class CloudBatchConfig:
    """`moetandem cloud`: decode exchanges of different ends queued together run as one forward (split/cloud.py).
    max_rows: the most KV-cache rows in one forward (1: off, each session its own KV cache and forwards);
    window_ms: how long a batch may wait for more (0: only those that queued while the cloud was busy)."""

    window_ms: float = 1.0
    max_rows: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_ms) and 0 <= self.window_ms <= 100):
            raise InvalidRequestError(f"--batch-window-ms {self.window_ms:g}: must be in [0, 100] ms (a wait of "
                                      "1-2 ms is enough; 0 = batch only what queued while the cloud was busy)")
        _positive_int("--batch-max-rows", self.max_rows)

    @property
    def enabled(self) -> bool:
        return self.max_rows > 1

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CloudBatchConfig":
        return cls(ns.batch_window_ms, ns.batch_max_rows)
