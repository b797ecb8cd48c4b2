"""Storage options that may hold credentials: kept in this process's memory, never sent as parameters.

A merge config's ``storage_options`` go to fsspec. Some keys are credentials (``key``, ``secret``,
``token``, ``client_kwargs.aws_secret_access_key``...). Their values (not references such as
``{from_env: NAME}``, :mod:`swudi.storage.secrets`, which are public) must not reach Prefect's database
(flow parameters) nor travel with tasks to Dask workers in other processes. So:

- :func:`public_options` is the options without credentials (``endpoint_url``, ``profile``,
  ``client_kwargs.region_name``... stay): safe to store and to send;
- :func:`hold` keeps the full options in this process under a random reference;
- :func:`with_held_options` gives a task its full options when it runs in the process that holds
  them (the thread runner), and otherwise the public ones: a worker in another process (Dask) then
  takes its credentials from its own environment (``AWS_ACCESS_KEY_ID`` ..., ``AWS_PROFILE``, an
  instance role), as every other AWS client does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from swudi.storage.secrets import is_secret_ref

log = logging.getLogger(__name__)

#: Option names (at any depth) whose values are credentials. Compared in lower case.
SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "connection_string",
        "client_secret",
        "credential",
        "credentials",
    }
)

#: s3fs options (top level, or botocore's names in ``client_kwargs``) -> the variable botocore reads.
_S3_ENVIRONMENT = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}

_HELD: dict[str, dict[str, Any]] = {}
_Config = TypeVar("_Config", bound=BaseModel)


def public_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without credentials (recursively, in nested mappings such as ``client_kwargs``)."""
    public: dict[str, Any] = {}
    for name, value in options.items():
        if is_secret_ref(value):  # {from_env: NAME} / {from_prefect_secret: NAME}: a name, not a value
            public[name] = dict(value)
            continue
        if str(name).lower() in SECRET_KEYS:
            continue
        public[name] = public_options(value) if isinstance(value, Mapping) else value
    return public


def has_secrets(options: Mapping[str, Any]) -> bool:
    """True when ``options`` hold a credential (see :data:`SECRET_KEYS`)."""
    return public_options(options) != dict(options)


def worker_environment(options: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables that give a worker process *started by this process* (a local Dask
    cluster) the S3 credentials of ``options``: ``key`` / ``secret`` / ``token`` (or their botocore
    names in ``client_kwargs``) as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN``. Other credentials (GCS, Azure) are not mapped: such workers need their
    own."""
    env: dict[str, str] = {}
    for scope in (options.get("client_kwargs") or {}, options):
        if not isinstance(scope, Mapping):
            continue
        for name, variable in _S3_ENVIRONMENT.items():
            if scope.get(name) is not None:
                env[variable] = str(scope[name])
    return env


def hold(options: Mapping[str, Any]) -> str:
    """Keep ``options`` in this process's memory; return the reference to look them up with."""
    ref = uuid.uuid4().hex
    _HELD[ref] = dict(options)
    return ref


def release(ref: str | None) -> None:
    """Forget the options held under ``ref`` (no error if there are none)."""
    if ref is not None:
        _HELD.pop(ref, None)


def lookup(ref: str) -> dict[str, Any] | None:
    """The options held under ``ref`` in this process, or None (another process holds them)."""
    return _HELD.get(ref)


def without_secrets(config: _Config) -> _Config:
    """``config`` (a model with ``storage_options``) with only its public storage options."""
    options = getattr(config, "storage_options")  # noqa: B009 - any config model with this field
    return config.model_copy(update={"storage_options": public_options(options)})


def with_held_options(config: _Config, ref: str | None) -> _Config:
    """The config a task runs with: the held options when this process holds ``ref``, else
    ``config`` unchanged (public options; credentials from this process's environment)."""
    if ref is None:
        return config
    options = lookup(ref)
    if options is None:
        log.debug("storage options %s are held by another process: credentials from this environment", ref[:8])
        return config
    return config.model_copy(update={"storage_options": options})
