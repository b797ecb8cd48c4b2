"""Publish the merged model as a new version and move the `latest` pointer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from swudi.config import MergeConfig
from swudi.plan import MergePlan
from swudi.publish_model import publish_merged_model
from swudi.steps import MergedRecord
from tasks.retry import retry_unless_input_error


@task(
    name="publish",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=10,
)
def publish_model(
    config: MergeConfig,
    plan: MergePlan,
    merged: Sequence[MergedRecord],
    diagnostics: Mapping[str, Any],
    timings: Mapping[str, Any] | None = None,
    io: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the version folder (shards, config files, evaluations, report), then the pointer."""
    published = publish_merged_model(config, plan, merged, diagnostics, timings, io)
    evaluations = published["report"].get("evaluations") or {}
    lines = [
        f"# swudi merge {published['version']}",
        "",
        f"Published at `{published['url']}` with `{config.method}` {config.params}.",
        "",
        f"This run read {published['io']['input_bytes']:,} bytes of the input checkpoints.",
    ]
    for evaluator, metrics in evaluations.items():
        lines += ["", f"## {evaluator}", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v:.4f} |" for t, values in metrics.items() for m, v in values.items()]
    create_markdown_artifact("\n".join(lines), key="swudi-publish", description="swudi merged model")
    return published
