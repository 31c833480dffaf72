"""Block sizes for the fused MoE kernels: a small search at first use per (GPU, expert format, dtype, slots, H, I,
k, T bucket), kept in a JSON file under ~/.cache/moetandem/fused_moe/ (MOETANDEM_CACHE_DIR overrides the root;
MOETANDEM_FUSED_MOE_TUNE=0 turns the search off and uses the defaults). Never searches while a CUDA graph is being
captured: the caller passes `may_tune=False` then and gets the cached entry or the default. The direct path's GEMV
kernels (MOETANDEM_MOE_GEMV=1) search GEMV_CANDIDATES under keys ending ",gemv". ConfigCache also keeps
the decode linear's choices (kernels/linear.py), in a directory of its own."""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Protocol, TypeVar

import torch

P = TypeVar("P")


class Cacheable(Protocol):
    def to_json(self) -> dict: ...


C = TypeVar("C", bound=Cacheable)


@dataclass(frozen=True, order=True)
class KernelConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    #: GEMV kernels only (kernels/fused_moe_gemv.py): products summed over K tiles elementwise into a [BN, BK]
    #: accumulator, reduced once after the loop (else per tile into [BN])
    acc2d: bool = False


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    up: KernelConfig  # gate+up GEMM (activation fused)
    down: KernelConfig  # down GEMM (routing weight fused)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> MoEConfig:
        return MoEConfig(int(d["block_m"]), KernelConfig(**d["up"]), KernelConfig(**d["down"]))


#: searched for both GEMMs; narrow N tiles spread a batch-1 GEMV over many SMs, wide ones reuse rows at large T
#: (a 16-wide tile at BLOCK_M 16 gives 4 warps the same work, hence also 2-warp variants and longer K tiles). The
#: last three are for short reductions: the down GEMM's K is the intermediate size (768-1536 in the common shapes),
#: a 4-8 step loop at BLOCK_K 128-256 where the pipeline's fill and drain dominate; at batch 1 down reached ~52% of
#: HBM bandwidth against gate+up's ~66% (H200, OLMoE shape)
CANDIDATES = (KernelConfig(16, 256, 4, 4), KernelConfig(16, 128, 4, 4), KernelConfig(32, 128, 4, 4),
              KernelConfig(32, 64, 4, 6), KernelConfig(64, 128, 4, 3),
              KernelConfig(64, 64, 4, 4), KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3),
              KernelConfig(16, 256, 2, 4), KernelConfig(16, 512, 2, 3), KernelConfig(32, 256, 4, 3),
              KernelConfig(16, 1024, 4, 2), KernelConfig(16, 512, 4, 3), KernelConfig(32, 512, 4, 2))

#: the direct path's GEMV kernels (kernels/fused_moe_gemv.py, MOETANDEM_MOE_GEMV=1; tuned under keys ending ",gemv"):
#: one row per program, so narrow N tiles (8-64 rows of W) and long K tiles; block_k 0 = the whole K in one tile;
#: num_stages 1 = the K loop fully unrolled (every tile's loads in flight at once), 2-4 = a loop (Triton 3.6 stages
#: no loads that feed no dot: compiled for sm90 it issues one tile per iteration); acc2d: one reduction after the
#: loop instead of one per tile. None spills at the OLMoE / Qwen3 shapes (ptxas, sm90).
GEMV_CANDIDATES = (KernelConfig(8, 256, 2, 1), KernelConfig(16, 128, 2, 1), KernelConfig(16, 256, 4, 1),
                   KernelConfig(32, 128, 4, 1), KernelConfig(32, 256, 8, 1), KernelConfig(64, 128, 8, 1),
                   KernelConfig(8, 0, 4, 1), KernelConfig(16, 0, 8, 1),
                   KernelConfig(8, 512, 4, 1, True), KernelConfig(16, 128, 2, 1, True),
                   KernelConfig(16, 256, 4, 1, True), KernelConfig(16, 512, 8, 1, True),
                   KernelConfig(32, 256, 8, 1, True),
                   KernelConfig(16, 256, 4, 2), KernelConfig(16, 128, 4, 3), KernelConfig(32, 128, 4, 3),
                   KernelConfig(64, 128, 8, 2), KernelConfig(32, 128, 8, 4, True))
#: the GEMV kernels' config while a graph is captured with no tuned entry, or with tuning off
GEMV_DEFAULT = KernelConfig(16, 256, 4, 1)


def t_bucket(t: int) -> int:
    """Tokens rounded up to a power of two (at most 4096), so nearby batch sizes share one tuned entry."""
    return min(4096, 1 << max(0, math.ceil(math.log2(max(1, t)))))


def block_m_choices(m: int, n_slots: int) -> list[int]:
    """BLOCK_M candidates from the mean rows per busy slot (tl.dot needs at least 16)."""
    per_slot = m / max(1, min(m, n_slots))
    return [16] if per_slot <= 16 else [16, 32] if per_slot <= 48 else [16, 32, 64]


