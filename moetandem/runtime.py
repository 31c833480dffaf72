"""One builder: a runnable Engine from typed configs. Every feature is chosen here, at build time:

    checkpoint ─► dense model (device) + ExpertStore ─► expert provider (all resident | committee)
               ─► routing hook (gate)  ─► split stand-in (cloud)  ─► Engine(experts map, CUDA graphs or not)

Nothing reaches into the engine afterwards. `load()` is the keyword convenience over build_engine()."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from moetandem.checkpoint import Checkpoint
from moetandem.config import AUTO_BUDGET, CommitteeConfig, GateConfig, ModelConfig, SplitConfig
from moetandem.engine import Engine, resolve_device, resolve_dtype
from moetandem.errors import UnsupportedModelError
from moetandem.errors import InvalidRequestError
from moetandem.experts.budget import total_expert_bytes
from moetandem.experts.factory import build_provider
from moetandem.experts.formats import resolve as resolve_format
from moetandem.experts.store import ExpertStore
from moetandem.gpu_memory import MemoryCap, auto_budget, loading
from moetandem.loader import load_dense
from moetandem.models import get_family

log = logging.getLogger("moetandem")


def build_engine(model: ModelConfig, committee: CommitteeConfig | None = None, gate: GateConfig | None = None,
                 split: SplitConfig | None = None) -> Engine:
    committee, gate = committee or CommitteeConfig(), gate or GateConfig()
    dev = resolve_device(model.device)
    dt = resolve_dtype(model.dtype, dev)
    ckpt = Checkpoint(model.path, check_family=get_family)
    family = get_family(ckpt.config.get("model_type"))
    if family.seq2seq:
        check_seq2seq(family.model_type, model, gate, split)
    args = family.args(ckpt.config, ckpt.path)
    # --gpu-memory's cap, set before any weight is on the device (on each expert-parallel rank); without one the
    # GPU's own free memory, so a load that cannot fit still ends with the message and its fixes
    cap = MemoryCap.apply(model.gpu_memory, dev) or MemoryCap.of_device(dev)
    with loading(cap, "the non-expert weights", parallel=model.expert_parallel):
        net = load_dense(ckpt, family, args, dev, dt, model.progress)
    store = ExpertStore(ckpt, family, args)
    fmt = resolve_format(model.expert_format, store, dt, dev)
    if model.expert_parallel and not fmt.dense:
        if model.expert_format != "auto":
            raise InvalidRequestError(f"--expert-parallel holds bf16 experts; drop --expert-format {fmt.name}")
        fmt = resolve_format("bf16", store, dt, dev)
    expert_bytes = total_expert_bytes(store, dt, fmt.nbytes)
    if committee.budget == AUTO_BUDGET:
        committee = resolve_auto_budget(committee, cap, expert_bytes, model.expert_parallel)
    what = describe_experts(expert_bytes, dt, fmt, model.expert_parallel, committee.enabled)
    held = cap.in_use() if cap is not None else 0
    if cap is not None and not committee.enabled and not model.expert_parallel and held + expert_bytes > cap.nbytes:
        raise cap.error(what, held, suggest_budget=True)  # certain not to fit: say so before loading them
    with loading(cap, what, suggest_budget=not committee.enabled, parallel=model.expert_parallel):
        provider = build_experts(ckpt, store, args.top_k, dev, dt, committee, model, fmt)
    router = None
    if gate.mode != "off":
        from moetandem.gating import build_router
        router = build_router(gate, provider, ckpt, args.hidden_size, args.num_experts, store.layers, dev)
        for block in net.moe_blocks():  # assembly: the model is not yet part of any engine
            block.router = router
            block.router_weight = router.fold(block)  # the gate's projection rides in the router's matmul
    experts: dict[int, Any] = {layer: provider for layer in store.layers}
    runner: Any = net
    splitter = None
    use_graphs = model.use_graphs
    if split is not None:  # the end's head and tail layers of a decode step are CUDA graphs; the exchange is not
        from moetandem.graphs import PieceGraphs
        from moetandem.split.connect import connect_split
        pieces = PieceGraphs() if use_graphs and dev.type == "cuda" else None
        splitter = connect_split(net, provider, ckpt, split, pieces, expert_bytes)
        runner, experts = splitter, splitter.expert_map()
        use_graphs = False  # no whole-step graph: each step exchanges frames with the cloud
    engine = Engine(runner, ckpt.tokenizer(), experts, provider, store, dev, dt, use_graphs, router, splitter,
                    model.compiles(dev.type))
    if router is not None and gate.latency_budget_s > 0:
        from moetandem.gating import measure_profile
        router.selector.update(measure_profile(engine))
    return engine


def resolve_auto_budget(committee: CommitteeConfig, cap: MemoryCap | None, expert_bytes: int,
                        parallel: bool) -> CommitteeConfig:
    """--expert-budget auto, once the non-expert weights are on the device: every expert resident if they fit
    (the committee's other settings then have nothing to act on), else a committee of what fits."""
    if parallel:
        raise InvalidRequestError("--expert-budget auto is not available with --expert-parallel; give each rank's "
                                  "budget in bytes (e.g. 20GiB)")
    budget = auto_budget(cap.room() if cap is not None else None, expert_bytes)
    where = cap.device if cap is not None else "the host"
    if budget is None:
        log.info("--expert-budget auto: all %.2f GiB of experts fit on %s: every expert resident",
                 expert_bytes / 2**30, where)
        return CommitteeConfig()
    log.info("--expert-budget auto: %.2f GiB of %.2f GiB of experts on %s (a committee)", budget / 2**30,
             expert_bytes / 2**30, where)
    return replace(committee, budget=budget)


def build_experts(ckpt: Checkpoint, store: ExpertStore, top_k: int, dev: Any, dt: Any, committee: CommitteeConfig,
                  model: ModelConfig, fmt: Any) -> Any:
    if model.expert_parallel:  # this rank's share of the experts (a committee over it within a per-rank budget)
        from moetandem.experts.parallel import ExpertParallelProvider
        inner = None if not committee.enabled else \
            (lambda shard: build_provider(ckpt, shard, top_k, dev, dt, committee, model.progress))
        return ExpertParallelProvider(store, dev, dt, inner=inner, progress=model.progress)
    return build_provider(ckpt, store, top_k, dev, dt, committee, model.progress, fmt)


def describe_experts(expert_bytes: int, dt: Any, fmt: Any, parallel: bool, committee: bool) -> str:
    """What loading the routed experts (expert_bytes in all) holds on the device, for a message under --gpu-memory."""
    total = expert_bytes / 2**30
    name = str(dt).removeprefix("torch.") if fmt.dense else fmt.name  # "bf16" is the experts in the compute dtype
    if parallel:
        return f"this rank's share of the routed experts ({name}, {total:.2f} GiB over all ranks)"
    if committee:
        return f"the expert committee (slots within --expert-budget, of {total:.2f} GiB of {name} experts)"
    return f"every routed expert resident ({name}, {total:.2f} GiB)"


def check_seq2seq(model_type: str, model: ModelConfig, gate: GateConfig, split: SplitConfig | None) -> None:
    """An encoder-decoder runs in generate / eval (moetandem.text2text), all experts resident or under a
    committee; the decoder-only features refuse it here, before anything loads."""
    used = [name for name, on in (("the server and the cloud (serve / cloud)", model.long_running),
                                  ("end-cloud split (--cloud)", split is not None), ("--gate", gate.mode != "off"),
                                  ("--expert-parallel", model.expert_parallel)) if on]
    if used:
        raise UnsupportedModelError(f"{model_type} is an encoder-decoder (text-to-text) model: {used[0]} runs "
                                    "decoder-only models; use `moetandem generate` / `moetandem eval` (with "
                                    "--expert-budget if you like) for it")


def load(path: str | Path, device: str = "auto", dtype: Any = "auto", progress: bool = True,
         use_graphs: bool = True, expert_budget: str | int | float | None = None, policy: str | None = None,
         fidelity: str = "balanced", skip_threshold: float | None = None, refresh_every: int = 16,
         score: str = "importance", plan: Any = None, async_swaps: bool = True, gate: str = "off",
         gate_cost: float = math.inf, gate_latency_budget: float = 0.0, cloud: str | None = None,
         token_file: str | Path | None = None, token: str | None = None, split: dict[str, Any] | None = None,
         compile: str = "auto", expert_format: str = "auto", miss_format: str = "bf16",
         miss_reads: int | None = None, gpu_memory: float | None = None, miss_compute: str = "gpu",
         miss_tier: str = "host", swap_margin: float | None = None) -> Engine:
    """Load a hub-format MoE checkpoint. With expert_budget (bytes, '6GiB', a fraction like 0.5 of all expert
    bytes, or 'auto': what fits the GPU's free memory) only a committee of experts stays on the device; policy /
    fidelity say what a miss gets. gate="group" / "masked" routes to the experts that are local now.
    cloud="HOST:PORT" runs the middle layers on a `moetandem cloud` server; split holds SplitConfig's other fields
    (plan, head, tail, codec, codec_rank, micro_batches, cloud_experts, cloud_head_topk, cloud_decode_tokens) and
    link options (timeout_s, tls, tls_ca, emulate_rtt_ms, ...). expert_format: bf16 | fp8 | int8 | int4 | mxfp4 |
    auto (the checkpoint's own when pre-quantized, else bf16); packed formats quantize on load.
    miss_format: bf16 | int8 | int4, the host copy a balanced / fast miss reads (never with fidelity exact).
    miss_reads: per token and layer, at most this many balanced / fast misses read exactly (largest gate weight
    first), the rest deferred (never with fidelity exact; None: no cap).
    miss_compute: "gpu" | "host" (experimental): a decode step's exact misses read over the host bus (gpu) or
    computed on the CPU while the GPU runs the hits (host; CUDA, policies auto / a fidelity).
    miss_tier: "host" | "device": where the miss_format copy of every expert lives (device: beside the slots and
    inside expert_budget; misses never cross the host bus).
    swap_margin: a refresh swaps an expert in only where its score beats the resident one's by more than (1 +
    swap_margin) times (None: 1.0 with miss_tier "device", else 0).
    gpu_memory: cap this process's allocations on the CUDA device at this many GiB (as if the GPU were that small);
    a load that does not fit raises InvalidRequestError saying what would."""
    cm = CommitteeConfig(expert_budget, policy, fidelity, skip_threshold, refresh_every, score=score, plan=plan,
                         async_swaps=async_swaps, miss_format=miss_format, miss_reads=miss_reads,
                         miss_compute=miss_compute, miss_tier=miss_tier, swap_margin=swap_margin)
    sc = None
    if cloud is not None:
        opts = dict(split or {})
        fields = {k: opts.pop(k) for k in ("plan", "head", "tail", "cloud_experts", "codec", "codec_rank",
                                            "micro_batches", "cloud_head_topk", "cloud_decode_tokens") if k in opts}
        sc = SplitConfig(cloud, token=token, token_file=token_file, link=opts, **fields)
    return build_engine(ModelConfig(Path(path), device, dtype, use_graphs, progress, compile,
                                    expert_format=expert_format, gpu_memory=gpu_memory), cm,
                        GateConfig(gate, gate_cost, gate_latency_budget), sc)
