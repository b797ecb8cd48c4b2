"""Make sure a finished run reaches Prefect's run history before the process exits.

Prefect 3 records task runs from the events the client sends in the background. When the process
exits (and, without ``PREFECT_API_URL``, stops its embedded server) right after a flow returns,
events still queued are lost and the run's history misses task runs that did run. So, after a
flow: drain this process's event and log workers, then ask the API until it lists every task run
the flow reported (or a bounded wait runs out, with a warning).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from uuid import UUID

log = logging.getLogger(__name__)


def drain_background_workers() -> None:
    """Send every queued event and log line of this process to the API (blocking)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (EventsWorker.drain_all, APILogWorker.drain_all):
        try:
            result = drain()
            if inspect.isawaitable(result):
                asyncio.run(_await(result))
        except RuntimeError:  # the worker never started in this process
            continue


async def _await(awaitable: object) -> None:
    await awaitable  # type: ignore[misc]  # inspect.isawaitable narrowed it


async def count_task_runs(flow_run_id: str) -> int:
    """Task runs of a flow run that the API lists in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return sum(1 for run in runs if run.state is not None and run.state.is_final())


def wait_for_run_history(runs: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
    """Drain the background workers, then wait until each flow run in ``runs`` (id -> number of task
    runs it submitted) has that many final task runs recorded. Returns the counts found."""
    drain_background_workers()
    deadline = time.monotonic() + timeout_s
    found: dict[str, int] = {}
    for run_id, expected in runs.items():
        while True:
            found[run_id] = asyncio.run(count_task_runs(run_id))
            if found[run_id] >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if found[run_id] < expected:
            log.warning(
                "flow run %s: %d of %d task runs recorded by the API after %.0f s",
                run_id,
                found[run_id],
                expected,
                timeout_s,
            )
    return found
