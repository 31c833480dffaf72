"""Calibration products: written atomically, keyed by the checkpoint and a format version; stale or corrupt files
are never used silently (a clear error, or a rebuild that says so)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import moetandem
from conftest import build_checkpoint
from moetandem.checkpoint import Checkpoint
from moetandem.errors import CalibrationError, InvalidRequestError
from moetandem.experts.plan import Plan
from moetandem.products import read_product, write_product


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    return Checkpoint(build_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe")))


def test_write_is_atomic_and_keyed(ckpt: Checkpoint) -> None:
    path = write_product(ckpt, "p.safetensors", "thing", {"a": torch.ones(3)}, {"note": "x"})
    assert [p.name for p in path.parent.glob(".p.safetensors.*")] == []  # no temporary left behind
    tensors, meta = read_product(ckpt, path, "thing", "remake it")
    assert torch.equal(tensors["a"], torch.ones(3))
    assert meta["fingerprint"] == ckpt.fingerprint() and meta["version"] and meta["note"] == "x"
    with pytest.raises(CalibrationError, match="holds a thing, not a other"):
        read_product(ckpt, path, "other", "remake it")


def test_stale_and_corrupt_files_are_never_used_silently(ckpt: Checkpoint, tmp_path: Path, caplog) -> None:
    stale = tmp_path / "stale.safetensors"
    save_file({"a": torch.ones(1)}, str(stale), metadata={"fingerprint": "someone-else", "kind": "thing"})
    with pytest.raises(CalibrationError, match="made for checkpoint someone-else.*run `remake it`"):
        read_product(ckpt, stale, "thing", "remake it")
    with caplog.at_level(logging.WARNING, logger="moetandem"):
        assert read_product(ckpt, stale, "thing", "remake it", stale="none") is None
    assert "rebuilding" in caplog.text
    future = tmp_path / "future.safetensors"
    save_file({"a": torch.ones(1)}, str(future), metadata={"fingerprint": ckpt.fingerprint(), "kind": "thing",
                                                           "version": "99"})
    with pytest.raises(CalibrationError, match="format version 99"):
        read_product(ckpt, future, "thing", "remake it")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CalibrationError, match="corrupt or unreadable.*remake it"):
        read_product(ckpt, corrupt, "thing", "remake it")
    assert read_product(ckpt, tmp_path / "absent.safetensors", "thing", "remake it") is None


def test_stale_similarity_is_rebuilt_with_a_notice(ckpt: Checkpoint, caplog) -> None:
    from moetandem.experts.similarity import calibration_path
    path = calibration_path(ckpt)
    save_file({"similarity.0": torch.eye(2)}, str(path), metadata={"fingerprint": "old-weights"})
    with caplog.at_level(logging.WARNING, logger="moetandem"):
        eng = moetandem.load(ckpt.path, device="cpu", progress=False, expert_budget=0.5, fidelity="balanced")
    assert "made for checkpoint old-weights" in caplog.text
    sim = eng.provider.similarity
    assert sim is not None and all(s.shape == (eng.args.num_experts,) * 2 for s in sim.values())
    path.write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="corrupt"):
        moetandem.load(ckpt.path, device="cpu", progress=False, expert_budget=0.5, fidelity="balanced")
    path.unlink()


def test_plan_files_carry_a_version(tmp_path: Path) -> None:
    plan = Plan(1000, {0: 2}, 16, 0.9, 0.8)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert not list(tmp_path.glob(".plan.json.tmp"))
    text = (tmp_path / "plan.json").read_text().replace('"version": 1', '"version": 7')
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(InvalidRequestError, match="format version 7"):
        Plan.load(tmp_path / "plan.json")
