"""Data-free diagnostics of a merge (ranks, kept eigenvalue mass, WUDI interference per layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from swudi.pipeline.records import MergedRecord
from swudi.pipeline.summary import summarize_layers


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_merge(merged: Sequence[MergedRecord]) -> dict[str, Any]:
    """Summarise the per-layer diagnostics and show them as a Prefect table artifact."""
    diagnostics = summarize_layers(merged)
    rows = [
        {
            "layer": name,
            "rank": values["rank"],
            "kept_mass": values["kept_mass"],
            "interference_vs_sum": values["interference_vs_sum"],
        }
        for name, values in diagnostics["per_layer"].items()
    ]
    if rows:
        create_table_artifact(
            rows,
            key="swudi-layer-diagnostics",
            description="per-layer rank, kept eigenvalue mass and WUDI interference "
            "(L(theta) / L(sum of task vectors))",
        )
    return diagnostics
