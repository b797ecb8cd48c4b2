"""Flow parameters without credentials.

Prefect stores every flow run's parameters in its database. A merge config's ``storage_options``
may hold keys and secrets, so flows started from this process get the config with its *public*
storage options (``endpoint_url``, ``profile``...: :func:`swudi.storage.held_options.public_options`) plus
a reference to the full ones, which stay in this process's memory (:func:`hold_storage_options`);
the flow takes them back (:func:`config_parameter`). Tasks get the same reference
(:func:`swudi.storage.held_options.with_held_options`): in this process they use the held options; a Dask
worker in another process gets the public options only and takes credentials from its own
environment, so no secret travels with a task either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from swudi.config.merge_config import MergeConfig, config_from_mapping
from swudi.errors import ConfigError
from swudi.storage import held_options
from swudi.storage.redact import mask_in
from swudi.storage.retry import RETRY_KEY
from swudi.storage.secrets import is_secret_ref


@contextlib.contextmanager
def hold_storage_options(config: MergeConfig) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(the config as a mapping with public ``storage_options`` only, a reference to the held
    options; None when they hold no credential)."""
    data = config.model_dump()
    options = data.pop("storage_options")
    public = {key: value for key, value in options.items() if key != RETRY_KEY}
    data["storage_options"] = held_options.public_options(public)  # retry policy: rebuilt on validation
    if not held_options.has_secrets(public):
        yield data, None
        return
    ref = held_options.hold(options)
    try:
        yield data, ref
    finally:
        held_options.release(ref)


def config_parameter(config: dict[str, Any] | MergeConfig, storage_options_ref: str | None) -> MergeConfig:
    """The validated config of a flow run, with the storage options held under ``storage_options_ref``."""
    cfg = config if isinstance(config, MergeConfig) else config_from_mapping(config, "flow parameter")
    if storage_options_ref is None:
        return cfg
    options = held_options.lookup(storage_options_ref)
    if options is None:
        raise ConfigError(
            "the storage options of this run were held by the process that started it; "
            "start the run with swudi (or run_merge) in the process that has them, or "
            "give credentials through the environment"
        )
    return cfg.model_copy(update={"storage_options": {**options, RETRY_KEY: cfg.storage_retry.model_dump()}})


def redacted(config: MergeConfig) -> dict[str, Any]:
    """The config as a mapping for files and logs: storage option values replaced by a marker,
    credentials in URLs masked."""
    data = mask_in(config.model_dump())
    data["storage_options"] = {
        key: value if key == RETRY_KEY or is_secret_ref(value) else "<redacted>"
        for key, value in config.storage_options.items()
    }
    return data
