"""--gpu-memory GIB: parsing, validation, the CPU refusal, the cap set on the engine's device before any weight
loads, and a load that does not fit ending with one message (moetandem.gpu_memory). CPU tests fake only what a
CPU-only PyTorch cannot do (the CUDA allocator); the GPU tests (marked) run the real cap."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

import moetandem
from moetandem import gpu_memory, runtime
from moetandem.cli import build_parser, main
from moetandem.cli.flags import configs
from moetandem.config import ModelConfig
from moetandem.errors import InvalidRequestError
from moetandem.gpu_memory import GIB, MemoryCap

FIXES = ("--expert-budget", "--expert-format int8 or int4", "--expert-parallel")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_checkpoint
    return build_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"))


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "cloud"])
def test_every_loading_command_takes_the_flag(command: str, tmp_path: Path) -> None:
    extra = {"cloud": ["--token-file", str(tmp_path / "t")], "eval": ["--data", "x.txt"]}.get(command, [])
    ns = build_parser().parse_args([command, "--gpu-memory", "12.5", *extra])
    assert ns.gpu_memory == 12.5
    assert build_parser().parse_args([command, *extra]).gpu_memory is None


def test_configs_carry_the_cap_into_model_config(tmp_path: Path) -> None:
    ns = build_parser().parse_args(["generate", "--gpu-memory", "12", "--prompt", "x"])
    model, *_ = configs(ns, tmp_path)
    assert model.gpu_memory == 12.0


@pytest.mark.parametrize("bad", ["0", "-3", "nan", "inf", "twelve"])
def test_bad_values_are_usage_errors(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--gpu-memory", bad, "--prompt", "x"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_model_config_refuses_bad_caps(bad: Any) -> None:
    with pytest.raises(InvalidRequestError, match="positive number of GiB"):
        ModelConfig(Path("."), gpu_memory=bad)


def test_cpu_is_refused_before_loading(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(runtime, "load_dense", lambda *a: pytest.fail("weights loaded before the cap was checked"))
    assert main(["generate", "--model", str(ckpt), "--device", "cpu", "--gpu-memory", "4", "--prompt", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gpu-memory needs a CUDA device" in err and "--device cuda" in err
    with pytest.raises(InvalidRequestError, match="needs a CUDA device"):
        moetandem.load(ckpt, device="cpu", gpu_memory=4)
    # serve loads in the background: it refuses now, before listening, not as a failed load behind /health
    assert main(["serve", str(ckpt), "--device", "cpu", "--gpu-memory", "4", "--port", "0"]) == 2
    assert "--gpu-memory needs a CUDA device" in capsys.readouterr().err


def test_a_fractional_budget_stays_a_fraction_of_expert_bytes(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, use_graphs=False, expert_budget=0.5,
                              policy="fetch")
    plain = moetandem.load(ckpt, **kw).provider.budget_bytes
    with_cap(monkeypatch, 64 * GIB)
    assert moetandem.load(ckpt, gpu_memory=64, **kw).provider.budget_bytes == plain


class FakeCuda:
    """The three torch.cuda calls MemoryCap makes, on a pretend 80 GiB device."""

    def __init__(self) -> None:
        self.fractions: list[tuple[float, int]] = []

    def get_device_properties(self, index: int) -> Any:
        return type("Props", (), {"total_memory": 80 * GIB})()

    def set_per_process_memory_fraction(self, fraction: float, index: int) -> None:
        self.fractions.append((fraction, index))

    def current_device(self) -> int:
        return 0


def test_cap_sets_the_fraction_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCuda()
    for name in ("get_device_properties", "set_per_process_memory_fraction", "current_device"):
        monkeypatch.setattr(gpu_memory.torch.cuda, name, getattr(fake, name))
    cap = MemoryCap.apply(20, torch.device("cuda", 1))
    assert cap == MemoryCap(20 * GIB, torch.device("cuda", 1)) and fake.fractions == [(0.25, 1)]
    assert MemoryCap.apply(40, torch.device("cuda")).device == torch.device("cuda", 0)  # the current device
    with pytest.raises(InvalidRequestError, match="cuda:0 has only 80.0 GiB; choose a cap of at most 80"):
        MemoryCap.apply(96, torch.device("cuda"))
    assert MemoryCap.apply(None, torch.device("cpu")) is None and len(fake.fractions) == 2


class HeldCap(MemoryCap):
    """A cap whose 'in use' is a fixed number of bytes (a CPU run allocates nothing on a GPU)."""

    def in_use(self) -> int:
        return 1 << 20


def with_cap(monkeypatch: pytest.MonkeyPatch, nbytes: int, seen: list | None = None) -> None:
    def apply(gib: float | None, device: torch.device) -> MemoryCap:
        if seen is not None:
            seen.append((gib, device))
        return HeldCap(nbytes, device)
    monkeypatch.setattr(runtime.MemoryCap, "apply", staticmethod(apply))


def test_build_engine_caps_its_device_before_the_weights(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    with_cap(monkeypatch, 64 * GIB, seen)
    real = runtime.load_dense

    def load_dense(*a: Any) -> Any:
        assert seen, "weights loaded before the cap was set"
        return real(*a)

    monkeypatch.setattr(runtime, "load_dense", load_dense)
    engine = moetandem.load(ckpt, device="cpu", dtype="float32", progress=False, use_graphs=False, gpu_memory=64)
    assert seen == [(64, torch.device("cpu"))]
    assert engine.generate([[1, 2, 3]], max_new_tokens=2, stop_on_eos=False)[0].token_ids


def test_resident_experts_over_the_cap_fail_before_loading_them(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Every expert resident needs more than the cap: refused before they load, with a budget that fits."""
    with_cap(monkeypatch, (1 << 20) + (64 << 10))  # 64 KiB left; the tiny olmoe's fp32 experts take 144 KiB
    monkeypatch.setattr(runtime, "build_experts", lambda *a: pytest.fail("the experts were loaded"))
    with pytest.raises(InvalidRequestError) as e:
        moetandem.load(ckpt, device="cpu", dtype="float32", progress=False, gpu_memory=1)
    msg = str(e.value)
    assert msg.startswith("--gpu-memory 0.0010376 is too small for every routed expert resident (float32, 0.00 GiB)")
    assert all(f in msg for f in FIXES) and "about --expert-budget" not in msg  # 51 KiB rounds to 0 GiB: none named
    rc = main(["generate", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--gpu-memory", "1",
               "--prompt", "1"])
    err = capsys.readouterr().err.strip().rsplit("\r", 1)[-1]  # after the weights' progress bar
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("moetandem: error: --gpu-memory 0.0010376 is too small for every")


