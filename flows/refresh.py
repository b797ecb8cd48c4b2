"""The refresh flow: re-merge when an input or a setting changed, otherwise do nothing.

Meant to run on a schedule (see ``deployments/``). One run:

1. reads the config (a mapping, or the path of a YAML file, read again at every run);
2. takes the output's *refresh lock* (``OUTPUT/.refresh/.lock``): refreshes of one output run one
   at a time; a second one waits, and usually then finds the first one's version published;
3. fingerprints the inputs from headers and object metadata alone (S3 ETag / VersionId, local
   size + mtime + inode), computes the version id (:func:`swudi.pipeline.plan.version_id`) and compares it
   with the version ``latest.json`` names;
4. same version, and complete: a no-op (log line + ``swudi-refresh`` artifact), retention applied;
   otherwise the merge flow runs as a subflow (every cached step that still applies is reused),
   publishes the version, moves the pointer and prunes to ``keep_versions``.

Defences against overlapping runs: the deployment's concurrency limit (one run at a time), then
this refresh lock, then the output lock held by every publish (:mod:`swudi.publish.publish_model`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from flows.merge import run_merge
from swudi.config.merge_config import MergeConfig, apply_overrides, config_from_mapping, load_config
from swudi.errors import GateError
from swudi.io.fingerprint import digest
from swudi.pipeline.code_version import merge_code
from swudi.pipeline.plan import build_plan, check_inputs_exist, version_id
from swudi.publish.publish_model import LOCK_WAIT_S, read_report
from swudi.publish.versions import is_version_complete, list_versions, prune_versions, read_latest
from swudi.storage.filesystem import join_url
from swudi.storage.lock import Lock, output_lock, read_lock
from tasks.retry import retry_unless_input_error

#: Folder under the output that holds the refresh lock (the output lock is ``OUTPUT/.lock``).
REFRESH_LOCK_DIR = ".refresh"
#: The refresh lock expires this long after its last renewal (a crashed run blocks no longer);
#: a live run renews it every third of that.
REFRESH_LOCK_TTL_S = 900.0
#: Default wait for another refresh of the same output before giving up.
REFRESH_WAIT_S = 3600.0


# ------------------------------------------------------------------------------------ config
def resolve_config(
    config: Mapping[str, Any] | str | Path | MergeConfig, overrides: Sequence[str] | None = None
) -> MergeConfig:
    """The validated config: a YAML path (relative paths inside resolved against its folder), a
    mapping, or a :class:`MergeConfig`; ``key=value`` overrides applied to the first two."""
    if isinstance(config, MergeConfig):
        if overrides:
            return config_from_mapping(apply_overrides(config.model_dump(), list(overrides)), "config")
        return config
    if isinstance(config, (str, Path)):
        return load_config(config, list(overrides or []))
    return config_from_mapping(apply_overrides(dict(config), list(overrides or [])), "flow parameter")


# ---------------------------------------------------------------------------- change detection
@dataclass(frozen=True)
class RefreshCheck:
    """What the inputs are now, and how that compares with the published ``latest``."""

    version: str  # the version id the current inputs + settings would publish
    inputs_fingerprint: str
    inputs: tuple[tuple[str, str, str], ...]  # (role, url, fingerprint)
    latest: dict[str, Any] | None  # latest.json (None: nothing published)
    complete: bool  # this version's folder is already complete under the output
    changes: tuple[str, ...] = field(default=())  # why a merge is needed (empty when up to date)

    @property
    def up_to_date(self) -> bool:
        """True when ``latest`` already names this version and that version is complete."""
        return self.latest is not None and self.latest["version"] == self.version and self.complete


def check_for_changes(config: MergeConfig) -> RefreshCheck:
    """Fingerprint the inputs from headers + object metadata and compare with the published latest.

    No tensor data is read. ``changes`` says, for a human, why a merge is needed.
    """
    check_inputs_exist(config)
    plan = build_plan(config)
    version = version_id(config, plan)
    inputs = (
        ("base", plan.base_url, plan.base_fingerprint),
        *(
            (f"expert {i}", url, fp)
            for i, (url, fp) in enumerate(zip(plan.expert_urls, plan.expert_fingerprints, strict=True))
        ),
    )
    latest = read_latest(config.output, config.storage_options)
    complete = is_version_complete(config.output, version, config.storage_options)
    changes: list[str] = []
    if latest is None:
        changes.append("nothing published yet")
    elif latest["version"] == version and not complete:
        changes.append(f"published version {version} is incomplete (files missing or changed); publishing it again")
    elif latest["version"] != version:
        changes += _describe_changes(config, plan.inputs_fingerprint, inputs, latest["version"])
    return RefreshCheck(version, plan.inputs_fingerprint, inputs, latest, complete, tuple(changes))


def _describe_changes(
    config: MergeConfig, inputs_fp: str, inputs: Sequence[tuple[str, str, str]], previous: str
) -> list[str]:
    """What differs from the merge report of the ``previous`` version (best effort)."""
    report = read_report(config.output, previous, config.storage_options)
    if not report:
        return [f"latest names {previous}, which has no merge report to compare with"]
    old = report.get("inputs", {})
    old_fps = {
        old.get("base", {}).get("url"): old.get("base", {}).get("fingerprint"),
        **{e.get("url"): e.get("fingerprint") for e in old.get("experts", [])},
    }
    changes = []
    for role, url, fp in inputs:
        if url not in old_fps:
            changes.append(f"{role} {url} is new")
        elif old_fps[url] != fp:
            changes.append(f"{role} {url} changed")
    current = {url for _, url, _ in inputs}
    changes += [f"{url} is no longer an input" for url in old_fps if url and url not in current]
    if not changes and old.get("fingerprint") != inputs_fp:
        changes.append("the order of the experts changed")
    for key in ("method", "params", "scale", "output_dtype"):
        if report.get(key) != getattr(config, key):
            changes.append(f"{key}: {report.get(key)!r} -> {getattr(config, key)!r}")
    old_code, new_code = report.get("software", {}).get("merge_code"), merge_code(config.method)
    if old_code != new_code:
        changes.append(f"merge code {old_code} -> {new_code}")
    return changes or ["settings changed (routing, shard size, decomposition options or evaluators)"]


@task(
    name="check-for-changes",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=5,
)
def detect_changes(config: MergeConfig) -> RefreshCheck:
    """Fingerprint inputs (headers, object metadata) -> version id; compare with ``latest.json``."""
    return check_for_changes(config)


# --------------------------------------------------------------------------------- retention
def complete_versions(config: MergeConfig) -> list[str]:
    """Ids of the complete versions under the output, oldest first."""
    return [v["version"] for v in list_versions(config.output, config.storage_options)]


def apply_retention(config: MergeConfig) -> list[str]:
    """Prune to ``keep_versions`` under the output lock (never the version ``latest`` names)."""
    if not config.keep_versions:
        return []
    with output_lock(config.output, storage_options=config.storage_options, wait_s=LOCK_WAIT_S):
        return prune_versions(config.output, config.keep_versions, config.storage_options)


# ------------------------------------------------------------------------------ refresh lock
def refresh_lock_url(output: str) -> str:
    """The folder whose ``.lock`` serialises refreshes of ``output``."""
    return join_url(output, REFRESH_LOCK_DIR)


@contextlib.contextmanager
def refresh_lock(
    config: MergeConfig,
    owner: str,
    wait_s: float = REFRESH_WAIT_S,
    ttl_s: float = REFRESH_LOCK_TTL_S,
    logger: Any = None,
) -> Iterator[tuple[Lock, float]]:
    """Hold the output's refresh lock for the block: :func:`swudi.storage.lock.output_lock` on
    :func:`refresh_lock_url` (a lease renewed by a heartbeat every ``ttl_s / 3``, taken over from a
    holder that is gone); yields the lock (``lock.check()`` raises once it was lost) and the seconds
    waited for it. Raises :class:`~swudi.errors.PublishError` if another refresh holds it for over ``wait_s``."""
    url = refresh_lock_url(config.output)
    options = config.storage_options
    started = time.monotonic()
    holder = read_lock(url, options)
    if holder is not None and logger:
        logger.info(
            "another refresh of %s may be running (%s); waiting up to %.0f s for it",
            config.output,
            holder.get("owner", "?"),
            wait_s,
        )
    with output_lock(url, owner, ttl_s, options, wait_s) as lock:
        yield lock, time.monotonic() - started


def _owner() -> str:
    context = FlowRunContext.get()
    run = f"flow run {context.flow_run.id}" if context and context.flow_run else "no flow run"
    return f"{socket.gethostname()}:{os.getpid()} ({run})"


# ------------------------------------------------------------------------------------ the flow
@flow(name="swudi-refresh", log_prints=True, validate_parameters=False)
def refresh(
    config: dict[str, Any] | str, overrides: list[str] | None = None, wait_s: float = REFRESH_WAIT_S
) -> dict[str, Any]:
    """Publish a new merged version if the inputs or settings changed since ``latest``; else no-op.

    ``config``: a YAML config path (re-read at every run) or a config mapping (a ``Path`` or a
    :class:`MergeConfig` also work from Python); ``overrides``: ``key=value`` strings as for
    ``swudi merge --set``; ``wait_s``: how long to wait for another refresh of the same output.

    Returns ``{"status": "unchanged" | "published", "version", "previous", "url", "changes",
    "pruned", ...}``; ``previous`` is the version ``latest`` named before this run.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = resolve_config(config, overrides)
    with refresh_lock(cfg, _owner(), wait_s, logger=logger) as (lock, waited):
        before = complete_versions(cfg)
        check = detect_changes(cfg)
        lock.check()  # a refresh whose lock was taken over merges nothing
        latest = check.latest
        previous = latest["version"] if latest else None
        if latest is not None and check.up_to_date:  # (up to date implies a latest)
            logger.info(
                "already up to date: inputs and settings of %s match published version %s "
                "(published %s); nothing merged",
                cfg.output,
                check.version,
                latest.get("published_at"),
            )
            apply_retention(cfg)
            result = {
                "status": "unchanged",
                "version": check.version,
                "previous": previous,
                "url": latest["url"],
                "changes": [],
                "new_version": False,
            }
        else:
            logger.info("refreshing %s: %s", cfg.output, "; ".join(check.changes))
            try:
                merged = run_merge(cfg)  # a subflow; publish prunes to keep_versions
            except GateError as refused:  # the run ends Failed; latest still names `previous`
                logger.error("%s", refused)
                create_markdown_artifact(
                    _refused(cfg, check, previous, str(refused)),
                    key=_artifact_key(cfg.output),
                    description=f"swudi refresh of {cfg.output}: refused by the publish gate",
                )
                raise
            result = {
                "status": "published",
                "version": merged["version"],
                "previous": previous,
                "url": merged["url"],
                "changes": list(check.changes),
                "new_version": not check.complete,
                "computed": merged["computed"],
                "reused": merged["reused"],
                "decompositions_computed": merged["decompositions_computed"],
                "merge_flow_run_id": merged["flow_run_id"],
                "merge_task_runs": merged["task_runs"],
            }
            logger.info(
                "published version %s at %s (previous: %s; %d steps computed, %d reused)",
                merged["version"],
                merged["url"],
                previous,
                merged["computed"],
                merged["reused"],
            )
        after = complete_versions(cfg)
    result.update(
        pruned=[v for v in before if v not in after],
        versions=after,
        waited_s=round(waited, 3),
        seconds=round(time.perf_counter() - started, 3),
    )
    if result["pruned"]:
        logger.info("retention (keep %s): pruned %s", cfg.keep_versions, ", ".join(result["pruned"]))
    create_markdown_artifact(
        _summary(cfg, check, result),
        key=_artifact_key(cfg.output),
        description=f"swudi refresh of {cfg.output}: {result['status']}",
    )
    return result


