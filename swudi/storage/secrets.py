"""Secrets in storage options by reference, resolved only when a filesystem is built.

A storage option value may name where its secret lives instead of holding it:

    storage_options:
      key: {from_env: MINIO_KEY}                 # an environment variable of the process
      secret: {from_prefect_secret: minio-secret}  # a Prefect Secret block (by name)

The config, its copies (flow parameters, Dask task arguments, ``sweep.json``, reports) and every
log then hold the reference only; the value exists in the memory of the process that opens the
store, for as long as the filesystem object lives. References may appear at any depth (e.g.
inside ``client_kwargs``). Prefect Secret blocks are read once per process and kept in memory.

A missing variable or block is a :class:`~swudi.errors.ConfigError` naming the reference, never
the value. Credentials that need no configuration at all (``AWS_*`` environment variables,
``profile:``, instance roles) remain the first choice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from swudi.errors import ConfigError

__all__ = ["FROM_ENV", "FROM_PREFECT_SECRET", "is_secret_ref", "resolve_secret_refs"]

FROM_ENV = "from_env"
FROM_PREFECT_SECRET = "from_prefect_secret"
_KINDS = (FROM_ENV, FROM_PREFECT_SECRET)
_BLOCKS: dict[str, str] = {}
_BLOCKS_LOCK = threading.Lock()


def is_secret_ref(value: object) -> bool:
    """True for ``{"from_env": NAME}`` or ``{"from_prefect_secret": NAME}``."""
    return (
        isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in _KINDS and isinstance(_name(value), str)
    )


def _name(ref: Mapping[str, Any]) -> Any:
    return next(iter(ref.values()))


def _resolve_one(ref: Mapping[str, Any], where: str) -> str:
    kind, name = next(iter(ref.items()))
    if kind == FROM_ENV:
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"storage_options.{where}: environment variable {name} is not set")
        return value
    with _BLOCKS_LOCK:
        if name not in _BLOCKS:
            _BLOCKS[name] = _load_prefect_secret(name, where)
        return _BLOCKS[name]


def _load_prefect_secret(name: str, where: str) -> str:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()  # type: ignore[union-attr]
    except Exception as error:  # noqa: BLE001 - any failure: one line naming the block, not a value
        raise ConfigError(
            f"storage_options.{where}: Prefect Secret block {name!r} cannot be read ({type(error).__name__})"
        ) from None
    return str(value)


def resolve_secret_refs(options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of ``options`` with every secret reference replaced by its value."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{where}.{key}" if where else str(key)
        if is_secret_ref(value):
            out[key] = _resolve_one(value, path)
        elif isinstance(value, Mapping):
            out[key] = resolve_secret_refs(value, path)
        else:
            out[key] = value
    return out
