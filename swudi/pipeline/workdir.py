"""The work folder: what it holds, how big it is, and garbage collection.

``WORK/{decompositions,deltas,merged}/<key>.safetensors`` are the artefacts of :mod:`swudi.pipeline`.
Every setting merged into the folder adds merged tensors (and, for a new input or decomposition
option, decompositions), so the folder grows until :func:`collect_garbage` removes what nothing
needs any more. Needed (kept) are the artefacts of:

- the config's current setting (its plan, from the checkpoint headers);
- every published version still kept under the output (and under its sweeps): each version's
  merge report lists its artefacts;
- every merge running now, or killed less than :data:`LEASE_TTL_S` ago (so that it can resume):
  a merge writes a lease ``WORK/runs/<run>.json`` with its keys before it writes any artefact,
  and removes it when it has published.

An unneeded artefact younger than ``min_age_s`` is kept too, which covers a merge that starts while
the collection runs. Legacy Prefect result records (``WORK/prefect-results``, pickles) are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from swudi.config.merge_config import MergeConfig
from swudi.errors import DamagedFileError
from swudi.pipeline.artefacts import list_artefacts
from swudi.pipeline.records import ARTEFACT_KINDS
from swudi.publish.readers import hold_versions, input_versions, release_versions
from swudi.publish.versions import REPORT_NAME, VERSIONS_DIR
from swudi.storage.filesystem import join_url, list_folder, remove_tree, resolve, write_bytes_atomic
from swudi.storage.killpoints import storage_event

log = logging.getLogger(__name__)

__all__ = [
    "LEASES",
    "LEASE_TTL_S",
    "GarbageReport",
    "collect_garbage",
    "list_artefacts",
    "live_keys",
    "remove_lease",
    "usage",
    "write_lease",
]

LEASES = "runs"
#: A lease older than this is a merge that died long ago: its artefacts are no longer protected.
LEASE_TTL_S = 24 * 3600.0
LEGACY_FOLDERS = ("prefect-results",)
Keys = dict[str, set[str]]


def usage(config: MergeConfig) -> dict[str, Any]:
    """Files and bytes of the work folder's artefacts, per kind and in total."""
    kinds = {}
    for kind in ARTEFACT_KINDS:
        found = list_artefacts(config, kind)
        kinds[kind] = {"files": len(found), "bytes": sum(v["size"] for v in found.values())}
    return {
        "url": config.resolved_work_dir,
        "kinds": kinds,
        "files": sum(v["files"] for v in kinds.values()),
        "bytes": sum(v["bytes"] for v in kinds.values()),
    }


# ---------------------------------------------------------------------------------------- leases
def _lease_url(config: MergeConfig, run_id: str) -> str:
    return join_url(config.resolved_work_dir, LEASES, f"{run_id}.json")


def write_lease(config: MergeConfig, run_id: str, keys: Mapping[str, set[str]]) -> None:
    """Declare the artefacts a running merge needs (before it writes or relies on any), and hold
    the published versions it reads as inputs (:mod:`swudi.publish.readers`: retention keeps them)."""
    hold_versions(_input_versions(config), run_id, config.storage_options)
    body = {"run": run_id, "created": time.time(), "keys": {k: sorted(v) for k, v in keys.items()}}
    write_bytes_atomic(_lease_url(config, run_id), json.dumps(body).encode(), config.storage_options)


