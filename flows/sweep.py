"""The sweep flow: merge a grid of settings, reusing every cached decomposition, and summarise."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.merge import run_merge
from flows.parameters import config_parameter, hold_storage_options, redacted
from swudi.config.grid import parse_grid, point_configs, point_label, sweep_root
from swudi.config.merge_config import MergeConfig
from swudi.publish.publish_model import read_report
from swudi.storage.filesystem import join_url, write_bytes_atomic

SWEEP_FILE = "sweep.json"


@flow(name="swudi-sweep", validate_parameters=False)
def sweep(config: dict[str, Any], grid: list[str], storage_options_ref: str | None = None) -> dict[str, Any]:
    """Merge every grid point (a subflow each) and write ``OUTPUT/sweeps/<id>/sweep.json``.

    Each point records its settings, version URL, data-free diagnostics, user evaluations and
    timings; ``swudi report`` turns the file into plots and tables.
    """
    cfg = config_parameter(config, storage_options_ref)
    parsed = parse_grid(grid)
    points = point_configs(cfg, parsed)  # every point validated before the first merge
    rows = []
    for point, point_cfg in points:
        result = run_merge(point_cfg)
        report = read_report(point_cfg.output, result["version"], point_cfg.storage_options)
        rows.append(
            {
                "label": point_label(point),
                "point": point,
                "method": point_cfg.method,
                "params": point_cfg.params,
                "scale": point_cfg.scale,
                "version": result["version"],
                "url": result["url"],
                "flow_run_id": result["flow_run_id"],
                "task_runs": result["task_runs"],
                "computed": result["computed"],
                "decompositions_computed": result.get("decompositions_computed", 0),
                "seconds": result["seconds"],
                "diagnostics": report.get("diagnostics", {}),
                "evaluations": report.get("evaluations", {}),
            }
        )
    root = sweep_root(cfg, parsed)
    url = join_url(root, SWEEP_FILE)
    summary = {
        "grid": [[k, v] for k, v in parsed],
        "base_config": redacted(cfg),
        "points": rows,
        "url": url,
    }
    write_bytes_atomic(url, (json.dumps(summary, indent=2, default=str) + "\n").encode(), cfg.storage_options)
    create_table_artifact(
        [
            {
                "point": r["label"],
                "version": r["version"],
                "mean_interference_vs_sum": r["diagnostics"].get("mean_interference_vs_sum"),
                "mean_rank": r["diagnostics"].get("mean_rank"),
                "seconds": r["seconds"],
            }
            for r in rows
        ],
        key="swudi-sweep",
        description=f"sweep over {[k for k, _ in parsed]}",
    )
    return summary


def run_sweep(config: MergeConfig, grid: Sequence[str]) -> dict[str, Any]:
    """Run the sweep flow (points run one after another; each point's layers in parallel)."""
    with hold_storage_options(config) as (parameter, ref):
        return sweep(parameter, list(grid), ref)
