"""The command line's one way into the Prefect flows (:mod:`flows.commands`).

The library never imports Prefect (docs/design.md): the commands that run flows call these
functions, and this is the only module under ``swudi/`` that imports from ``flows/``, always
inside a function, so that ``import swudi.cli`` (and ``swudi plan``, ``swudi methods``...) stays
free of Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from swudi.config.merge_config import MergeConfig

if TYPE_CHECKING:
    from swudi.pipeline.results import MergeResult

__all__ = [
    "run_merge_and_settle",
    "run_sweep_and_settle",
    "run_tune_and_settle",
    "run_refresh",
    "serve_refresh_deployment",
]


def run_merge_and_settle(config: MergeConfig) -> MergeResult:
    """:func:`flows.commands.run_merge_and_settle`: the merge flow."""
    from flows.commands import run_merge_and_settle as run

    return run(config)


def run_sweep_and_settle(config: MergeConfig, grid: list[str]) -> dict[str, Any]:
    """:func:`flows.commands.run_sweep_and_settle`: the sweep flow over ``grid``."""
    from flows.commands import run_sweep_and_settle as run

    return run(config, grid)


def run_tune_and_settle(
    config: MergeConfig, objective: str, grid: list[str], refine: int, minimize: bool
) -> dict[str, Any]:
    """:func:`flows.commands.run_tune_and_settle`: the tune flow; publishes the winner."""
    from flows.commands import run_tune_and_settle as run

    return run(config, objective, grid, refine, minimize)


def run_refresh(config: Path, overrides: Sequence[str], wait_s: float) -> dict[str, Any]:
    """:func:`flows.commands.run_refresh`: the refresh flow on the YAML file ``config``."""
    from flows.commands import run_refresh as run

    return run(config, overrides, wait_s)


def serve_refresh_deployment(
    config: Path,
    cron: str | None,
    name: str,
    overrides: Sequence[str],
    timezone: str | None,
    collision: Literal["enqueue", "cancel_new"],
    wait_s: float,
) -> None:
    """:func:`flows.commands.serve_refresh_deployment`: serve the scheduled refresh until stopped."""
    from flows.commands import serve_refresh_deployment as serve

    serve(config, cron, name, overrides, timezone, collision, wait_s)
