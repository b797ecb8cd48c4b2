"""Cross-run caching of the heavy tasks.

Prefect's default cache policy includes the flow-run id, so a new run (or a re-run after a crash)
would recompute everything. The heavy tasks instead use the content keys of `swudi.steps` (input
fingerprints + the parameters the step depends on + the algorithm version) as cache keys, and keep
their result records in the work folder, beside the artefacts those records point to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect.context import TaskRunContext, get_run_context
from prefect.filesystems import RemoteFileSystem

from swudi.checkpoint import join_url
from swudi.checkpoint.fingerprint import digest
from swudi.config import MergeConfig

R = TypeVar("R")

RESULTS_FOLDER = "prefect-results"


def result_storage(config: MergeConfig) -> Path | RemoteFileSystem:
    """Where cached task records live: ``WORK/prefect-results`` (local path or remote fsspec URL).

    A remote folder becomes a saved ``RemoteFileSystem`` block (Prefect requires result storage to
    be known server-side, so that Dask workers can resolve it), named after the folder and the
    storage options. Its settings are the config's storage options: prefer credentials from the
    environment or a profile over keys in the config, as they are stored with the block.
    """
    url = join_url(config.resolved_work_dir, RESULTS_FOLDER)
    if "://" not in url and "::" not in url:
        return Path(url)
    settings = dict(config.storage_options)
    block = RemoteFileSystem(basepath=url, settings=settings)
    block.save(f"swudi-work-{digest(url, settings)[:16]}", overwrite=True)
    return block


def cache_key(step: str, key_fn: Callable[..., str], *arg_names: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` returning ``<step>-<key_fn(*parameters)>``."""

    def fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"{step}-{key_fn(*(parameters[name] for name in arg_names))}"

    fn.__name__ = f"{step}_cache_key"
    return fn


def stamp(record: R) -> R:
    """The record with ``computed_in`` set to the current flow run (cached copies keep the first)."""
    context = get_run_context()
    run_id = getattr(getattr(context, "task_run", None), "flow_run_id", None)
    return dataclasses.replace(record, computed_in=str(run_id or ""))