def test_a_suggested_budget_leaves_room_for_the_kv_cache() -> None:
    cap = HeldCap(12 * GIB, torch.device("cuda", 0))
    msg = str(cap.error("every routed expert resident (bf16, 57.00 GiB)", 2 * GIB, suggest_budget=True))
    assert msg.startswith("--gpu-memory 12 is too small for every routed expert resident (bf16, 57.00 GiB): 2.00 GiB "
                          "of the cap on cuda:0 already held, 10.00 GiB left.")
    assert "about --expert-budget 8GiB fits" in msg and all(f in msg for f in FIXES)
    ep = str(cap.error("this rank's share of the routed experts", 11 * GIB, parallel=True))
    assert "a larger --expert-parallel N" in ep and "--expert-budget" not in ep  # cloud ranks take no budget


def test_out_of_memory_while_loading_becomes_the_message(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.OutOfMemoryError raised where the experts are allocated (a committee's slots here) becomes one
    InvalidRequestError naming the cap, what was loading and the fixes."""
    with_cap(monkeypatch, 64 * GIB)
    from moetandem.experts import factory

    def allocate(*a: Any, **k: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(factory, "CommitteeProvider", allocate)
    with pytest.raises(InvalidRequestError) as e:
        moetandem.load(ckpt, device="cpu", dtype="float32", progress=False, gpu_memory=64, expert_budget=0.5,
                       policy="fetch")
    msg = str(e.value)
    assert msg.startswith("--gpu-memory 64 is too small for the expert committee (slots within --expert-budget")
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError) and "CUDA out of memory" not in msg
    monkeypatch.setattr(runtime, "load_dense", allocate)
    with pytest.raises(InvalidRequestError, match="^--gpu-memory 64 is too small for the non-expert weights: "):
        moetandem.load(ckpt, device="cpu", progress=False, gpu_memory=64)


# ---- on a GPU: the real cap (the allocator's fraction is reset after each test: it holds for the process)


@pytest.fixture
def big_experts(tmp_path: Path) -> Any:
    """An olmoe with ~300 MiB of bf16 experts (64 × 3 layers × 1.5 MiB) and tiny non-expert weights; yields the
    GiB already reserved on cuda:0, against which each cap is set."""
    from conftest import build_checkpoint
    path = build_checkpoint("olmoe", tmp_path / "m", num_experts=64, intermediate_size=4096)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    yield path, torch.cuda.memory_reserved(0) / GIB
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cap_that_fits_loads_and_one_too_small_says_so(big_experts: Any) -> None:
    path, held = big_experts
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, use_graphs=False,
                         gpu_memory=held + 1.0)
    assert eng.generate([[1, 2, 3]], max_new_tokens=4, stop_on_eos=False)[0].token_ids
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    with pytest.raises(InvalidRequestError, match="is too small for every routed expert resident"):
        moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, gpu_memory=held + 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_same_cap_with_a_budget_runs_under_it(big_experts: Any) -> None:
    path, held = big_experts
    cap = held + 0.25  # 256 MiB more: the ~300 MiB of experts do not fit, a 64 MiB committee does
    torch.cuda.reset_peak_memory_stats(0)
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, use_graphs=False, gpu_memory=cap,
                         expert_budget="64MiB", fidelity="exact")
    out = eng.generate([[1, 2, 3, 4]], max_new_tokens=16, stop_on_eos=False)[0].token_ids
    torch.cuda.synchronize()
    assert len(out) == 16 and eng.provider.expert_bytes() <= 64 << 20
    assert torch.cuda.max_memory_allocated(0) <= cap * GIB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_budget_fits_the_cap(big_experts: Any) -> None:
    """--expert-budget auto under a cap too small for every expert: a committee that runs under the cap; with room
    for them all, every expert resident."""
    path, held = big_experts
    cap = held + 0.25
    torch.cuda.reset_peak_memory_stats(0)
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, use_graphs=False, gpu_memory=cap,
                         expert_budget="auto", fidelity="exact")
    assert eng.provider.__class__.__name__ == "CommitteeProvider"
    assert len(eng.generate([[1, 2, 3, 4]], max_new_tokens=16, stop_on_eos=False)[0].token_ids) == 16
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(0) <= cap * GIB
    del eng
    gc.collect()
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, expert_budget="auto")
    assert eng.provider.__class__.__name__ == "ResidentProvider"
