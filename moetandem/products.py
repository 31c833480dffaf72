"""Calibration products of a checkpoint (expert similarity, activation codecs, group gates): where they live,
written atomically, and read back only when they were made for this checkpoint by this format version.

Each file carries `fingerprint` (the checkpoint's), `kind` and `version` in its safetensors metadata. A file that
is missing reads as None; one made for another checkpoint or by another format version is stale; one that cannot
be parsed is corrupt. Stale and corrupt files are never used silently: `read_product` raises CalibrationError
with the command that remakes it, or (stale="none") returns None so the caller rebuilds it and says so."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetandem.checkpoint import Checkpoint
from moetandem.errors import CalibrationError

VERSION = "2"
log = logging.getLogger("moetandem")


def product_path(ckpt: Checkpoint, file: str) -> Path:
    """Next to the checkpoint, or in the user cache keyed by its fingerprint when the directory is read-only."""
    if os.access(ckpt.path, os.W_OK):
        return ckpt.path / file
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moetandem"
    return cache / f"{ckpt.fingerprint()}-{file}"


def write_product(ckpt: Checkpoint, file: str, kind: str, tensors: dict[str, torch.Tensor],
                  meta: dict[str, str] | None = None, path: Path | None = None) -> Path:
    """Write atomically (a temporary file in the same directory, then rename): a crash never leaves half a file."""
    path = path or product_path(ckpt, file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={**(meta or {}), "fingerprint": ckpt.fingerprint(), "kind": kind, "version": VERSION})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_product(ckpt: Checkpoint | None, path: Path, kind: str, remake: str, stale: str = "error",
                 fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a product file, or None when absent (or stale with stale="none"). remake: the
    command that makes it again, for the error message. fingerprint: check against this instead of ckpt's."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not safetensors, unreadable
        raise CalibrationError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e}); delete it and run "
                               f"`{remake}`") from None
    want = fingerprint if fingerprint is not None else (ckpt.fingerprint() if ckpt is not None else None)
    why = None
    if meta.get("kind", kind) != kind:
        why = f"holds a {meta.get('kind')}, not a {kind}"
    elif meta.get("version", "1") not in ("1", VERSION):
        why = f"was written by format version {meta.get('version')} (this moetandem reads {VERSION})"
    elif want is not None and meta.get("fingerprint") != want:
        why = f"was made for checkpoint {meta.get('fingerprint') or '?'}, not this one ({want})"
    if why is None:
        return tensors, meta
    if stale == "none":
        log.warning("%s %s; ignoring it and rebuilding", path, why)
        return None
    raise CalibrationError(f"{path} {why}; run `{remake}`")
