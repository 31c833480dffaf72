"""A Hugging Face checkpoint directory: config, safetensors shards (mmap'd), tokenizer."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moetandem.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """Read-only view of a checkpoint directory. Tensors are read one at a time from
    memory-mapped safetensors files, so the checkpoint is never copied whole into RAM."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"model directory not found: {self.path}")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.path} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        self.weight_map = self._weight_map()
        self._handles: dict[Path, Any] = {}
        self._keys: dict[Path, set[str]] = {}
        for shard in sorted(set(self.weight_map.values())) or [self.path / SINGLE_FILE]:
            self._open(shard)
        missing = [n for n, s in self.weight_map.items() if n not in self._keys[s]]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensors listed in {INDEX_FILE} are absent from their shard "
                f"(first: {missing[0]}); the checkpoint is incomplete, download it again")

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is malformed ({e})") from None
            return {name: self.path / shard for name, shard in wm.items()}
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {}  # filled in _open from the file's own header
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise CheckpointError(f"{self.path} holds PyTorch pickle weights; moetandem reads safetensors only "
                                  "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _open(self, shard: Path) -> None:
        if not shard.is_file():
            raise CheckpointError(f"shard {shard.name} is missing from {self.path}; download it again")
        try:
            handle = safe_open(str(shard), framework="pt")
            keys = set(handle.keys())
        except Exception as e:  # safetensors raises its own error type for bad headers/sizes
            raise CheckpointError(f"shard {shard.name} is corrupt or truncated ({e}); download it again") from None
        self._handles[shard] = handle
        self._keys[shard] = keys
        if not (self.path / INDEX_FILE).is_file():
            self.weight_map = {k: shard for k in keys}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self._shard(name)].get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (a copy out of the mmap)."""
        try:
            return self._handles[self._shard(name)].get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} ({e}); the shard may be truncated") from None

    def slice(self, name: str, index: int) -> torch.Tensor:
        """Read row `index` of a stacked tensor (fused expert layout) without reading the rest."""
        return self._handles[self._shard(name)].get_slice(name)[index]

    def _shard(self, name: str) -> Path:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.path}") from None

    def fingerprint(self) -> str:
        """Stable id of this checkpoint (config + shard headers), for keying calibration files."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for shard in sorted(self._handles):
            h.update(shard.name.encode())
            h.update(str(shard.stat().st_size).encode())
        return h.hexdigest()[:16]

    def tokenizer(self) -> Any | None:
        """transformers AutoTokenizer for this directory, or None when it ships no tokenizer."""
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:
            raise CheckpointError(f"cannot load the tokenizer in {self.path}: {e}") from None
