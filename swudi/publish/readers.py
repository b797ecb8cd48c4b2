"""Reader leases: a published version that a running merge reads is never pruned.

A merge may read a published version as an input (e.g. the base is ``OUTPUT/versions/<old>/`` of
the output it publishes to). Before it relies on such an input it writes
``ROOT/.swudi-readers/<run>.json`` under that version's output root, naming the version, and removes
the file when it has published. :func:`~swudi.publish.versions.prune_versions` keeps every
version named by a lease younger than :data:`READER_TTL_S` (a merge killed less than a day ago may
still be resumed, so its inputs stay).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from swudi.storage.filesystem import join_url, list_folder, resolve, write_bytes_atomic
from swudi.storage.locations import canonical_location

__all__ = ["READERS", "READER_TTL_S", "hold_versions", "input_versions", "read_versions", "release_versions"]

log = logging.getLogger(__name__)

READERS = ".swudi-readers"
#: A lease older than this belongs to a merge that died long ago and protects nothing.
READER_TTL_S = 24 * 3600.0
_MANIFEST = "swudi_version.json"


def input_versions(urls: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """``(output root URL, version id)`` of every input that lies in a published version folder
    (``ROOT/versions/<id>/`` holding a manifest), in input order, without repeats."""
    found: list[tuple[str, str]] = []
    for url in urls:
        where = canonical_location(url)
        parts = where.split("/")
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] != "versions":
                continue
            root, version = "/".join(parts[:i]), parts[i + 1]
            fs, path = resolve(join_url(root, "versions", version, _MANIFEST), storage_options)
            with contextlib.suppress(FileNotFoundError, PermissionError):
                if fs.exists(path) and (root, version) not in found:
                    found.append((root, version))
            break
    return found


def _lease_url(root: str, run_id: str) -> str:
    return join_url(root, READERS, f"{run_id}.json")


def hold_versions(
    held: Iterable[tuple[str, str]], run_id: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write one lease per output root naming the versions of it that run ``run_id`` reads."""
    by_root: dict[str, list[str]] = {}
    for root, version in held:
        by_root.setdefault(root, []).append(version)
    for root, versions in by_root.items():
        body = {"run": run_id, "created": time.time(), "versions": sorted(set(versions))}
        write_bytes_atomic(_lease_url(root, run_id), json.dumps(body).encode(), storage_options)
        log.info("%s: versions %s are inputs of run %s (kept by retention)", root, ", ".join(versions), run_id)


def release_versions(
    held: Iterable[tuple[str, str]], run_id: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Remove the leases :func:`hold_versions` wrote for ``run_id``."""
    for root in {root for root, _ in held}:
        fs, path = resolve(_lease_url(root, run_id), storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def read_versions(root: str, storage_options: Mapping[str, Any] | None = None, now: float | None = None) -> set[str]:
    """Versions of output ``root`` that a live lease names (an unreadable lease protects nothing)."""
    now = time.time() if now is None else now
    fs, folder = resolve(join_url(root, READERS), storage_options)
    try:
        names = list_folder(fs, folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    held: set[str] = set()
    for name in names:
        try:
            lease = json.loads(fs.cat_file(name))
            if now - float(lease["created"]) <= READER_TTL_S:
                held.update(str(v) for v in lease["versions"])
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable reader lease %s is ignored", name)
    return held
