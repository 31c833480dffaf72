"""moetandem: run Mixture-of-Experts checkpoints on devices that cannot hold them."""
from moetandem.engine import Engine, Generation, GenerationStats
from moetandem.errors import (CheckpointError, ContextLengthError, InvalidRequestError, MoetandemError,
                              UnsupportedModelError)
from moetandem.experts.provider import ExpertProvider

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ContextLengthError", "Engine", "ExpertProvider", "Generation", "GenerationStats",
           "InvalidRequestError", "MoetandemError", "UnsupportedModelError"]
