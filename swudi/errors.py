"""Exceptions raised by swudi.

Every error names the file, tensor or key at fault and, where possible, what to do about it.
"""

from __future__ import annotations

import errno
from typing import Any


class SwudiError(Exception):
    """Base class of all swudi errors."""


class InputError(SwudiError, ValueError):
    """Input values that cannot be merged: non-finite values, mismatched shapes, no experts."""


class CheckpointError(SwudiError):
    """A checkpoint that cannot be read safely (bad layout, corrupt header, pickle format...)."""


class CheckpointNotFoundError(CheckpointError):
    """Nothing is stored at a checkpoint's (or artefact's) location: no file, no index, an empty folder.

    Told apart from a damaged checkpoint by its type, never by its message."""


class CheckpointMismatchError(CheckpointError):
    """Base and experts do not fit together (missing tensors, different shapes)."""

    problems: list[str]  # one line per mismatch (set by validate_checkpoints)


class ConfigError(SwudiError, ValueError):
    """A merge configuration that is invalid (unknown key, unknown method, bad value)."""


class PublishError(SwudiError):
    """Publishing a merged model failed or the output location is in an unexpected state."""


class GateError(PublishError):
    """The publish gate refused a version: its objective missed a bound (``latest`` did not move).

    The message is one line naming the metric, its value and the bound; the CLI exits with 3."""


#: errno values of storage that will not take the write however often it is tried.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class DamagedFileError(InputError):
    """A JSON or YAML file that swudi wrote (work folder, output) or reads back is damaged:
    truncated, not UTF-8, not valid JSON/YAML, or of the wrong shape. The message names the file."""


def parse_json(raw: bytes | str, where: str, expect: type = dict) -> Any:
    """``json.loads(raw)``; a :class:`DamagedFileError` naming ``where`` when it is not valid JSON
    (truncated, not UTF-8) or not of type ``expect``."""
    import json

    try:
        doc = json.loads(raw)
    except RecursionError:
        raise DamagedFileError(f"{where} is damaged: JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DamagedFileError(
            f"{where} is damaged: not valid JSON ({' '.join(str(error).split())[:160]}); restore or remove it"
        ) from None
    if not isinstance(doc, expect):
        raise DamagedFileError(f"{where} is damaged: expected a JSON {expect.__name__}, got {type(doc).__name__}")
    return doc


def is_input_error(exc: BaseException) -> bool:
    """True for an error that the same inputs would raise again: a retry cannot help.

    :class:`InputError` and :class:`ConfigError`; a :class:`CheckpointError` raised by swudi's own
    checks (no underlying cause) or caused by such an error; access denied; a full or read-only
    disk. A connection reset, a timeout or an S3 5xx is a fault and may be retried.
    """
    if isinstance(exc, (InputError, ConfigError, GateError)):
        return True
    if isinstance(exc, PermissionError):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL_OR_READ_ONLY:
        return True
    if isinstance(exc, CheckpointError):
        cause = exc.__cause__
        return cause is None or is_input_error(cause)
    return False
