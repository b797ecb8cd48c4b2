"""Credentials in URLs: found (to refuse a config) and masked (wherever a URL is written).

A URL can carry a secret in two places:

- its user information, ``scheme://USER:PASSWORD@host/...`` (also ``s3://KEY:SECRET@bucket``);
- its query string, as a signed or tokenised URL does: ``?X-Amz-Signature=...``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure SAS ``sig=``,
  ``token=``, ``access_token=``, ``api_key=``, ``password=``, ``secret=``...

:func:`url_secret` says which of them a text holds (the config refuses it: a secret belongs in
``storage_options`` as a reference, :mod:`swudi.storage.secrets`); :func:`mask_credentials` replaces
them by ``***`` in any text (error messages, log records, report and card fields). It is the one
redaction function of swudi; everything written that may hold a URL goes through it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = ["mask_credentials", "mask_in", "url_secret", "install_log_redaction"]

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/\s@]*@)")
#: Query parameters whose value is a credential (lower case; ``x-amz-``/``x-goog-`` signing too).
SECRET_PARAMS = frozenset(
    {
        "sig",
        "signature",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "auth",
        "authorization",
        "api_key",
        "apikey",
        "key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
    }
)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#\s'\"`<>)\]]*)")


def _is_secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAMS or lowered.startswith(("x-amz-", "x-goog-"))


def _userinfo_has_secret(info: str) -> bool:
    """``user:password@`` or ``token@`` (a bare user name of a URL is a credential for http(s) too)."""
    return info != "@" and info != "***@"


def url_secret(text: str) -> str | None:
    """What credential ``text`` holds in a URL: ``"user:password@"``, ``"query parameter 'sig'"``,
    or None. The value itself is never part of the answer."""
    for match in _USERINFO.finditer(text):
        if _userinfo_has_secret(match["info"]):
            return "user:password@"
    if "://" in text or text.startswith("?"):
        for match in _QUERY_PARAM.finditer(text):
            if _is_secret_param(match["name"]) and match["value"] and match["value"] != "***":
                return f"query parameter {match['name']!r}"
    return None


def mask_credentials(text: str) -> str:
    """``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``; ``...?sig=abc&x=1`` -> ``...?sig=***&x=1``.

    Any scheme; every URL in ``text``; non-secret query parameters are kept.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@" if _userinfo_has_secret(m["info"]) else m[0], text)
    if "=" not in text:
        return text
    return _QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['name']}=***" if _is_secret_param(m["name"]) and m["value"] else m[0], text
    )


def mask_in(value: Any) -> Any:
    """:func:`mask_credentials` applied to every string of a JSON-like value (dicts, lists)."""
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, dict):
        return {key: mask_in(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_in(item) for item in value]
    return value


def _redact_record(record: logging.LogRecord) -> None:
    """Mask credentials in a record's message, formatting its arguments first when needed."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is left to the handler to report
        return
    masked = mask_credentials(message)
    if masked != message:
        record.msg, record.args = masked, None


_INSTALLED: list[bool] = []
_BUSY = threading.local()


def install_log_redaction() -> None:
    """Mask credentials in every log record this process makes, from any logger (swudi, Prefect,
    botocore), before any handler (console, Prefect's API handler that stores logs) sees it.
    Idempotent."""
    if _INSTALLED:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not getattr(_BUSY, "on", False):  # a record made while formatting one is left as it is
            _BUSY.on = True
            try:
                _redact_record(record)
            finally:
                _BUSY.on = False
        return record

    logging.setLogRecordFactory(factory)
    _INSTALLED.append(True)
