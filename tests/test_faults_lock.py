"""The output lock is a lease: a killed holder blocks the next run for seconds, never an hour.

A holder on this machine whose process is gone is taken over at once; a holder on another
machine stops blocking when its lease (30 s by default, renewed by a heartbeat) runs out; a live
holder keeps the lock through its heartbeat; a holder whose lock was taken over finds out before
it writes a manifest or `latest.json`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from swudi.errors import PublishError
from swudi.publish.versions import publish_version, read_latest, read_manifest
from swudi.storage.lock import LOCK_NAME, acquire_lock, output_lock, read_lock, release_lock
from tests.helpers.faults import FaultProxy

HOLD = """
import pathlib, sys, time
from swudi.storage.lock import output_lock
with output_lock(sys.argv[1], owner="doomed publish"):
    pathlib.Path(sys.argv[2]).write_text("held")
    time.sleep(300)
"""


def test_a_killed_holder_on_this_machine_blocks_nobody(tmp_path: Path) -> None:
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    with pytest.raises(PublishError, match="locked by doomed publish"):
        acquire_lock(str(out), owner="next run")  # alive: it holds
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    doc = read_lock(str(out))
    assert doc is not None and doc["pid"] == holder.pid and doc["process_start"] is not None
    started = time.monotonic()
    lock = acquire_lock(str(out), owner="next run", wait_s=60)
    assert time.monotonic() - started < 2.0
    release_lock(lock)


def test_a_lock_from_another_machine_is_taken_over_when_its_lease_ends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lease_s = 2.0
    doc = {
        "owner": "other-host:1",
        "token": "theirs",
        "host": "other-host",
        "pid": 1,
        "boot_id": "x",
        "acquired_at": time.time(),
        "expires_at": time.time() + lease_s,
    }
    (out / LOCK_NAME).write_text(json.dumps(doc))
    with pytest.raises(PublishError):
        acquire_lock(str(out), wait_s=0)
    started = time.monotonic()
    lock = acquire_lock(str(out), wait_s=30, poll_s=0.1)
    waited = time.monotonic() - started
    assert 0.5 < waited < lease_s + 1.0, waited
    release_lock(lock)


def test_the_heartbeat_keeps_a_live_lease_and_notices_a_takeover(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(str(out), ttl_s=0.9) as lock:
        time.sleep(2.5)  # almost three leases: only the heartbeat keeps it
        with pytest.raises(PublishError):
            acquire_lock(str(out), wait_s=0)
        lock.check()
        doc = json.loads((out / LOCK_NAME).read_text())
        (out / LOCK_NAME).write_text(json.dumps({**doc, "token": "someone else"}))
        time.sleep(0.9)
        with pytest.raises(PublishError, match="lock was lost"):
            lock.check()
        with pytest.raises(PublishError, match="lock was lost"):  # a publish stops before its manifest
            publish_version(str(out), "v1", _write_one_file, guard=lock.check)
    assert read_manifest(str(out), "v1") is None and read_latest(str(out)) is None


def _write_one_file(url: str) -> None:
    Path(url).mkdir(parents=True)
    (Path(url) / "model.safetensors").write_bytes(b"x")


def test_a_lock_created_by_a_put_whose_answer_was_lost_is_held(s3_bucket) -> None:
    endpoint = urlparse(s3_bucket.endpoint_url)
    out = f"{s3_bucket.url}/out"
    puts: list[int] = []

    def first_put(number: int, line: str) -> str | None:
        if not line.startswith("PUT "):
            return None
        puts.append(number)
        return "reset_after" if len(puts) == 1 else None

    with FaultProxy(endpoint.hostname, endpoint.port, first_put) as proxy:
        options = {**s3_bucket.storage_options, "endpoint_url": proxy.endpoint_url}
        lock = acquire_lock(out, owner="me", storage_options=options)
        assert proxy.injected["reset_after"] == 1  # the create reached the store, its answer did not
        assert len(puts) == 2  # the retried create found the lock there (412) with this process's token
        assert read_lock(out, s3_bucket.storage_options)["token"] == lock.token
        release_lock(lock)
    assert read_lock(out, s3_bucket.storage_options) is None
