"""A Hugging Face checkpoint directory: config, safetensors shards (mmap'd), tokenizer."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from moetandem.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers


class Checkpoint:
    """Read-only view of a checkpoint directory. Tensors are read one at a time from
    memory-mapped safetensors files, so the checkpoint is never copied whole into RAM."""

    def __init__(self, path: str | Path, check_family: Callable[[Any], Any] | None = None) -> None:
        """check_family(model_type) runs right after config.json is read, so an unsupported architecture is
        reported before the weights are looked at."""
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"model directory not found: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file; pass the checkpoint directory that holds config.json")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.path} has no config.json; is it a Hugging Face checkpoint directory?")
        self.config: dict[str, Any] = _read_json(cfg_file)
        if check_family is not None:
            check_family(self.config.get("model_type"))
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
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{index} is malformed (no \"weight_map\" of tensor name -> shard file)")
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
        try:  # safetensors checks the header and that the file covers every tensor's bytes
            handle = safe_open(str(shard), framework="pt")
            keys = set(handle.keys())
        except OSError as e:
            raise CheckpointError(f"cannot read shard {shard}: {e.strerror or e}") from None
        except Exception as e:  # safetensors raises its own error type for bad headers/sizes
            raise CheckpointError(_shard_problem(shard, e)) from None
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
        try:
            return self._handles[self._shard(name)].get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read row {index} of tensor {name} ({e}); the shard may be corrupt") from None

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


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or CheckpointError saying what is wrong with it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is malformed: expected a JSON object, found {type(data).__name__}")
    return data


def _shard_problem(shard: Path, err: Exception) -> str:
    """Why safetensors refused `shard`: truncated (a plausible header says the file is longer) or corrupt."""
    size = shard.stat().st_size
    want, exact = 0, False
    try:
        with shard.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if 0 < n <= MAX_HEADER_BYTES:  # a garbage length prefix is far larger
                want = 8 + n  # the header alone
                if size >= want:
                    header = json.loads(f.read(n))
                    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                    want, exact = 8 + n + max(ends, default=0), True
    except Exception:
        want = 0
    if want > size:
        return (f"shard {shard.name} is truncated: {size} bytes on disk, expected {'' if exact else 'at least '}"
                f"{want}; the download was interrupted, download it again")
    return f"shard {shard.name} is corrupt ({err}); download it again"
