"""Exceptions raised by swudi.

Every error names the file, tensor or key at fault and, where possible, what to do about it.
"""

from __future__ import annotations


class SwudiError(Exception):
    """Base class of all swudi errors."""


class InputError(SwudiError, ValueError):
    """Input values that cannot be merged: non-finite values, mismatched shapes, no experts."""


class CheckpointError(SwudiError):
    """A checkpoint that cannot be read safely (bad layout, corrupt header, pickle format...)."""


class CheckpointMismatchError(CheckpointError):
    """Base and experts do not fit together (missing tensors, different shapes)."""

    problems: list[str]  # one line per mismatch (set by validate_checkpoints)


class ConfigError(SwudiError, ValueError):
    """A merge configuration that is invalid (unknown key, unknown method, bad value)."""


class PublishError(SwudiError):
    """Publishing a merged model failed or the output location is in an unexpected state."""
