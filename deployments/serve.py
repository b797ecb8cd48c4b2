"""Serve the refresh flow as a scheduled Prefect deployment from this process (no work pool).

``swudi serve CONFIG --cron "0 3 * * *"`` calls :func:`serve_refresh`: it registers (or updates)
the deployment ``swudi-refresh/<name>`` on the Prefect API with a cron schedule, the config path
as parameter and a deployment concurrency limit of one run (later runs queue), then executes its
runs until stopped (Ctrl-C / SIGTERM; the schedule is paused on shutdown). Schedules need a Prefect
server with its scheduler (``prefect server start``, or Prefect Cloud): set ``PREFECT_API_URL``.
For workers in a work pool, use ``deployments/prefect.yaml`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.refresh import REFRESH_WAIT_S, refresh

DEFAULT_CRON = "0 3 * * *"
DEFAULT_NAME = "nightly"


def refresh_deployment(
    config_path: str | Path,
    cron: str | None = DEFAULT_CRON,
    name: str = DEFAULT_NAME,
    overrides: Sequence[str] = (),
    timezone: str | None = None,
    collision: Literal["enqueue", "cancel_new"] = "enqueue",
    wait_s: float = REFRESH_WAIT_S,
    tags: Sequence[str] = ("swudi",),
) -> RunnerDeployment:
    """The refresh deployment: ``refresh(config=<absolute config path>, overrides, wait_s)`` on
    ``cron`` (None: no schedule, runs start by hand or by ``run_deployment``), at most one run at a
    time; a run that would overlap waits for the slot (``enqueue``) or is cancelled (``cancel_new``).

    The entrypoint is the module path ``flows.refresh.refresh``, so runs work from any directory
    where swudi is installed. A local config path is made absolute here: it must exist at that
    path wherever the runs execute.
    """
    path = str(config_path)
    if "://" not in path:
        path = str(Path(path).expanduser().resolve())
    parameters: dict[str, Any] = {"config": path, "overrides": list(overrides), "wait_s": wait_s}
    strategy = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE, "cancel_new": ConcurrencyLimitStrategy.CANCEL_NEW}[
        collision
    ]
    # prefect's async_dispatch types this call as RunnerDeployment | Coroutine; from sync code it is the former
    return refresh.to_deployment(  # type: ignore[return-value]
        name=name,
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        description=f"Re-merge {path} when an input or a setting changed; otherwise do nothing.",
        tags=list(tags),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_refresh(
    config_path: str | Path,
    cron: str | None = DEFAULT_CRON,
    name: str = DEFAULT_NAME,
    overrides: Sequence[str] = (),
    timezone: str | None = None,
    collision: Literal["enqueue", "cancel_new"] = "enqueue",
    wait_s: float = REFRESH_WAIT_S,
) -> None:
    """Register :func:`refresh_deployment` and execute its runs here, one at a time, until stopped."""
    deployment = refresh_deployment(config_path, cron, name, overrides, timezone, collision, wait_s)
    serve(deployment, limit=1)
