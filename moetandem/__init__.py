"""moetandem: run Mixture-of-Experts checkpoints on devices that cannot hold them."""
from __future__ import annotations

from typing import Any

from moetandem.errors import (CheckpointError, ContextLengthError, InvalidRequestError, MoetandemError,
                              UnsupportedModelError)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ContextLengthError", "Engine", "ExpertProvider", "Generation", "GenerationStats",
           "InvalidRequestError", "MoetandemError", "UnsupportedModelError", "build_engine", "load"]

_LAZY = {"Engine": "moetandem.engine", "Generation": "moetandem.engine", "GenerationStats": "moetandem.engine",
         "ExpertProvider": "moetandem.experts.provider", "build_engine": "moetandem.runtime",
         "load": "moetandem.runtime"}


def __getattr__(name: str) -> Any:
    """torch and the model code load on first use, so `moetandem --help` and flag errors answer at once."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moetandem' has no attribute {name!r}")
