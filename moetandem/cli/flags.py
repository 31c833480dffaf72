"""Every flag shared by more than one subcommand, declared once, and the typed configs read from them."""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from moetandem.config import (BASELINES, CODECS, EXPERT_FORMATS, FIDELITY, GATES, MISS_COMPUTE, MISS_FORMATS,
                              MISS_TIERS, POLICIES, CommitteeConfig, GateConfig, ModelConfig, SplitConfig,
                              check_gpu_memory, parse_budget)
from moetandem.errors import InvalidRequestError


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --compile / --expert-format / --gpu-memory, shared by every command that loads a model."""
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the CUDA-graph decode step: ~1.8x faster decode after ~30 s of compiling "
                        "once (auto: on for serve and cloud, off for one-shot commands)")
    p.add_argument("--expert-format", choices=EXPERT_FORMATS, default="auto",
                   help="how routed experts are held and moved: bf16, or quantized on load to fp8 / int8 (1 byte "
                        "a weight), int4 / mxfp4 (half a byte); auto (default) keeps a pre-quantized checkpoint's "
                        "own format (gpt-oss MXFP4, block FP8, compressed-tensors int4), else bf16")
    p.add_argument("--gpu-memory", type=gpu_memory_arg, metavar="GIB",
                   help="run as if the GPU had GIB GiB: cap this process's allocations on it (CUDA only; with "
                        "--expert-parallel on each rank's GPU); a load that does not fit says what would")


def add_drain_args(p: argparse.ArgumentParser, what: str) -> None:
    """--drain-timeout of the long-running servers (serve, cloud); `what`: what finishes during the drain."""
    p.add_argument("--drain-timeout", type=non_negative_float, default=30.0, metavar="S",
                   help=f"on SIGTERM / Ctrl-C: {what} for up to S seconds, then stop (default 30); a second signal "
                        "stops at once")


def add_committee_args(p: argparse.ArgumentParser) -> None:
    """--expert-budget and what a miss gets (Parameter Committee), plus the gate flags."""
    g = p.add_argument_group("expert budget (Parameter Committee)")
    g.add_argument("--expert-budget", type=budget_arg, metavar="B", help="device bytes for experts (6GiB, 512MB), "
                   "a fraction of all expert bytes in (0, 1] (0.5), or auto (every expert if they fit the GPU's free "
                   "memory, else a committee of 80%% of what the other weights leave); default: every expert "
                   "resident")
    g.add_argument("--policy", choices=POLICIES + BASELINES, help="what a non-resident expert gets (overrides "
                   "--fidelity): auto/fetch/host are exact; substitute, skip; baselines lru, static, host-only")
    g.add_argument("--fidelity", choices=FIDELITY, default="balanced", help="exact | balanced | fast (default "
                   "balanced: skip misses below τ=0.05, substitute close experts, fetch/host the rest)")
    g.add_argument("--miss-format", choices=MISS_FORMATS, default="bf16",
                   help="balanced / fast only (refused with exact): misses read a copy of the expert quantized to "
                        "int8 (about half the bytes over the bus) or int4 (about a quarter) instead of bf16 "
                        "(default bf16: the expert as it is)")
    g.add_argument("--miss-tier", choices=MISS_TIERS, default="host",
                   help="with --miss-format: where its copy of every expert lives: host (default: pinned host "
                        "memory, each miss read over the bus) or device (on the GPU beside the slots and inside "
                        "--expert-budget, so the slots get what it leaves: at 50%% with int4 about 23%% of the "
                        "experts exact and every miss read from the GPU's own memory, never over the bus)")
    g.add_argument("--miss-reads", type=non_negative_int, metavar="N",
                   help="balanced / fast only (refused with exact): per token and layer, read at most N misses "
                        "exactly (those of largest gate weight; each costs ~100x a resident expert over the host "
                        "bus) and defer the rest (weight 0, the others renormalised): speed for a little quality "
                        "when few experts fit; 0 defers every miss (default: no cap)")
    g.add_argument("--miss-compute", choices=MISS_COMPUTE, default="gpu",
                   help="experimental: where a decode step's exact misses are computed: gpu (default: read over "
                        "the host bus) or host (on the CPU from host memory, while the GPU runs the hits; the step "
                        "stays one CUDA graph). Needs a CUDA device and a policy whose exact misses may be "
                        "computed anywhere (auto or a --fidelity; not fetch / host / the baselines)")
    g.add_argument("--skip-threshold", type=float, metavar="TAU",
                   help="skip an expert whose gate weight is below TAU times the token's routed weight (its top-k "
                        "weights' sum: 1 for routers that renormalise)")
    g.add_argument("--refresh-every", type=positive_int, default=16, metavar="N",
                   help="committee refresh interval (tokens)")
    g.add_argument("--swap-margin", type=float, metavar="M",
                   help="hysteresis of the committee's refresh: swap an expert in only where its recent score beats "
                        "the resident expert it replaces by more than (1 + M) times (default: 1 with --miss-tier "
                        "device, where a miss costs about what a hit does and a swap buys only precision; else 0)")
    g.add_argument("--plan", metavar="FILE", help="plan from `moetandem plan` (per-layer slots, refresh interval)")
    g = p.add_argument_group("hardware-aware gate")
    g.add_argument("--gate", choices=GATES, default="off",
                   help="route to the experts that are local now: masked = router restricted to them; group = "
                        "learned group gate (after `moetandem calibrate --group-gate`; not recommended: it does not "
                        "beat masked on the demo, see docs/benchmarks.md); off = original (default)")
    g.add_argument("--gate-cost", type=cost_arg, default=math.inf, metavar="C",
                   help="gate weight above which a non-local expert the router picked is still used "
                        "(default inf: local experts only; 0 keeps every original pick)")
    g.add_argument("--gate-latency-budget", type=float, default=0.0, metavar="S",
                   help="seconds per layer and step that non-resident experts may take and still count as local")


def add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split execution (end side; the cloud runs `moetandem cloud`)")
    g.add_argument("--cloud", metavar="HOST:PORT", help="run the middle layers on this moetandem cloud server")
    g.add_argument("--token-file", metavar="FILE", help="file holding the cloud's token (needed with --cloud)")
    g.add_argument("--split-plan", metavar="FILE|auto", help="JSON with end_layers_head, end_layers_tail, "
                   "cloud_experts, codec_rank, codec_rank_down, micro_batches (default: 1 head + 1 tail layer on the "
                   "end); auto: the end plans from live measurements (its own layer times, the cloud's, the link "
                   "once 8 exchanges measured it) and re-plans as they move (with --codec plan it also picks the "
                   "codec of each crossing)")
    g.add_argument("--split-head", type=int, metavar="A", help="layers [0, A) on the end (overrides the plan)")
    g.add_argument("--split-tail", type=int, metavar="B", help="the last B layers on the end (overrides the plan)")
    g.add_argument("--codec", choices=CODECS, default="off", help="activations on the link: off = raw (exact), "
                   "fp16, lowrank (needs `moetandem calibrate --codec`), plan = the plan's rank")
    g.add_argument("--codec-rank", type=int, metavar="R", help="rank of the low-rank codec")
    g.add_argument("--micro-batches", type=int, metavar="M", help="micro-batches in flight (pipelining)")
    g.add_argument("--cloud-head-topk", type=int, metavar="K",
                   help="when the end runs no tail layers, the cloud also runs the LM head and sends the K largest "
                        "logits per token (K x 6 bytes) instead of the hidden state; greedy stays exact, sampling is "
                        "truncated to the top K (1..vocabulary, e.g. 64; default: the head runs on the end)")
    g.add_argument("--cloud-decode-tokens", type=int, metavar="K",
                   help="with --cloud-head-topk and a cloud-only plan (--split-head 0 --split-tail 0): the cloud "
                        "decodes up to K tokens per exchange (one round trip per K tokens; seeded sampling gives the "
                        "tokens of per-token exchanges; structured output and logprobs keep one exchange per token; "
                        "default: off)")
    g.add_argument("--tls-ca", metavar="PEM", help="use TLS to the cloud, trusting this CA / self-signed cert")
    g.add_argument("--cloud-timeout", type=float, default=30.0, metavar="S", help="deadline of one exchange (30)")
    add_emulate_args(g)


def add_emulate_args(g: Any) -> None:
    """The application-layer link emulation (split.shaper), shared by the end and `moetandem cloud`: each side
    shapes what it sends."""
    g.add_argument("--emulate-rtt-ms", type=float, default=0.0, metavar="MS",
                   help="add this round-trip time in the application layer (half per direction), for tests")
    g.add_argument("--emulate-rate-mbit", type=float, default=0.0, metavar="MBIT",
                   help="limit what this side sends to MBIT Mbit/s (token bucket; 0 = not limited), for tests")
    g.add_argument("--emulate-jitter-ms", type=float, default=0.0, metavar="MS",
                   help="vary the one-way delay uniformly within ±MS/2, for tests")
    g.add_argument("--emulate-loss", type=float, default=0.0, metavar="P",
                   help="lose each packet with probability P (costs a TCP retransmission), for tests")


def configs(ns: argparse.Namespace, path: Path, progress: bool = True, use_graphs: bool = True,
            long_running: bool = False) -> tuple[ModelConfig, CommitteeConfig, GateConfig, SplitConfig | None]:
    """The typed configs of a parsed command line (flags a subcommand lacks take their defaults)."""
    split = SplitConfig.from_args(ns)
    if split is not None and split.token_file is not None:
        from moetandem.split.transport.auth import read_token
        read_token(split.token_file)  # an unreadable token file fails before the weights load
    return (ModelConfig.from_args(ns, path, use_graphs=use_graphs, progress=progress, long_running=long_running),
            CommitteeConfig.from_args(ns), GateConfig.from_args(ns), split)


def model_path(ns: argparse.Namespace) -> Path:
    """--model / MODEL, or the shipped demo MoE."""
    if getattr(ns, "model", None):
        return Path(ns.model)
    from moetandem.assets import demo_model_path
    return Path(demo_model_path())


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InvalidRequestError(f"data file {p} is empty")
    return text


# ---- argparse types: a bad value is a usage error before anything loads
def budget_arg(text: str) -> str:
    try:
        parse_budget(text, allow_auto=True)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--expert-budget {text!r}").lstrip(": ")
                                         or str(e)) from None
    return text


def gpu_memory_arg(text: str) -> float:
    value = finite_float(text)
    try:
        check_gpu_memory(value)
    except InvalidRequestError:
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB (e.g. 12), got {text}") from None
    return value


def device_arg(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def cost_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use inf for local experts only)") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the gate cost must be >= 0, got {text}")
    return value
