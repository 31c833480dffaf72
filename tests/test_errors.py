"""Every documented user error, through the Python API: the right exception class, raised early, with a message
that says what to do."""
from __future__ import annotations

import moetandem
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from moetandem import (CheckpointError, ContextLengthError, Engine, InvalidRequestError, MoetandemError,
                       UnsupportedModelError)
from moetandem.checkpoint import INDEX_FILE, Checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_checkpoint
    return build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("errors") / "base")


@pytest.fixture(scope="module")
def engine(base: Path) -> Engine:
    return moetandem.load(base, device="cpu", dtype="float32", progress=False)


@pytest.fixture
def variant(base: Path, tmp_path: Path) -> Callable[[Callable[[Path], object]], Path]:
    """A copy of the base checkpoint, damaged by `mutate(dir)`."""
    def make(mutate: Callable[[Path], object]) -> Path:
        d = tmp_path / "ckpt"
        shutil.copytree(base, d)
        mutate(d)
        return d
    return make


def load(path: Path) -> Engine:
    return moetandem.load(path, device="cpu", dtype="float32", progress=False)


def a_shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[1]


def edit_json(file: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ checkpoint directory
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model directory not found"):
        load(tmp_path / "nope")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        load(tmp_path / "model.safetensors")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(tmp_path)


@pytest.mark.parametrize("text, why", [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_unreadable_config(variant, text: str, why: str) -> None:
    d = variant(lambda d: (d / "config.json").write_text(text))
    with pytest.raises(CheckpointError, match=why):
        load(d)


@pytest.mark.parametrize("model_type", ["llama"])
def test_unsupported_model_type(variant, model_type: str) -> None:
    d = variant(lambda d: edit_json(d / "config.json", lambda c: c.update(model_type=model_type)))
    with pytest.raises(UnsupportedModelError, match=f"unsupported model_type '{model_type}'.*qwen3_moe"):
        load(d)


def test_config_without_model_type(variant) -> None:
    d = variant(lambda d: edit_json(d / "config.json", lambda c: c.pop("model_type")))
    with pytest.raises(UnsupportedModelError, match="model_type"):
        load(d)


def test_config_missing_a_field(variant) -> None:
    d = variant(lambda d: edit_json(d / "config.json", lambda c: c.pop("num_experts_per_tok")))
    with pytest.raises(UnsupportedModelError, match="lacks 'num_experts_per_tok'"):
        load(d)


def test_config_disagrees_with_weights(variant) -> None:
    d = variant(lambda d: edit_json(d / "config.json", lambda c: c.update(hidden_size=128)))
    with pytest.raises(CheckpointError, match="config.json implies"):
        load(d)


# ----------------------------------------------------------------------------------------------------- shards
def garbage(d: Path) -> None:
    a_shard(d).write_bytes(os.urandom(a_shard(d).stat().st_size))


def overwrite_header(d: Path) -> None:
    data = bytearray(a_shard(d).read_bytes())
    data[8:40] = b"#" * 32  # JSON header bytes, length prefix intact
    a_shard(d).write_bytes(bytes(data))


def overwrite_length(d: Path) -> None:
    data = bytearray(a_shard(d).read_bytes())
    data[0:8] = b"\xff" * 8
    a_shard(d).write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [garbage, overwrite_header, overwrite_length])
def test_corrupt_shard(variant, damage: Callable[[Path], None]) -> None:
    d = variant(damage)
    with pytest.raises(CheckpointError, match=rf"shard {a_shard(d).name} is corrupt .*download it again"):
        load(d)


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 100], ids=["half", "1-byte", "header"])
def test_truncated_shard_fails_when_opened(variant, keep: Callable[[int], int]) -> None:
    """Data cut short (header intact, or the header itself cut): safetensors checks that the file covers every
    tensor, so the error comes from opening the checkpoint, before any tensor is read, not mid-generation."""
    def cut(d: Path) -> None:
        data = a_shard(d).read_bytes()
        a_shard(d).write_bytes(data[: keep(len(data))])
    d = variant(cut)
    with pytest.raises(CheckpointError, match=rf"shard {a_shard(d).name} is truncated: \d+ bytes on disk, expected"):
        Checkpoint(d)


