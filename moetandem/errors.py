"""Exceptions a user can hit. The CLI prints their message on one line and exits non-zero."""


class MoetandemError(Exception):
    """Base class: every error the user can act on."""


class CheckpointError(MoetandemError):
    """The checkpoint directory is missing, incomplete or corrupt."""


class UnsupportedModelError(MoetandemError):
    """config.json names an architecture moetandem does not implement."""


class ContextLengthError(MoetandemError):
    """Prompt plus requested tokens do not fit in the model's context."""


class InvalidRequestError(MoetandemError):
    """A generation argument is out of range (empty prompt, bad temperature, ...)."""


class CalibrationError(MoetandemError):
    """A calibration product (e.g. an activation codec) is missing, unreadable or made for another checkpoint."""


class CloudError(MoetandemError):
    """Split mode: the cloud cannot be reached, refused this end device, or failed while serving it."""
