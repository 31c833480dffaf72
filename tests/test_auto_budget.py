"""--expert-budget auto and the GPU's own free memory as the limit a load is checked against (no --gpu-memory).
CPU tests fake only the CUDA allocator's numbers (a CPU-only PyTorch has none)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moetandem
from moetandem import runtime
from moetandem.cli import build_parser
from moetandem.config import CommitteeConfig, parse_budget
from moetandem.errors import InvalidRequestError
from moetandem.experts.budget import total_expert_bytes
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.resident import ResidentProvider
from moetandem.gpu_memory import GIB, MemoryCap, auto_budget

PROMPT = [[5, 17, 42, 99, 3]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_checkpoint
    return build_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"))


class FreeMemory(MemoryCap):
    """The device limit of a GPU with `nbytes` free; nothing is 'in use' (a CPU run allocates nothing there)."""

    def in_use(self) -> int:
        return 0


def with_free_memory(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(runtime.MemoryCap, "of_device",
                        staticmethod(lambda device: FreeMemory(nbytes, torch.device("cuda", 0), given=False)))


def test_auto_is_a_budget_word_only_where_a_load_decides_it() -> None:
    assert parse_budget("auto", allow_auto=True) == "auto" == parse_budget(" AUTO ", allow_auto=True).lower()
    with pytest.raises(InvalidRequestError, match="decided when the model loads"):
        parse_budget("auto", 10**9)
    assert build_parser().parse_args(["generate", "--expert-budget", "auto", "--prompt", "x"]).expert_budget == "auto"
    assert CommitteeConfig(budget="auto").enabled


def test_auto_budget_rule() -> None:
    assert auto_budget(None, 10 * GIB) is None  # no device limit (the CPU): every expert
    assert auto_budget(20 * GIB, 10 * GIB) is None  # they fit in 80% of the room
    assert auto_budget(10 * GIB, 10 * GIB) == 8 * GIB  # they do not: a committee of 80% of the room
    assert auto_budget(-GIB, 10 * GIB) == 0


def test_auto_on_the_cpu_keeps_every_expert(ckpt: Path) -> None:
    want = moetandem.load(ckpt, device="cpu", progress=False).generate(PROMPT, max_new_tokens=8)[0].token_ids
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget="auto", policy="fetch")
    assert isinstance(eng.provider, ResidentProvider)  # the policy has no miss to act on
    assert eng.generate(PROMPT, max_new_tokens=8)[0].token_ids == want
    with pytest.raises(InvalidRequestError, match="start it with an expert budget"):
        eng.set_expert_budget("auto")


def test_auto_on_a_small_gpu_is_a_committee_of_what_fits(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts need more than 80% of the free memory: a committee of that much, with the other settings."""
    probe = moetandem.load(ckpt, device="cpu", progress=False)
    total = total_expert_bytes(probe.store, probe.dtype)
    with_free_memory(monkeypatch, int(total * 0.75))  # 80% of it: 60% of the experts
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget="auto", fidelity="exact")
    assert isinstance(eng.provider, CommitteeProvider) and eng.provider.policy.exact == "auto"
    assert eng.provider.budget_bytes == int(int(total * 0.75) * 0.8) and eng.provider.expert_bytes() <= int(total * 0.6)
    with pytest.raises(InvalidRequestError, match="decided when the model loads"):
        eng.set_expert_budget("auto")
    with_free_memory(monkeypatch, 2 * total)  # a GPU that holds them all
    assert isinstance(moetandem.load(ckpt, device="cpu", progress=False, expert_budget="auto").provider,
                      ResidentProvider)


def test_auto_refused_with_expert_parallel() -> None:
    with pytest.raises(InvalidRequestError, match="not available with --expert-parallel"):
        runtime.resolve_auto_budget(CommitteeConfig(budget="auto"), None, GIB, parallel=True)


def test_resident_experts_over_the_free_memory_fail_before_loading(ckpt: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No --gpu-memory: a GPU whose free memory cannot hold every expert refuses before loading them, naming the
    device and the fixes (auto among them), instead of a CUDA out-of-memory traceback."""
    with_free_memory(monkeypatch, 64 << 10)  # 64 KiB free; the tiny olmoe's fp32 experts take more
    monkeypatch.setattr(runtime, "build_experts", lambda *a: pytest.fail("the experts were loaded"))
    with pytest.raises(InvalidRequestError) as e:
        moetandem.load(ckpt, device="cpu", dtype="float32", progress=False)
    msg = str(e.value)
    assert msg.startswith("cuda:0 has too little free memory for every routed expert resident (float32")
    assert "--expert-budget auto picks it" in msg and msg.endswith("or use a GPU with more free memory")
    assert "--gpu-memory" not in msg


def test_out_of_memory_without_a_cap_becomes_the_message(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_free_memory(monkeypatch, 64 * GIB)

    def allocate(*a: Any, **k: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime, "load_dense", allocate)
    with pytest.raises(InvalidRequestError, match="^cuda:0 has too little free memory for the non-expert weights"):
        moetandem.load(ckpt, device="cpu", progress=False)