def test_missing_shard(variant) -> None:
    gone: list[str] = []
    d = variant(lambda d: (gone.append(a_shard(d).name), a_shard(d).unlink()))
    with pytest.raises(CheckpointError, match=rf"shard {gone[0]} is missing from .*download it again"):
        load(d)


def test_index_lists_a_tensor_its_shard_lacks(variant) -> None:
    def add(d: Path) -> None:
        edit_json(d / INDEX_FILE, lambda j: j["weight_map"].update({"model.extra.weight": a_shard(d).name}))
    with pytest.raises(CheckpointError, match="absent from their shard.*model.extra.weight"):
        load(variant(add))


@pytest.mark.parametrize("text", ["nope", '{"weight_map": [1, 2]}', "{}"])
def test_malformed_index(variant, text: str) -> None:
    d = variant(lambda d: (d / INDEX_FILE).write_text(text))
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load(d)


@pytest.mark.parametrize("name, where", [("model.norm.weight", "weights are missing"),
                                         ("model.layers.1.mlp.experts.3.up_proj.weight", "expert weights of layer 1")])
def test_weight_missing_from_checkpoint(variant, name: str, where: str) -> None:
    d = variant(lambda d: edit_json(d / INDEX_FILE, lambda j: j["weight_map"].pop(name)))
    with pytest.raises(CheckpointError, match=where):
        load(d)


def test_no_weights(variant) -> None:
    def strip(d: Path) -> None:
        for f in d.glob("model*"):
            f.unlink()
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor"):
        load(variant(strip))


def test_pickle_weights_only(variant) -> None:
    def to_pickle(d: Path) -> None:
        for f in d.glob("model*"):
            f.unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load(variant(to_pickle))


def test_broken_tokenizer(variant) -> None:
    d = variant(lambda d: (d / "tokenizer.json").write_text("{broken"))
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load(d)


# ------------------------------------------------------------------------------------------- engine options
def test_bad_dtype(base: Path) -> None:
    with pytest.raises(MoetandemError, match="unknown dtype 'float8'"):
        moetandem.load(base, device="cpu", dtype="float8", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(base: Path) -> None:
    with pytest.raises(MoetandemError, match="no CUDA GPU"):
        moetandem.load(base, device="cuda", progress=False)


# ------------------------------------------------------------------------------------------------- requests
def test_prompt_longer_than_context(engine: Engine) -> None:
    limit = engine.args.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"prompt \\({limit + 1} tokens\\).*context of {limit} tokens"):
        engine.generate([[1] * (limit + 1)], max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="max_new_tokens \\(10\\)"):
        engine.generate([[1] * (limit - 5)], max_new_tokens=10)
    assert len(engine.generate([[1] * (limit - 2)], max_new_tokens=2)[0].token_ids) == 2  # exactly fits


@pytest.mark.parametrize("prompts, why", [([[]], "the prompt is empty"), ([], "no prompts given"),
                                          ("", "ships no tokenizer"), ("hello", "ships no tokenizer"),
                                          ([[1, 256]], "token id 256 is outside the vocabulary"),
                                          ([[-1]], "outside the vocabulary")])
def test_bad_prompt(engine: Engine, prompts: object, why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        engine.generate(prompts, max_new_tokens=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_p=float("nan")), dict(max_new_tokens=0)])
def test_bad_sampling_arguments(engine: Engine, kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        engine.generate([[1, 2, 3]], **{"max_new_tokens": 2, **kwargs})


def test_nan_temperature(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError):
        engine.generate([[1, 2, 3]], max_new_tokens=2, temperature=float("nan"))
