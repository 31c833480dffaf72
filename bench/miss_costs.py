"""Where a committee miss spends its time on this machine: expert read from the mmap'd checkpoint, pinning,
host->device copies (pinned / pageable), host FFN in bf16 vs fp32, and what CostModel measures. CUDA only;
writes 2-layer checkpoints of the real shapes to /dev/shm/micro.

    python bench/miss_costs.py
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shapes import SHAPES, build_random_checkpoint  # noqa: E402
from moetandem.checkpoint import Checkpoint  # noqa: E402
from moetandem.models import get_family  # noqa: E402
from moetandem.experts.store import ExpertStore, flat_views  # noqa: E402
from moetandem.experts.policies import CostModel  # noqa: E402
from moetandem.models.layers import expert_ffn  # noqa: E402


def ms(f, reps=1):
    """(milliseconds per call, last result), synchronised."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        r = f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3, r


for shape in ["olmoe-1b-7b", "qwen3-30b-a3b"]:
    SHAPES[shape + "-2l"] = {**SHAPES[shape], "num_hidden_layers": 2}
    path = build_random_checkpoint(shape + "-2l", Path("/dev/shm/micro") / shape)
    ckpt = Checkpoint(path, check_family=get_family); fam = get_family(ckpt.config["model_type"])
    store = ExpertStore(ckpt, fam, fam.args(ckpt.config, ckpt.path))
    I, H, bf = store.inter, store.hidden, torch.bfloat16
    dst = torch.empty(3 * I * H, dtype=bf, device="cuda")
    rows = {k: [] for k in ["read (first touch)", "read (again)", "pin_memory", "H2D pinned", "H2D pageable",
                            "host FFN bf16 (1 row)", "host FFN fp32 (1 row)"]}
    x = torch.randn(1, H)
    for e in range(24):
        t, flat = ms(lambda: store.read_flat(0, e, bf)); rows["read (first touch)"].append(t)
        t, flat = ms(lambda: store.read_flat(0, e, bf)); rows["read (again)"].append(t)
        t, pinned = ms(lambda: flat.pin_memory()); rows["pin_memory"].append(t)
        rows["H2D pinned"].append(ms(lambda: dst.copy_(pinned))[0])
        rows["H2D pageable"].append(ms(lambda: dst.copy_(flat))[0])
        w13, w2 = flat_views(pinned, I, H)
        rows["host FFN bf16 (1 row)"].append(ms(lambda: expert_ffn(x.to(bf), w13, w2), 3)[0])
        f13, f2 = flat_views(flat.float(), I, H)
        rows["host FFN fp32 (1 row)"].append(ms(lambda: expert_ffn(x, f13, f2), 3)[0])
    cm = CostModel(torch.device("cuda"), bf, I, H)
    print(f"\n{shape} expert ({3*I*H*2/2**20:.1f} MiB bf16), torch threads {torch.get_num_threads()}: median ms over 24 experts")
    for k, v in rows.items():
        print(f"  {k:24s} {statistics.median(v):8.3f}   (min {min(v):.3f}, max {max(v):.3f})")
    print(f"  CostModel: fetch_s {cm.fetch_s*1e3:.3f} ms, host_row_s {cm.host_row_s*1e3:.3f} ms (fp32 FFN) -> "
          f"prefers host for {max(0, int(cm.fetch_s / cm.host_row_s))} rows or fewer")
