"""Flow parameters without credentials.

Prefect stores every flow run's parameters in its database. A merge config's ``storage_options``
may hold keys and secrets, so flows started from this process get the config with empty storage
options plus a reference to the real ones, which stay in this process's memory
(:func:`hold_storage_options`); the flow takes them back (:func:`config_parameter`). Task
arguments are not stored by Prefect (they only travel to the workers, e.g. Dask's).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from swudi.checkpoint.retry import RETRY_KEY
from swudi.checkpoint.secrets import is_secret_ref
from swudi.config import MergeConfig, config_from_mapping
from swudi.errors import ConfigError

_HELD: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def hold_storage_options(config: MergeConfig) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(the config as a mapping with empty ``storage_options``, a reference to the held options)."""
    data = config.model_dump()
    options = data.pop("storage_options")
    data["storage_options"] = {}  # the retry policy is rebuilt from ``storage_retry`` on validation
    options.pop(RETRY_KEY, None)
    if not options:
        yield data, None
        return
    ref = uuid.uuid4().hex
    _HELD[ref] = options
    try:
        yield data, ref
    finally:
        _HELD.pop(ref, None)


def config_parameter(config: dict[str, Any] | MergeConfig, storage_options_ref: str | None) -> MergeConfig:
    """The validated config of a flow run, with the storage options held under ``storage_options_ref``."""
    cfg = config if isinstance(config, MergeConfig) else config_from_mapping(config, "flow parameter")
    if storage_options_ref is None:
        return cfg
    try:
        options = {**_HELD[storage_options_ref], RETRY_KEY: cfg.storage_retry.model_dump()}
    except KeyError:
        raise ConfigError(
            "the storage options of this run were held by the process that started it; "
            "start the run with swudi (or run_merge) in the process that has them, or "
            "give credentials through the environment"
        ) from None
    return cfg.model_copy(update={"storage_options": options})


def redacted(config: MergeConfig) -> dict[str, Any]:
    """The config as a mapping for files and logs: storage option values replaced by a marker."""
    data = config.model_dump()
    data["storage_options"] = {
        key: value if key == RETRY_KEY or is_secret_ref(value) else "<redacted>"
        for key, value in config.storage_options.items()
    }
    return data
