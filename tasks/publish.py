"""Publish the merged model as a new version and move the `latest` pointer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from swudi.config.merge_config import MergeConfig
from swudi.pipeline.plan import MergePlan
from swudi.pipeline.records import MergedRecord
from swudi.publish.hub import push_version
from swudi.publish.publish_model import PublishResult, publish_merged_model
from swudi.publish.versions import REPORT_NAME
from swudi.storage.filesystem import join_url
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
    tuning: Mapping[str, Any] | None = None,
) -> PublishResult:
    """Write the version folder (shards, config files, evaluations, report), then the pointer
    (after the publish gate, if any: a refused version raises :class:`~swudi.errors.GateError`)."""
    published = publish_merged_model(config, plan, merged, diagnostics, timings, io, tuning)
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
    report_url = join_url(published["url"], REPORT_NAME)
    create_link_artifact(
        report_url,
        link_text=f"merge report of version {published['version']}",
        key="swudi-merge-report",
        description=f"merge_report.json of swudi version {published['version']} ({config.method})",
    )
    return published


@task(
    name="push-to-hub",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=30,
)
def push_to_hub(config: MergeConfig, published: PublishResult) -> str:
    """Upload the published version to the Hub repository of ``config.push_to_hub`` (a link artifact
    names the commit); the published version stays as it is if this fails."""
    target = config.push_to_hub
    if target is None:
        raise ValueError("push_to_hub is not configured")
    url = push_version(published["url"], published["version"], target, config.storage_options)
    create_link_artifact(
        url,
        link_text=f"{target.repo_id}@{target.revision}: version {published['version']}",
        key="swudi-hub-commit",
        description=f"Hub commit of swudi version {published['version']}",
    )
    return url
