"""A simple advisory lock for one output location: `OUTPUT/.lock`, with an owner and an expiry.

Created with if-not-exists semantics: local `O_CREAT | O_EXCL`; S3 a conditional PUT
(`If-None-Match: *`, which AWS S3 honours since 2024). Where the store refuses conditional PUTs the
lock falls back to check-then-put followed by a read-back of its token: that narrows but does not
close the race between two processes starting within the same few milliseconds.

A lock whose expiry has passed is considered abandoned (crashed owner) and is taken over. Pick a
`ttl_s` longer than a refresh, or call `renew_lock` while working. Breaking an expired lock is best
effort: two processes that both find it expired at the same moment may both proceed; a deployment
concurrency limit (Prefect) is the first line of defence, this lock the second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from swudi.checkpoint.storage import is_local, join_url, resolve, write_bytes_atomic
from swudi.errors import PublishError

__all__ = ["LOCK_NAME", "Lock", "acquire_lock", "release_lock", "renew_lock", "read_lock", "output_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Lock:
    """A held lock: where it is, who holds it, and the token that proves it."""

    url: str
    owner: str
    token: str
    expires_at: float
    storage_options: Mapping[str, Any] | None = None


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _document(owner: str, token: str, ttl_s: float) -> tuple[bytes, float]:
    now = time.time()
    expires = now + ttl_s
    doc = {"owner": owner, "token": token, "acquired_at": now, "expires_at": expires}
    return json.dumps(doc).encode(), expires


def read_lock(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The current lock document, or None if the output is not locked."""
    url = join_url(output_url, LOCK_NAME)
    fs, path = resolve(url, storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return doc
    except ValueError:
        pass
    # Unreadable (a crash between create and write): expires a minute after its mtime.
    try:
        mtime = fs.modified(path).timestamp()
    except Exception:  # noqa: BLE001 - any store error: treat as fresh
        mtime = time.time()
    return {"owner": "?", "token": None, "expires_at": mtime + 60, "corrupt": True}


def _create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists. True if this call created it."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    if "s3" in _protocols(fs):
        try:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError, ValueError) as exc:
            log.debug("store refuses conditional PUT (%s); falling back to check-then-put", exc)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def acquire_lock(
    output_url: str,
    owner: str | None = None,
    ttl_s: float = 3600.0,
    storage_options: Mapping[str, Any] | None = None,
    wait_s: float = 0.0,
    poll_s: float = 1.0,
) -> Lock:
    """Take the lock of `output_url`, waiting up to `wait_s`; raise `PublishError` if it stays held."""
    owner = owner or _default_owner()
    url = join_url(output_url, LOCK_NAME)
    fs, path = resolve(url, storage_options)
    deadline = time.monotonic() + wait_s
    while True:
        token = uuid.uuid4().hex
        data, expires = _document(owner, token, ttl_s)
        if _create_exclusive(fs, path, data):
            current = read_lock(output_url, storage_options)
            if current and current.get("token") == token:
                return Lock(output_url, owner, token, expires, storage_options)
        else:
            current = read_lock(output_url, storage_options)
            if current is None:
                continue  # released in between: try again at once
            if float(current.get("expires_at", 0)) < time.time():
                log.warning("%s: lock held by %s expired; taking it over", output_url, current.get("owner"))
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                continue
        if time.monotonic() >= deadline:
            holder = (current or {}).get("owner", "?")
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float((current or {}).get("expires_at", 0))))
            raise PublishError(
                f"{output_url}: locked by {holder} until {until} (another refresh is running; the lock is {url})"
            )
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def renew_lock(lock: Lock, ttl_s: float = 3600.0) -> Lock:
    """Push the expiry of a held lock forward; raise `PublishError` if it is no longer ours."""
    current = read_lock(lock.url, lock.storage_options)
    if not current or current.get("token") != lock.token:
        raise PublishError(f"{lock.url}: lock lost (now held by {(current or {}).get('owner')})")
    data, expires = _document(lock.owner, lock.token, ttl_s)
    write_bytes_atomic(join_url(lock.url, LOCK_NAME), data, lock.storage_options)
    return Lock(lock.url, lock.owner, lock.token, expires, lock.storage_options)


def release_lock(lock: Lock) -> None:
    """Remove the lock if it is still ours (check then delete)."""
    current = read_lock(lock.url, lock.storage_options)
    if not current or current.get("token") != lock.token:
        log.warning("%s: lock was no longer ours at release (held by %s)", lock.url, (current or {}).get("owner"))
        return
    fs, path = resolve(join_url(lock.url, LOCK_NAME), lock.storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


@contextlib.contextmanager
def output_lock(
    output_url: str,
    owner: str | None = None,
    ttl_s: float = 3600.0,
    storage_options: Mapping[str, Any] | None = None,
    wait_s: float = 0.0,
) -> Iterator[Lock]:
    """`with output_lock(url): publish...` — held for the block, released after it."""
    lock = acquire_lock(output_url, owner, ttl_s, storage_options, wait_s)
    try:
        yield lock
    finally:
        release_lock(lock)