def remove_lease(config: MergeConfig, run_id: str) -> None:
    """The merge has published: its artefacts are protected by its version from now on, and the
    versions it read may be pruned again."""
    fs, path = resolve(_lease_url(config, run_id), config.storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
        storage_event("deleted", path)
    release_versions(_input_versions(config), run_id, config.storage_options)


def _input_versions(config: MergeConfig) -> list[tuple[str, str]]:
    return input_versions([config.base, *config.experts], config.storage_options)


def _leases(config: MergeConfig, now: float) -> Keys:
    fs, folder = resolve(join_url(config.resolved_work_dir, LEASES), config.storage_options)
    keys: Keys = {kind: set() for kind in ARTEFACT_KINDS}
    try:
        names = list_folder(fs, folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return keys
    for name in names:
        try:
            lease = json.loads(fs.cat_file(name))
            if now - float(lease["created"]) > LEASE_TTL_S:
                continue
            for kind, values in lease["keys"].items():
                keys.setdefault(kind, set()).update(values)
        except FileNotFoundError:
            continue  # the merge finished meanwhile
        except (ValueError, KeyError, TypeError, AttributeError):  # what it protects is unknown: stop
            raise DamagedFileError(
                f"{name}: the lease of a merge is damaged (expected JSON {{created, keys}}); gc cannot tell what it "
                "protects: remove it once that merge is over, then run gc again"
            ) from None
    return keys


# -------------------------------------------------------------------------------------- live keys
def _kept_versions_keys(config: MergeConfig) -> Keys:
    """Artefacts named by the merge reports of the versions under the output and its sweeps."""
    keys: Keys = {kind: set() for kind in ARTEFACT_KINDS}
    fs, root = resolve(config.output, config.storage_options)
    outputs = [root, *(point for sweep in _subfolders(fs, f"{root}/sweeps") for point in _subfolders(fs, sweep))]
    for output in outputs:
        for version in _subfolders(fs, f"{output}/{VERSIONS_DIR}"):
            path = f"{version}/{REPORT_NAME}"
            try:
                report = json.loads(fs.cat_file(path))
            except FileNotFoundError:
                continue
            except ValueError:  # its artefacts would be deleted: stop instead
                raise DamagedFileError(
                    f"{path}: the merge report of a kept version is damaged (not valid JSON); gc would delete "
                    "the artefacts it names: restore it, or remove the version, then run gc again"
                ) from None
            for kind, values in (report.get("artefacts") or {}).items():
                keys.setdefault(kind, set()).update(values)
    return keys


def _subfolders(fs: AbstractFileSystem, path: str) -> list[str]:
    """The folders directly under ``path`` (listed, never globbed: a path may hold ``[ ] * ?``)."""
    try:
        entries = list_folder(fs, path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry["name"].rstrip("/") for entry in entries if entry.get("type") == "directory"]


def live_keys(config: MergeConfig, now: float | None = None) -> Keys:
    """Artefact keys still needed: the current setting, kept versions, live leases (module doc)."""
    from swudi.pipeline.keys import artefact_keys
    from swudi.pipeline.plan import build_plan

    plan = build_plan(config)
    needed = artefact_keys(plan.layer_jobs, plan.group_jobs, config)
    for extra in (_kept_versions_keys(config), _leases(config, time.time() if now is None else now)):
        for kind, values in extra.items():
            needed.setdefault(kind, set()).update(values)
    return needed


# ----------------------------------------------------------------------------------------- collect
@dataclass
class GarbageReport:
    """What a collection removed (or would remove, dry run) and what it kept."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_files: int = 0
    kept_bytes: int = 0
    young_files: int = 0  # unneeded but younger than min_age_s


def collect_garbage(config: MergeConfig, *, min_age_s: float = 3600.0, dry_run: bool = False) -> GarbageReport:
    """Remove the artefacts nothing needs (module doc); safe while merges run on the same folder."""
    now = time.time()
    needed = live_keys(config, now)
    report = GarbageReport()
    fs, work = resolve(config.resolved_work_dir, config.storage_options)
    for kind in ARTEFACT_KINDS:
        for key, info in list_artefacts(config, kind).items():
            if key in needed.get(kind, set()):
                report.kept_files += 1
                report.kept_bytes += info["size"]
                continue
            if info["mtime"] is None or now - info["mtime"] < min_age_s:
                report.young_files += 1
                report.kept_files += 1
                report.kept_bytes += info["size"]
                continue
            report.removed.append(f"{kind}/{key}.safetensors")
            report.freed_bytes += info["size"]
    for legacy in LEGACY_FOLDERS:
        path = f"{work}/{legacy}"
        if fs.exists(path):
            report.removed.append(f"{legacy}/")
    if dry_run:
        return report
    # a lease written since the listing protects what its merge relies on: read them again
    late = _leases(config, time.time())
    for name in list(report.removed):
        kind, _, file_name = name.partition("/")
        if file_name.removesuffix(".safetensors") in late.get(kind, set()):
            report.removed.remove(name)
            report.kept_files += 1
            continue
        try:
            if name.endswith("/"):
                remove_tree(fs, f"{work}/{name.rstrip('/')}")
            else:
                fs.rm_file(f"{work}/{name}")
        except FileNotFoundError:
            pass
    log.info(
        "%s: removed %d artefacts (%d bytes), kept %d",
        config.resolved_work_dir,
        len(report.removed),
        report.freed_bytes,
        report.kept_files,
    )
    return report
