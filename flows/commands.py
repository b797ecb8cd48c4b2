"""What the ``swudi`` command line runs on Prefect: the Prefect environment, and the flows it starts.

The command line (:mod:`swudi.cli`) reaches this module through one bridge
(:mod:`swudi.cli.flows_bridge`), so the library never imports Prefect. Importing this module
imports no Prefect either: :func:`prepare_prefect_environment` must set Prefect's defaults before
Prefect is first imported, so every flow is imported inside the function that runs it.

Without ``PREFECT_API_URL``, a Prefect server already running on this machine's default port
(``prefect server start``) is used; failing that, an embedded server (:mod:`flows.server`) lives
for the length of the command.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from swudi.config.merge_config import MergeConfig
from swudi.errors import SwudiError
from swudi.pipeline.results import MergeResult

__all__ = [
    "PREFECT_DEFAULTS",
    "LOCAL_PREFECT_API",
    "local_prefect_server",
    "prepare_prefect_environment",
    "ensure_prefect_api",
    "run_merge_and_settle",
    "run_sweep_and_settle",
    "run_refresh",
    "serve_refresh_deployment",
]

console = Console(stderr=True)

#: Defaults for Prefect on these machines (a cold ephemeral server needs ~15 s; no telemetry).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "swudi",
}

#: Where ``prefect server start`` listens by default.
LOCAL_PREFECT_API = "http://127.0.0.1:4200/api"


def local_prefect_server(api_url: str = LOCAL_PREFECT_API, timeout_s: float = 0.3) -> str | None:
    """``api_url`` when a Prefect server answers its health check there, else None (fast: loopback)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return api_url if response.read(16).strip() == b"true" else None
    except (OSError, ValueError):
        return None


def prepare_prefect_environment(local_api: str | None = None) -> None:
    """Apply :data:`PREFECT_DEFAULTS` where the user has not set them (before importing Prefect).

    Without ``PREFECT_API_URL``, a Prefect server already running on this machine's default port
    (``prefect server start``) is used instead of starting an embedded one for every command.
    ``SWUDI_LOCAL_PREFECT_API`` names another address to look at; set to an empty string, it
    turns the look-up off (always the embedded server).
    """
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if local_api is None:
        local_api = os.environ.get("SWUDI_LOCAL_PREFECT_API", LOCAL_PREFECT_API)
    if local_api and not os.environ.get("PREFECT_API_URL") and (found := local_prefect_server(local_api)):
        os.environ["PREFECT_API_URL"] = found
        console.print(f"using the Prefect server at {found} (runs are kept in its history)")


def ensure_prefect_api() -> None:
    """:func:`prepare_prefect_environment`, then, if no Prefect API is named or found, start an embedded
    server for this command (:mod:`flows.server`: bounded start-up, stopped with the command)."""
    prepare_prefect_environment()
    if not os.environ.get("PREFECT_API_URL") and not _prefect_api_in_settings():
        from flows.server import start_embedded_server

        console.print("starting an embedded Prefect server for this command (`prefect server start` avoids it)")
        start_embedded_server()


def _prefect_api_in_settings() -> bool:
    """True when Prefect is already imported in this process and its settings name an API (an
    in-process caller such as a test harness); never imports Prefect itself."""
    if "prefect.settings" not in sys.modules:
        return False
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def run_merge_and_settle(config: MergeConfig) -> MergeResult:
    """Run the merge flow, then wait until every task run it submitted is in the run history
    (:mod:`flows.history`), before the process exits."""
    ensure_prefect_api()
    from flows.history import wait_for_run_history
    from flows.merge import run_merge

    result = run_merge(config)
    wait_for_run_history({result["flow_run_id"]: result["task_runs"]})
    return result


def run_sweep_and_settle(config: MergeConfig, grid: list[str]) -> dict[str, Any]:
    """Run the sweep flow over ``grid`` (``key=v1,v2`` strings), then wait until every task run of
    every point is in the run history."""
    ensure_prefect_api()
    from flows.history import wait_for_run_history
    from flows.sweep import run_sweep

    result = run_sweep(config, grid)
    wait_for_run_history({p["flow_run_id"]: p["task_runs"] for p in result["points"]})
    return result


def run_tune_and_settle(
    config: MergeConfig, objective: str, grid: list[str], refine: int, minimize: bool
) -> dict[str, Any]:
    """Run the tune flow (:func:`flows.tune.run_tune`), then wait until every task run of the
    published winner's merge is in the run history."""
    ensure_prefect_api()
    from flows.history import wait_for_run_history
    from flows.tune import run_tune

    result = run_tune(config, objective, grid, refine, minimize)
    published = result["published"]
    wait_for_run_history({published["flow_run_id"]: published["task_runs"]})
    return result


def run_refresh(config: Path, overrides: Sequence[str], wait_s: float) -> dict[str, Any]:
    """Run the refresh flow on the YAML file ``config``; return once its merge's task runs (if it
    merged) are in the run history."""
    ensure_prefect_api()
    from flows.history import wait_for_run_history
    from flows.refresh import refresh

    result = refresh(str(config.resolve()), list(overrides), wait_s)
    merge_run = {result["merge_flow_run_id"]: result["merge_task_runs"]} if "merge_flow_run_id" in result else {}
    wait_for_run_history(merge_run)  # every task run reaches the run history before the process exits
    return result


def serve_refresh_deployment(
    config: Path,
    cron: str | None,
    name: str,
    overrides: Sequence[str],
    timezone: str | None,
    collision: Literal["enqueue", "cancel_new"],
    wait_s: float,
) -> None:
    """Serve the refresh flow as a scheduled deployment (:func:`deployments.serve.serve_refresh`)
    until stopped; raise :class:`SwudiError` when no Prefect server is named or found (an embedded
    server runs no schedules)."""
    prepare_prefect_environment()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SwudiError(
            "swudi serve needs a Prefect server (an embedded one runs no schedules): "
            "run `prefect server start` (found on 127.0.0.1:4200 by itself) or set PREFECT_API_URL"
        )
    from deployments.serve import serve_refresh

    serve_refresh(config, cron, name, list(overrides), timezone, collision, wait_s)
