"""Kernel census of the compiled batch-1 decode step (T = 1, B = 1), on a CPU-only machine: which kernels the step
that DecodeGraphs captures launches per decoder layer, in order, and what each inductor kernel fuses.

    /work/venv/bin/python bench/kernel_census.py                      # olmoe + qwen3, two sizes each
    /work/venv/bin/python bench/kernel_census.py --shapes olmoe --sizes small --switches rope router_weights
    (--switches: bench/switches.py's, as bench/decode.py's A/B variants; default all, as shipped; `--switches`
    alone: all off; a switch not given is off, whatever the environment says)

How: a small random checkpoint of the shape's family (bench/shapes.py's layer structure: head counts, q/k norm kind,
top-8 softmax routing; hidden size, experts and vocabulary scaled down) is loaded on the CPU in bf16, and its decode
step is traced by torch.compile (fullgraph, dynamic=False, as graphs.DecodeGraphs compiles it) with the CUDA paths
switched on: the decode-attention custom op, the fused router op and the fused-MoE op (the same predicates the CUDA
run evaluates to True, forced here). Inductor then lowers and schedules the graph with its Triton backend
(`cpu_backend = "triton"`: the same TritonScheduling, fusion rules and kernel codegen as for CUDA, with an H200's
132 SMs for the split-reduction heuristics, and the GPU's branch where lowering or scheduling tests for the CPU: see
as_gpu); the generated wrapper's `call()` is the launch sequence. Nothing is compiled by Triton and nothing runs. The step is censused at 1 and 2 layers; the per-layer count is the difference
(kernels that straddle a layer boundary, e.g. the MoE output + residual add + the next layer's input norm, count
once per layer), and the 1-layer step is listed in full.

Faithfulness to what CUDA runs:
- inductor kernels: the same scheduler and fusion decisions as on CUDA (one Triton launch each); device-property
  heuristics use H200 values; where inductor (torch 2.13) branches on the device being the CPU (cat lowering, loop
  reordering for fusion, mixed-order reductions) as_gpu takes the GPU's branch. Remaining differences: the dtype
  is bf16 as on CUDA, but any device check this census does not patch still sees "cpu". Not checked here: autotuning never changes the number of launches of a pointwise or
  persistent-reduction kernel; a large reduction that inductor splits on CUDA would be two (none at these shapes:
  reductions over <= 8192 elements are never split on sm90).
- extern GEMVs (`extern_kernels.mm`: the packed qkv, o_proj and the lm_head): one cuBLAS launch each is assumed;
  cuBLAS may pick a split-K kernel with a separate reduction (2 launches) for some shapes, which only a GPU profile
  (bench/profile_decode.py) shows. With MOETANDEM_DECODE_LINEAR=1 they are the `moetandem::decode_linear` op
  instead (a Triton GEMV, 1 launch) - off by default, and the census runs the default.
- custom ops, launches read from their code: moetandem::decode_attention = 2 (partial + reduce kernel; 1 when the
  kernel picks one split: short contexts), moetandem::route_logits_topk = 1 (T <= FUSED_UP_TO), moetandem::fused_moe
  = 3 at T <= DIRECT_MAX_TOKENS (gate/up GEMM, down GEMM, k-sum) or 2 with MOETANDEM_MOE_SUM=graph
  (moetandem::fused_moe_parts, the sum in an inductor kernel).
- the in-place KV-cache write (index_put_ into the cache, a graph input) is an inductor scatter kernel here as on
  CUDA; a `copy_` back into a mutated input would be a launch and is listed as one.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402
from bench.switches import add_switches_argument, opt_ins  # noqa: E402

#: scaled-down layer shapes: (family's bench shape, overrides) per size; the head and routing structure is kept
SIZES: dict[str, dict[str, dict]] = {
    "olmoe": {"small": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64),
              "large": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=128)},
    "qwen3": {"small": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                            moe_intermediate_size=64, intermediate_size=256),
              "large": dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                            moe_intermediate_size=128, intermediate_size=1024)},
}
BASE = {"olmoe": "olmoe-1b-7b", "qwen3": "qwen3-30b-a3b-24l"}
#: launches inside each custom op at batch-1 decode (read from the ops' code; see the module docstring)
OP_LAUNCHES = {"decode_attention": 2, "route_logits_topk": 1, "fused_moe": 3, "fused_moe_parts": 2,
               "decode_linear": 1}
_LAUNCH = re.compile(r"^\s*(?:[\w, ]+ = )?(?:(?P<triton>\w+)\.run\(|extern_kernels\.(?P<extern>\w+)\(|"
                     r"torch\.ops\.(?P<op>[\w.]+)\(|(?P<copy>[\w\[\]]+\.copy_)\()")
_SOURCE = re.compile(r"# Topologically Sorted Source Nodes: \[(?P<src>.*)\], Original ATen: \[(?P<aten>.*)\]")


@dataclass
class Launch:
    kind: str  # triton | extern | op | copy
    name: str
    source: str  # the FX source nodes inductor names
    aten: str  # the aten ops it covers

    @property
    def launches(self) -> int:
        """GPU launches this line stands for (a custom op's own launches)."""
        if self.kind != "op":
            return 1
        return OP_LAUNCHES.get(self.name.split(".")[1], 1) if self.name.startswith("moetandem.") else 1

    def __str__(self) -> str:
        what = {"triton": f"triton  {self.name}", "extern": f"extern  {self.name} (cuBLAS)",
                "op": f"op      {self.name} ({self.launches} launch{'es' if self.launches > 1 else ''})",
                "copy": f"copy    {self.name}"}[self.kind]
        return f"{what}\n            fuses: {self.aten}" if self.kind == "triton" else what


def parse_call(code: str) -> list[Launch]:
    """The launches of an inductor wrapper's call(), in order, each with the source comment above it."""
    body = code[code.index("def call(self, args):"):]
    out, src, aten = [], "", ""
    for line in body.splitlines():
        m = _SOURCE.search(line)
        if m:
            src, aten = m["src"], m["aten"]
            continue
        m = _LAUNCH.match(line)
        if m is None:
            continue
        kind = next(k for k in ("triton", "extern", "op", "copy") if m[k])
        name = m[kind].removesuffix(".default")
        if kind == "op" and name.startswith("aten.") and name in ("aten.as_strided", "aten.view"):
            continue
        out.append(Launch(kind, name, src, aten))
        src = aten = ""
    return out


class _Captured(Exception):
    """Raised once inductor has written the wrapper: nothing is compiled by Triton or run."""


@contextlib.contextmanager
def cuda_paths() -> Iterator[None]:
    """The decode step's CUDA branches, taken on the CPU for tracing: decode attention, the fused router, the
    fused MoE (the ops' fakes give the shapes; nothing runs)."""
    from moetandem.experts import executor
    from moetandem.kernels import router_logits
    from moetandem.models.components import attention
    with mock.patch.object(attention, "decode_attention_supported", lambda *a: True), \
            mock.patch.object(router_logits, "fused_supported", lambda *a: True), \
            mock.patch.object(executor, "fused_moe_supported", lambda *a, **k: True):
        yield


@contextlib.contextmanager
def triton_codegen(codes: list[str]) -> Iterator[None]:
    """Inductor's Triton backend for CPU tensors, code generation only: each compiled graph's wrapper source is
    appended to `codes`, then _Captured stops the compile. Device properties: an H200's SM count."""
    import torch._inductor.config as icfg
    import torch.utils._triton as ut
    from torch._inductor.graph import GraphLowering
    from torch._inductor.runtime.hints import DeviceProperties

    def grab(self: GraphLowering) -> None:
        code, _ = self.codegen()
        codes.append(code.value)
        raise _Captured

    props = DeviceProperties(type="cpu", index=None, multi_processor_count=132, cc=90, major=9,
                             regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                             max_threads_per_block=1024, warp_size=32)
    with icfg.patch(cpu_backend="triton"), mock.patch.object(GraphLowering, "_compile_to_module", grab), \
            mock.patch.object(ut, "triton_hash_with_backend", lambda: "census"), \
            mock.patch.object(DeviceProperties, "create", lambda device: props), as_gpu():
        yield


@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """Where inductor's lowering and scheduling branch on the device being the CPU, the GPU's branch: cat may lower
    as a pointwise cat (the CPU always materialises it: one kernel per input), and the scheduler's GPU-only fusion
    steps (loop reordering / reindexing for fusion, mixed-order reductions) run."""
    import inspect
    import textwrap

    from torch._inductor import lowering, scheduler
    src = textwrap.dedent(inspect.getsource(lowering.cat))
    cpu_check = 'cpu_device = inputs[0].get_device().type == "cpu"'
    if cpu_check not in src:
        raise RuntimeError("torch._inductor.lowering.cat changed: update kernel_census.as_gpu")
    scope: dict = {}
    exec(compile(src.replace(cpu_check, "cpu_device = False"), lowering.__file__, "exec"),  # noqa: S102
         lowering.__dict__, scope)
    before = lowering.cat.__code__
    lowering.cat.__code__ = scope["cat"].__code__  # the registered lowering wraps this very function object
    try:
        with mock.patch.object(scheduler.BaseSchedulerNode, "is_cpu", lambda self: False), \
                mock.patch.object(scheduler.BaseSchedulerNode, "is_gpu", lambda self: True), \
                mock.patch.object(scheduler, "_is_gpu_triton_backend", lambda a, b: True):
            yield
    finally:
        lowering.cat.__code__ = before


def census_step(engine: object) -> list[Launch]:
    """The launches of engine's compiled batch-1 decode step (one sequence at position 3 of a 16-token cache)."""
    from moetandem.models import KVCache
    model, experts = engine.model, engine.experts  # type: ignore[attr-defined]
    for p in experts.values():
        p.grouped = True  # the executor's device path (the fused MoE op)
    cache = KVCache(engine.args, 2, 16, torch.device("cpu"), engine.dtype)  # type: ignore[attr-defined]
    ids, pos, rows = torch.tensor([[5]]), torch.tensor([[3]]), torch.tensor([0])
    codes: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx
        try:
            compile_fx(gm, inputs)
        except Exception as e:  # _Captured, wrapped by inductor
            if "_Captured" not in repr(e) and not isinstance(e, _Captured):
                raise

        def stop(*args: object) -> None:
            raise _Captured
        return stop

    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad(), cuda_paths(), triton_codegen(codes), contextlib.suppress(_Captured):
        fn(ids, pos, cache, cache.max_len, experts, rows=rows)
    torch._dynamo.reset()
    if len(codes) != 1:
        raise RuntimeError(f"expected one compiled graph for the decode step, got {len(codes)}")
    return parse_call(codes[0])


def build(family: str, size: str, layers: int, root: Path) -> Path:
    """A random bf16 checkpoint of `family`'s bench shape at `size`, with `layers` layers, 16 experts top-8."""
    name = f"census-{family}-{size}-{layers}l"
    SHAPES[name] = {**SHAPES[BASE[family]], **SIZES[family][size], "num_hidden_layers": layers, "num_experts": 16,
                    "vocab_size": 1024, "max_position_embeddings": 64}
    return build_random_checkpoint(name, root / name)


def count(launches: list[Launch]) -> int:
    return sum(x.launches for x in launches)


def census(family: str, size: str, root: Path) -> tuple[int, int, list[Launch]]:
    """(launch lines per layer, GPU launches per layer, the 1-layer step's launches)."""
    import moetandem
    steps = []
    for layers in (1, 2):
        eng = moetandem.load(build(family, size, layers, root), device="cpu", dtype=torch.bfloat16, progress=False,
                             use_graphs=False, compile="off")
        steps.append(census_step(eng))
    return len(steps[1]) - len(steps[0]), count(steps[1]) - count(steps[0]), steps[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--sizes", nargs="+", default=["small", "large"], choices=["small", "large"])
    add_switches_argument(ap)
    args = ap.parse_args()
    on = args.switches
    summary = []
    with tempfile.TemporaryDirectory() as tmp, opt_ins(on):
        for family in args.shapes:
            for size in args.sizes:
                lines, launches, step = census(family, size, Path(tmp))
                print(f"\n== {family} ({BASE[family]} layer structure, {size}): 1-layer decode step, in order ==")
                for i, x in enumerate(step):
                    print(f"{i:3d}  {x}")
                summary.append(f"{family:6s} {size:6s} per layer: {lines} launch sites, {launches} GPU launches "
                               f"(custom ops counted by their own launches)")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
