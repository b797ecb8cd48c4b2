"""An advisory lock for one output location: `OUTPUT/.lock`, a lease with an owner and a heartbeat.

Created with if-not-exists semantics: local `O_CREAT | O_EXCL`; S3 a conditional PUT
(`If-None-Match: *`, which AWS S3 honours since 2024). Where the store refuses conditional PUTs the
lock falls back to check-then-put followed by a read-back of its token: that narrows but does not
close the race between two processes starting within the same few milliseconds. A conditional PUT
retried after a lost answer finds the lock already there with this process's own token: it is held.

The lock document names its holder: `host`, `pid`, the process's start time (`/proc`, Linux) and
the boot id, a free-form `owner` label and a random `token`. It is a *lease*: it expires `ttl_s`
after its last renewal, and :func:`output_lock` renews it from a heartbeat thread every `ttl_s / 3`
(:data:`LEASE_S` = 30 s by default). So a holder that was killed blocks the output:

- on the same machine, not at all: a lock whose process is gone (no such pid, or a pid reused by a
  process started later) is taken over at once;
- from another machine, at most `ttl_s` after its last heartbeat.

Breaking an abandoned lock is best effort: two processes that both find it abandoned at the same
moment may both take it. The heartbeat then finds the lock no longer names its token and the
loser's :meth:`Lock.check` raises before it writes anything that readers see (a publish checks
before its manifest and before `latest.json`). A deployment concurrency limit (Prefect) is the
first line of defence, this lock the second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from swudi.errors import PublishError
from swudi.storage.filesystem import is_local, join_url, resolve, write_bytes_atomic
from swudi.storage.killpoints import storage_event

__all__ = [
    "LOCK_NAME",
    "LEASE_S",
    "Lock",
    "acquire_lock",
    "release_lock",
    "renew_lock",
    "read_lock",
    "output_lock",
    "holder_is_dead",
    "process_start",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


#: Default lease of the output lock, seconds: a killed holder on another machine blocks no longer.
LEASE_S = 30.0


@dataclass(frozen=True)
class Lock:
    """A held lock: where it is, who holds it, and the token that proves it."""

    url: str
    owner: str
    token: str
    expires_at: float
    storage_options: Mapping[str, Any] | None = None
    lost: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def check(self) -> None:
        """Raise `PublishError` if the heartbeat found the lock taken over (or could not renew it in time)."""
        if self.lost.is_set():
            raise PublishError(f"{self.url}: the output lock was lost (taken over or not renewed); stopping")


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> float | None:
    """Start time of process `pid` in clock ticks since boot (Linux `/proc`), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces
    try:
        return float(fields[19])  # field 22 of proc(5), counted after "pid (comm)"
    except (IndexError, ValueError):
        return None


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "process_start": process_start(pid)}


def holder_is_dead(doc: Mapping[str, Any]) -> bool:
    """True only when the lock's holder provably runs no more: same machine (host and boot id), and
    its pid is gone or now belongs to a process started at another time. Unknown: False."""
    me = _identity()
    if doc.get("host") != me["host"] or doc.get("boot_id") != me["boot_id"] or me["boot_id"] is None:
        return False
    pid = doc.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = process_start(pid)
    return started is not None and doc.get("process_start") is not None and started != doc["process_start"]


