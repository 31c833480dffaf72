"""Files shipped inside the package; today the small trained demo MoE (assets/demo-moe/)."""
from __future__ import annotations

from pathlib import Path

from moetandem.errors import CheckpointError

#: where the demo checkpoint lives in an installed or source tree
DEMO_DIR = Path(__file__).resolve().parent / "demo-moe"


def demo_model_path() -> Path:
    """The shipped demo checkpoint directory; CheckpointError when this install lacks it."""
    if not (DEMO_DIR / "config.json").is_file():
        raise CheckpointError(f"the demo model is not shipped in this install (expected {DEMO_DIR}); "
                              "pass --model PATH to a Hugging Face MoE checkpoint directory")
    return DEMO_DIR
