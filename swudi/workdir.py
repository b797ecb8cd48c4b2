"""The work folder: what it holds and how big it is.

``WORK/{decompositions,deltas,merged}/<key>.safetensors`` are the artefacts of :mod:`swudi.steps`.
"""

from __future__ import annotations

import logging
from typing import Any

from swudi.checkpoint import join_url
from swudi.checkpoint.storage import resolve
from swudi.config import MergeConfig
from swudi.steps import ARTEFACT_KINDS

log = logging.getLogger(__name__)

__all__ = ["list_artefacts", "usage"]


def list_artefacts(config: MergeConfig, kind: str) -> dict[str, dict[str, Any]]:
    """``{key: {"size": bytes, "mtime": seconds or None}}`` of one kind of artefact (one listing)."""
    fs, path = resolve(join_url(config.resolved_work_dir, kind), config.storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not name.endswith(".safetensors"):
            continue
        when = entry.get("mtime", entry.get("LastModified"))
        out[name.removesuffix(".safetensors")] = {
            "size": int(entry.get("size") or 0),
            "mtime": when.timestamp() if hasattr(when, "timestamp") else (float(when) if when else None)}
    return out


def usage(config: MergeConfig) -> dict[str, Any]:
    """Files and bytes of the work folder's artefacts, per kind and in total."""
    kinds = {}
    for kind in ARTEFACT_KINDS:
        found = list_artefacts(config, kind)
        kinds[kind] = {"files": len(found), "bytes": sum(v["size"] for v in found.values())}
    return {"url": config.resolved_work_dir, "kinds": kinds,
            "files": sum(v["files"] for v in kinds.values()), "bytes": sum(v["bytes"] for v in kinds.values())}