def _artifact_key(output: str) -> str:
    """One artifact key per output, so the UI shows the history of its refreshes."""
    return f"swudi-refresh-{digest(output)[:12]}"


def _refused(config: MergeConfig, check: RefreshCheck, previous: str | None, reason: str) -> str:
    """The artifact of a refresh whose version the publish gate refused."""
    lines = [
        "# swudi refresh: refused by the publish gate",
        "",
        f"**{reason}**",
        "",
        f"- version `{check.version}` is kept for inspection under `{config.output}/versions/` "
        "(retention or `swudi gc` can remove it)",
        f"- latest still names `{previous}`",
        f"- method: `{config.method}` {config.params}",
    ]
    if check.changes:
        lines += ["", "## What changed", "", *(f"- {change}" for change in check.changes)]
    return "\n".join(lines)


def _summary(config: MergeConfig, check: RefreshCheck, result: Mapping[str, Any]) -> str:
    if result["status"] == "unchanged":
        headline = (
            f"**Already up to date**: nothing changed since version `{result['version']}` "
            f"was published ({(check.latest or {}).get('published_at')}); nothing was merged."
        )
    elif result["new_version"]:
        headline = f"**Published** version `{result['version']}` (previous: `{result['previous']}`)."
    else:
        headline = (
            f"**Published** existing version `{result['version']}` again (previous: "
            f"`{result['previous']}`): its files were complete, only `latest.json` moved."
        )
    lines = [
        f"# swudi refresh: {result['status']}",
        "",
        headline,
        "",
        f"- output: `{config.output}`",
        f"- latest: `{result['url']}`",
        f"- method: `{config.method}` {config.params}",
        f"- inputs fingerprint: `{check.inputs_fingerprint[:16]}`",
    ]
    if result.get("pruned"):
        lines.append(f"- pruned (keep {config.keep_versions}): {', '.join(result['pruned'])}")
    if check.changes:
        lines += ["", "## What changed", "", *(f"- {change}" for change in check.changes)]
    lines += ["", "## Inputs", "", "| input | url | fingerprint |", "|---|---|---|"]
    lines += [f"| {role} | `{url}` | `{fp[:16]}` |" for role, url, fp in check.inputs]
    return "\n".join(lines)
