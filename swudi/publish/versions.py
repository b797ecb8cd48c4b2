"""Versioned, atomic publishing of merged models, with a `latest.json` pointer and retention.

Layout under an output URL:

    OUTPUT/versions/<version-id>/...               the model files (shards, index, config, ...)
    OUTPUT/versions/<version-id>/swudi_version.json  manifest: written after every other file
    OUTPUT/latest.json                              {"version", "path", "published_at", ...}: written last

A version is *complete* when its manifest exists and every file it lists is there with its size.
`latest.json` only ever names a complete version and is replaced in one piece (local: temp file +
`os.replace`; S3: one PUT), so a crash at any moment leaves readers on the previous version.
A re-publish of a complete version id writes nothing but the pointer; an incomplete folder left by a
crash is cleared and written again.

Concurrency: two processes publishing *different* ids never touch each other's files; the pointer
is last-writer-wins. Serialise refreshes of one output with `swudi.storage.lock.output_lock`
(publishing the same id twice at once, or pruning while publishing, needs it).
On S3, multipart uploads cut short by a crash are left for a bucket lifecycle rule
(`AbortIncompleteMultipartUpload`) to clean up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from fsspec import AbstractFileSystem

from swudi.errors import PublishError
from swudi.publish.readers import read_versions
from swudi.storage.filesystem import find_files, join_url, list_folder, remove_tree, resolve, write_bytes_atomic
from swudi.storage.killpoints import storage_event
from swudi.storage.redact import mask_in

__all__ = [
    "VERSIONS_DIR",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "is_version_complete",
    "check_version_id",
    "version_url",
    "publish_version",
    "read_latest",
    "read_manifest",
    "list_versions",
    "prune_versions",
]

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
LATEST_NAME = "latest.json"
MANIFEST_NAME = "swudi_version.json"
REPORT_NAME = "merge_report.json"
_VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TMP_MARK = ".tmp-"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_version_id(version_id: object) -> str:
    """Version ids are folder names: letters, digits, `.`, `_`, `-`; at most 128 characters."""
    if not isinstance(version_id, str) or not _VERSION_ID.fullmatch(version_id) or ".." in version_id:
        raise PublishError(
            f"invalid version id {version_id!r}: use letters, digits, '.', '_' and '-' "
            f"(starting with a letter or digit, at most 128 characters)"
        )
    return version_id


def version_url(output_url: str, version_id: str) -> str:
    """URL of the folder of `version_id` under `output_url`."""
    return join_url(output_url, VERSIONS_DIR, check_version_id(version_id))


def _files(fs: AbstractFileSystem, folder: str) -> dict[str, dict[str, Any]]:
    """Relative name -> info of every file under `folder` (recursive), ignoring temp files."""
    try:
        found = find_files(fs, folder)
    except FileNotFoundError:
        return {}
    prefix = folder.rstrip("/") + "/"
    out = {}
    for name, info in found.items():
        if info.get("type") != "file" or not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        if _TMP_MARK in posixpath.basename(rel):
            continue
        out[rel] = info
    return out


def _read_json(fs: AbstractFileSystem, path: str, what: str) -> dict[str, Any] | None:
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PublishError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PublishError(f"{what} must hold a JSON object")
    return doc


def read_manifest(
    output_url: str, version_id: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The manifest of a version, or None if the version never completed."""
    url = join_url(version_url(output_url, version_id), MANIFEST_NAME)
    fs, path = resolve(url, storage_options)
    return _read_json(fs, path, url)


def _is_complete(fs: AbstractFileSystem, folder: str, manifest: Mapping[str, Any] | None) -> bool:
    if not manifest or not isinstance(manifest.get("files"), dict):
        return False
    present = _files(fs, folder)
    return all(
        name in present and int(present[name].get("size", -1)) == size for name, size in manifest["files"].items()
    )