def default_config(m: int, n_slots: int, gemv: bool = False) -> MoEConfig:
    """Used when the search is off or a graph is being captured with no cached entry; gemv: the direct path's GEMV
    kernels' (block_m is not theirs: 16, as the direct tl.dot path)."""
    if gemv:
        return MoEConfig(16, GEMV_DEFAULT, GEMV_DEFAULT)
    bm = block_m_choices(m, n_slots)[-1]
    kc = KernelConfig(32, 128, 4, 4) if bm == 16 else KernelConfig(64, 64, 4, 4)
    return MoEConfig(bm, kc, kc)


def cache_dir(name: str = "fused_moe") -> Path:
    """Where the `name` kernels keep their tuned entries (MOETANDEM_CACHE_DIR overrides ~/.cache/moetandem)."""
    root = os.environ.get("MOETANDEM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moetandem") / name


def tuning_enabled() -> bool:
    return os.environ.get("MOETANDEM_FUSED_MOE_TUNE", "1") != "0"


def cache_key(fmt: str, dtype: str, n_slots: int, hidden: int, inter: int, top_k: int, tokens: int,
              groups: tuple[int, int] = (1, 1)) -> str:
    """fmt: the experts' format (kernels/quant.py); dtype: the GEMMs' input dtype; groups: the scale groups of
    w13 and w2 (they decide how a tile is scaled, so they are part of a quantized format's key)."""
    g = "" if fmt == "bf16" else f",G={groups[0]}/{groups[1]}"
    return f"{fmt}:{dtype},N={n_slots},H={hidden},I={inter},k={top_k},T={t_bucket(tokens)}{g}"


class ConfigCache(Generic[C]):
    """One JSON file per GPU name under cache_dir(name): {key: config}. Loaded on first use, rewritten atomically on
    each new entry; `decode` turns a stored entry back into a config (default: the fused MoE's MoEConfig)."""

    def __init__(self, name: str = "fused_moe", decode: Callable[[dict], Any] = MoEConfig.from_json) -> None:
        self._name, self._decode = name, decode
        self._files: dict[Path, dict[str, C]] = {}
        self._lock = threading.Lock()

    def _path(self, gpu: str) -> Path:
        return cache_dir(self._name) / ("".join(c if c.isalnum() else "_" for c in gpu) + ".json")

    def _load(self, path: Path) -> dict[str, C]:
        if path not in self._files:
            try:
                raw = json.loads(path.read_text())
                self._files[path] = {k: self._decode(v) for k, v in raw.items()}
            except (OSError, ValueError, KeyError, TypeError):
                self._files[path] = {}
        return self._files[path]

    def get(self, gpu: str, key: str) -> C | None:
        with self._lock:
            return self._load(self._path(gpu)).get(key)

    def remember(self, gpu: str, key: str, cfg: C) -> None:
        """Keep cfg for this process only (not written: an untuned fallback must not outlive the reason for it)."""
        with self._lock:
            self._load(self._path(gpu))[key] = cfg

    def put(self, gpu: str, key: str, cfg: C) -> None:
        with self._lock:
            path = self._path(gpu)
            entries = self._load(path)
            entries[key] = cfg
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({k: v.to_json() for k, v in sorted(entries.items())}, indent=1))
                tmp.replace(path)
            except OSError:  # a read-only home still gets the tuned config for this process
                pass


CACHE: ConfigCache[MoEConfig] = ConfigCache()


def search(block_ms: list[int], prepare: Callable[[int], P], up: Callable[[P, KernelConfig], None],
           down: Callable[[P, KernelConfig], None], timer: Callable[[Callable[[], None]], float],
           candidates: tuple[KernelConfig, ...] = CANDIDATES) -> MoEConfig | None:
    """Each BLOCK_M: the fastest gate+up and the fastest down config of `candidates`; keep the BLOCK_M with the
    least total.
    None when the GPU has no memory left to time them (the timer's L2-flush buffer under a tight --gpu-memory cap):
    the caller runs the default config untuned rather than fail."""
    best: tuple[float, MoEConfig] | None = None
    for bm in block_ms:
        plan = prepare(bm)
        picked = []
        for launch in (up, down):
            times = []
            last: Exception | None = None
            for kc in candidates:
                try:
                    times.append((timer(lambda: launch(plan, kc)), kc))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile: not a candidate here
                    last = e
            if not times:
                if isinstance(last, torch.OutOfMemoryError):
                    return None
                raise RuntimeError("fused_moe: no kernel configuration ran on this device") from last
            t, kc = min(times)
            launch(plan, kc)  # leave valid outputs (the down search reads the intermediate)
            picked.append((t, kc))
        total = picked[0][0] + picked[1][0]
        if best is None or total < best[0]:
            best = (total, MoEConfig(bm, picked[0][1], picked[1][1]))
    assert best is not None
    return best[1]
