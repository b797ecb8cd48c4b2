"""The merge flow behind a deployment: a config file path in, a published version out.

``merge`` (:mod:`flows.merge`) takes a config mapping and holds credentials in the process that
starts it; a deployment's run starts in a worker's process with only its stored parameters. So the
deployed flow takes the path of a YAML config (read where the run executes, credentials from that
environment or from the file) plus ``--set``-style overrides, and runs the merge as a subflow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.merge import run_merge
from swudi.config.merge_config import load_config


@flow(name="swudi-merge-config", log_prints=True, validate_parameters=False)
def merge_config(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Merge and publish what the YAML file ``config`` describes (``overrides``: ``key=value``).

    Returns the merge flow's result without the per-tensor records (version, url, counts, bytes
    read, time split). The published version is named in the run's log.
    """
    cfg = load_config(config, list(overrides or []))
    result = run_merge(cfg)
    get_run_logger().info(
        "published version %s at %s (%d steps computed, %d reused)",
        result["version"],
        result["url"],
        result["computed"],
        result["reused"],
    )
    return {k: v for k, v in result.items() if k != "records"}
