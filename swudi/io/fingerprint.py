"""Content fingerprints for cache keys, from object metadata (no data is read).

- shard: the storage's own change markers of the file: S3 ETag (+ VersionId when present), local
  size + mtime_ns + inode, other filesystems whatever of ETag / checksum / generation / mtime / size
  their `info()` returns. The file's URL is always part of it: size and mtime alone do not tell two
  same-sized files apart (experts extracted from one tar archive share sizes and mtimes).
- tensor location: digest(shard fingerprint, header entry: name, dtype, shape, offsets).
- checkpoint: digest(every shard fingerprint, the index document).

A fingerprint changes when the bytes change, as far as the storage reports it: a local file
rewritten in place with the same size within the filesystem's mtime resolution and then given its
old mtime back (e.g. `touch -d`) is not detected. Fingerprints identify the bytes *at a location*.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

from swudi.io.header import TensorEntry
from swudi.storage.filesystem import is_local

__all__ = ["digest", "shard_fingerprint", "tensor_fingerprint", "checkpoint_fingerprint"]

log = logging.getLogger(__name__)

# Keys of fsspec `info()` dicts derived from the content or its version (S3, GCS, Azure, ...).
_CONTENT_KEYS = (
    "ETag",
    "etag",
    "VersionId",
    "version_id",
    "md5Hash",
    "crc32c",
    "generation",
    "content_md5",
    "checksum",
)
# Otherwise, modification times.
_TIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "created")


def digest(*parts: Any) -> str:
    """sha256 hex digest of JSON-encoded parts (stable across processes and machines)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, separators=(",", ":"), default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def shard_fingerprint(
    fs: AbstractFileSystem, path: str, info: Mapping[str, Any] | None = None, url: str | None = None
) -> str:
    """Fingerprint of one stored file. `info` (from `fs.info`/`fs.ls(detail=True)`) saves a request."""
    location = url or fs.unstrip_protocol(path)
    if is_local(fs):
        st = os.stat(path)
        return digest("local", location, st.st_size, st.st_mtime_ns, st.st_ino)
    if info is None:
        info = fs.info(path)
    strong = {k: info[k] for k in _CONTENT_KEYS if info.get(k) not in (None, "")}
    markers: dict[str, Any] = {"size": info.get("size")}
    if strong:
        markers.update(strong)
    else:
        when = next((info[k] for k in _TIME_KEYS if info.get(k) not in (None, "")), None)
        if isinstance(when, _dt.datetime):
            when = when.timestamp()  # ls and info may report the same time in different time zones
        if when is None:
            log.warning(
                "%s: the storage reports no ETag, checksum or modification time; the fingerprint "
                "uses the size only and may miss a same-sized rewrite",
                location,
            )
        markers["time"] = when
    return digest("remote", location, markers)


def tensor_fingerprint(shard_fp: str, entry: TensorEntry) -> str:
    """Fingerprint of one tensor's bytes: its shard's fingerprint + its header entry."""
    return digest("tensor", shard_fp, entry.name, entry.to_json())


def checkpoint_fingerprint(shard_fps: Mapping[str, str], index: Mapping[str, Any] | None = None) -> str:
    """Fingerprint of a whole checkpoint: shard name -> shard fingerprint, plus the index document."""
    return digest("checkpoint", dict(sorted(shard_fps.items())), index)