def is_version_complete(output_url: str, version_id: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if the version's manifest exists and every file it lists is present with its size."""
    manifest = read_manifest(output_url, version_id, storage_options)
    if manifest is None:
        return False
    fs, path = resolve(version_url(output_url, version_id), storage_options)
    return _is_complete(fs, path, manifest)


def publish_version(
    output_url: str,
    version_id: str,
    write_files: Callable[[str], Any],
    *,
    storage_options: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    pointer_extra: Mapping[str, Any] | None = None,
    guard: Callable[[], None] | None = None,
    check: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Publish a version: `write_files(version_url)` writes the model files, then the manifest, then
    `latest.json` is pointed at it. Returns the pointer written (plus `url`, the version's URL).

    When `write_files` raises, what it wrote is removed before the error is raised again.
    `report` (JSON-serialisable) is written as `merge_report.json` in the version folder;
    `pointer_extra` adds keys to `latest.json`. If the version is already complete, `write_files`
    is not called and only the pointer is (re)written. `guard()` is called before the manifest and
    before the pointer are written (e.g. `Lock.check`: raise if the output lock was lost).
    `check(version_url)` is called once the version is complete, before the pointer moves (unless
    `latest.json` already names it): when it raises (the publish gate), the complete version stays
    for inspection and `latest.json` is unchanged.
    """
    guard = guard or (lambda: None)
    vurl = version_url(output_url, version_id)
    fs, vpath = resolve(vurl, storage_options)
    manifest = read_manifest(output_url, version_id, storage_options)
    if manifest is not None and _is_complete(fs, vpath, manifest):
        log.info("%s: version %s is already complete; not rewritten", output_url, version_id)
    else:
        if manifest is not None:
            log.warning(
                "%s: version %s has a manifest but files are missing or changed; rewriting it", output_url, version_id
            )
        if fs.exists(vpath):
            log.info("%s: clearing leftovers of an unfinished publish of %s", output_url, version_id)
            remove_tree(fs, vpath)
            storage_event("deleted", vpath)
        try:
            write_files(vurl)
        except Exception:
            # a refused tensor or a failed write: no half-written version stays behind (the lock
            # holder owns this folder; latest.json still names the previous version)
            with contextlib.suppress(Exception):
                if fs.exists(vpath):
                    remove_tree(fs, vpath)
            raise
        if report is not None:
            write_bytes_atomic(
                join_url(vurl, REPORT_NAME),
                (json.dumps(mask_in(report), indent=2, sort_keys=True, default=str) + "\n").encode(),
                storage_options,
            )
        files = _files(fs, vpath)
        files.pop(MANIFEST_NAME, None)
        if not any(name != REPORT_NAME for name in files):
            raise PublishError(f"{vurl}: write_files wrote no files; nothing to publish")
        guard()
        manifest = {
            "version": version_id,
            "completed_at": _now(),
            "files": {name: int(info["size"]) for name, info in sorted(files.items())},
        }
        write_bytes_atomic(
            join_url(vurl, MANIFEST_NAME), (json.dumps(mask_in(manifest), indent=2) + "\n").encode(), storage_options
        )

    previous = read_latest(output_url, storage_options)
    if previous is not None and previous.get("version") == version_id:
        log.info("%s: latest already names %s", output_url, version_id)
        return previous
    if check is not None:
        check(vurl)
    guard()
    pointer = {
        "version": version_id,
        "path": f"{VERSIONS_DIR}/{version_id}",
        "published_at": _now(),
        "completed_at": manifest["completed_at"],
        "previous": previous.get("version") if previous else None,
        **dict(pointer_extra or {}),
    }
    write_bytes_atomic(
        join_url(output_url, LATEST_NAME),
        (json.dumps(mask_in(pointer), indent=2, default=str) + "\n").encode(),
        storage_options,
    )
    log.info("%s: published version %s", output_url, version_id)
    return {**pointer, "url": vurl}


def read_latest(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The `latest.json` pointer (plus `url`, the version's URL), or None if nothing was published."""
    url = join_url(output_url, LATEST_NAME)
    fs, path = resolve(url, storage_options)
    pointer = _read_json(fs, path, url)
    if pointer is None:
        return None
    named = pointer.get("version")
    try:
        version = check_version_id(named)
    except PublishError:
        raise PublishError(f"{url}: names an invalid version {named!r}") from None
    if pointer.get("path") != f"{VERSIONS_DIR}/{version}":
        raise PublishError(f"{url}: path {pointer.get('path')!r} does not match version {version!r}")
    return {**pointer, "url": version_url(output_url, version)}


def list_versions(
    output_url: str, storage_options: Mapping[str, Any] | None = None, include_incomplete: bool = False
) -> list[dict[str, Any]]:
    """Versions under `output_url`, oldest first: `{"version", "url", "complete", "completed_at", "files"}`.

    Complete means the manifest exists; use `include_incomplete` to see folders of unfinished publishes.
    """
    fs, root = resolve(join_url(output_url, VERSIONS_DIR), storage_options)
    try:
        entries = list_folder(fs, root)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        version = posixpath.basename(entry["name"].rstrip("/"))
        if not _VERSION_ID.fullmatch(version):
            continue
        manifest = _read_json(fs, f"{entry['name'].rstrip('/')}/{MANIFEST_NAME}", version)
        if manifest is None and not include_incomplete:
            continue
        out.append(
            {
                "version": version,
                "url": version_url(output_url, version),
                "complete": manifest is not None,
                "completed_at": (manifest or {}).get("completed_at"),
                "files": (manifest or {}).get("files"),
            }
        )
    out.sort(key=lambda v: (not v["complete"], v["completed_at"] or "", v["version"]))
    return out


def _newest_mtime(fs: AbstractFileSystem, folder: str) -> float | None:
    times = []
    for info in _files_with_tmp(fs, folder).values():
        for key in ("mtime", "LastModified", "last_modified", "created"):
            value = info.get(key)
            if isinstance(value, _dt.datetime):
                times.append(value.timestamp())
                break
            if isinstance(value, (int, float)):
                times.append(float(value))
                break
    return max(times) if times else None


def _files_with_tmp(fs: AbstractFileSystem, folder: str) -> dict[str, dict[str, Any]]:
    try:
        return find_files(fs, folder)
    except FileNotFoundError:
        return {}


def prune_versions(
    output_url: str,
    keep: int,
    storage_options: Mapping[str, Any] | None = None,
    *,
    incomplete_older_than_s: float | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete all but the `keep` newest complete versions; never the one `latest.json` names, nor
    one that a running merge reads as an input (:mod:`swudi.publish.readers`).

    Folders of unfinished publishes are kept (another process may be writing them) unless
    `incomplete_older_than_s` is given and none of their files changed for that long.
    A deleted version loses its manifest first, so it is never seen as complete half-deleted.
    Returns the version ids deleted (or that would be, with `dry_run`).
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    latest = read_latest(output_url, storage_options)
    latest_id = latest["version"] if latest else None
    versions = list_versions(output_url, storage_options, include_incomplete=True)
    complete = [v for v in versions if v["complete"]]
    read_now = read_versions(output_url, storage_options)  # inputs of running merges
    keep_ids = {v["version"] for v in complete[-keep:]} | {latest_id} | read_now
    doomed = [v["version"] for v in complete if v["version"] not in keep_ids]
    for version in sorted(read_now & {v["version"] for v in complete[:-keep]}):
        log.info("%s: version %s is kept beyond keep=%d: a running merge reads it", output_url, version, keep)
    if incomplete_older_than_s is not None:
        now = time.time()
        for v in versions:
            if v["complete"] or v["version"] == latest_id or v["version"] in read_now:
                continue
            fs, path = resolve(v["url"], storage_options)
            mtime = _newest_mtime(fs, path)
            if mtime is None or now - mtime >= incomplete_older_than_s:
                doomed.append(v["version"])
    if dry_run:
        return doomed
    for version in doomed:
        vurl = version_url(output_url, version)
        fs, path = resolve(vurl, storage_options)
        mpath = resolve(join_url(vurl, MANIFEST_NAME), storage_options)[1]
        if fs.exists(mpath):
            fs.rm_file(mpath)
            storage_event("deleted", mpath)
        if fs.exists(path):
            remove_tree(fs, path)
            storage_event("deleted", path)
        log.info("%s: pruned version %s", output_url, version)
    return doomed
