"""Storage faults that outlived their retries, reported as one line (:class:`StorageFault`).

The retry layers (:mod:`swudi.storage.retry`) repeat a failed request with backoff; what still
fails reaches swudi as one of many exception types (botocore connection and timeout errors,
``ClientError`` with a 5xx or throttling code, aiohttp payload errors; s3fs translates some into
``OSError`` and keeps the original as its cause). :func:`storage_fault` recognises them anywhere
in an exception's chain, and :func:`storage_faults` turns them into a :class:`StorageFault` (a
:class:`~swudi.errors.SwudiError`, so the command line prints one line and exits with code 2).
Messages never hold credentials: they go through :func:`swudi.storage.redact.mask_credentials`.

Missing objects (``FileNotFoundError``) and refused access (``PermissionError``) are not faults:
retrying cannot help, and the input checks report them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from swudi.errors import SwudiError
from swudi.storage.redact import mask_credentials

__all__ = ["StorageFault", "storage_fault", "storage_faults", "mask_credentials"]

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "BadGateway",
    "GatewayTimeout",
    "500",
    "502",
    "503",
    "504",
}


class StorageFault(SwudiError):
    """A storage request failed after every retry (network, timeout, 5xx or throttling)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _kind(error: BaseException) -> str | None:
    """What kind of transport fault ``error`` is, or None."""
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError, SwudiError)):
        return None
    name = type(error).__name__
    module = type(error).__module__
    if module.startswith(("botocore", "aiobotocore")):
        response = getattr(error, "response", None) or {}
        code = str((response.get("Error") or {}).get("Code", ""))
        status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
        if code in _TRANSIENT_CODES or status.startswith("5"):
            return f"the store answered {code or status}"
        if "Timeout" in name:
            return "timed out"
        if "Connect" in name or "Connection" in name or "HTTPClientError" in name or "IncompleteRead" in name:
            return "connection failed"
        return None
    if module.startswith("aiohttp"):
        return "connection failed"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionError):
        return "connection failed"
    return None


def storage_fault(error: BaseException) -> StorageFault | None:
    """A one-line :class:`StorageFault` if ``error`` (or its cause) is a storage fault, else None."""
    for link in _chain(error):
        if isinstance(link, StorageFault):
            return link
        kind = _kind(link)
        if kind is not None:
            detail = " ".join(mask_credentials(str(link)).split())[:300]
            return StorageFault(f"storage fault: {kind} after every retry ({type(link).__name__}: {detail})")
    return None


@contextlib.contextmanager
def storage_faults() -> Iterator[None]:
    """Re-raise storage faults escaping the block as :class:`StorageFault` (other errors untouched)."""
    try:
        yield
    except Exception as error:
        fault = storage_fault(error)
        if fault is None or fault is error:
            raise
        raise fault from None