def _document(owner: str, token: str, ttl_s: float) -> tuple[bytes, float]:
    now = time.time()
    expires = now + ttl_s
    doc = {"owner": owner, "token": token, "acquired_at": now, "expires_at": expires, "ttl_s": ttl_s, **_identity()}
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
        storage_event("committed", path)
        return True
    if "s3" in _protocols(fs):
        try:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            storage_event("committed", path)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError, ValueError) as exc:
            log.debug("store refuses conditional PUT (%s); falling back to check-then-put", exc)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    storage_event("committed", path)
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
    token = uuid.uuid4().hex
    while True:
        data, expires = _document(owner, token, ttl_s)
        created = _create_exclusive(fs, path, data)
        current = read_lock(output_url, storage_options)
        if current is not None and current.get("token") == token:  # ours (also after a retried create)
            return Lock(output_url, owner, token, expires, storage_options)
        if not created:
            if current is None:
                continue  # released in between: try again at once
            reason = _abandoned(current)
            if reason:
                log.warning(
                    "%s: lock held by %s is abandoned (%s); taking it over", output_url, current.get("owner"), reason
                )
                _remove_if_token(fs, path, output_url, current.get("token"), storage_options)
                continue
        if time.monotonic() >= deadline:
            holder = (current or {}).get("owner", "?")
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float((current or {}).get("expires_at", 0))))
            raise PublishError(
                f"{output_url}: locked by {holder} until {until} unless renewed (another merge or refresh is "
                f"running; the lock is {url})"
            )
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def _abandoned(doc: Mapping[str, Any]) -> str | None:
    """Why the lock `doc` describes may be taken over, or None while its holder may be alive."""
    if float(doc.get("expires_at", 0)) < time.time():
        return "its lease expired"
    if holder_is_dead(doc):
        return f"process {doc.get('pid')} on this machine is gone"
    return None


def _remove_if_token(
    fs: Any, path: str, output_url: str, token: object, storage_options: Mapping[str, Any] | None
) -> None:
    """Delete the lock file if it still holds `token` (check then delete: narrows the race)."""
    current = read_lock(output_url, storage_options)
    if current is not None and current.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
            storage_event("deleted", path)


def renew_lock(lock: Lock, ttl_s: float = 3600.0) -> Lock:
    """Push the expiry of a held lock forward; raise `PublishError` if it is no longer ours."""
    current = read_lock(lock.url, lock.storage_options)
    if not current or current.get("token") != lock.token:
        raise PublishError(f"{lock.url}: lock lost (now held by {(current or {}).get('owner')})")
    data, expires = _document(lock.owner, lock.token, ttl_s)
    write_bytes_atomic(join_url(lock.url, LOCK_NAME), data, lock.storage_options)
    return Lock(lock.url, lock.owner, lock.token, expires, lock.storage_options, lock.lost)


def release_lock(lock: Lock) -> None:
    """Remove the lock if it is still ours (check then delete)."""
    current = read_lock(lock.url, lock.storage_options)
    if not current or current.get("token") != lock.token:
        log.warning("%s: lock was no longer ours at release (held by %s)", lock.url, (current or {}).get("owner"))
        return
    fs, path = resolve(join_url(lock.url, LOCK_NAME), lock.storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
        storage_event("deleted", path)


def _heartbeat(lock: Lock, ttl_s: float, stop: threading.Event) -> None:
    """Renew `lock` every `ttl_s / 3` until `stop`; set `lock.lost` if it was taken over or its
    lease ran out between failed renewals."""
    current = lock
    while not stop.wait(ttl_s / 3):
        try:
            current = renew_lock(current, ttl_s)
        except PublishError as error:
            log.error("%s", error)
            lock.lost.set()
            return
        except Exception as error:  # noqa: BLE001 - a transient store error: try again next beat
            log.warning("could not renew the lock of %s: %s", lock.url, error)
            if time.time() > current.expires_at:
                lock.lost.set()
                return


@contextlib.contextmanager
def output_lock(
    output_url: str,
    owner: str | None = None,
    ttl_s: float = LEASE_S,
    storage_options: Mapping[str, Any] | None = None,
    wait_s: float = 0.0,
) -> Iterator[Lock]:
    """`with output_lock(url) as lock: ...` — held for the block with a heartbeat, released after it.

    Call `lock.check()` before a step that must not happen without the lock (it raises once the
    heartbeat found the lock taken over).
    """
    lock = acquire_lock(output_url, owner, ttl_s, storage_options, wait_s, poll_s=min(1.0, ttl_s / 10))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, ttl_s, stop), name="swudi-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield lock
    finally:
        stop.set()
        beat.join()
        release_lock(lock)
