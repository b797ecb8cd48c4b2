"""Versioned atomic publishing: latest.json names only complete versions, crashes included."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from swudi.errors import PublishError
from swudi.io.checkpoint import Checkpoint
from swudi.io.writer import write_sharded
from swudi.publish.versions import (
    list_versions,
    prune_versions,
    publish_version,
    read_latest,
    read_manifest,
    version_url,
)
from swudi.storage.lock import acquire_lock, output_lock, read_lock, release_lock
from tests.helpers.builders import put_bytes

HELPERS = pathlib.Path(__file__).parent / "helpers"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _writer(value: float, n: int = 4, max_shard_size: int = 8000, storage_options=None, calls=None):
    specs = [(f"w{i}", torch.float32, (1000,)) for i in range(n)]

    def write_files(url: str) -> None:
        if calls is not None:
            calls.append(url)
        write_sharded(url, specs, lambda name: torch.full((1000,), value), max_shard_size=max_shard_size,
                      storage_options=storage_options)
    return write_files


def _value_of_latest(store) -> float:
    latest = read_latest(store.url("out"), store.storage_options)
    ckpt = Checkpoint.open(latest["url"], store.storage_options)
    values = {float(ckpt.read(n)[0]) for n in ckpt.tensors}
    assert len(values) == 1
    return values.pop()


def test_publish_and_read_latest(store):
    out = store.url("out")
    assert read_latest(out, store.storage_options) is None
    first = publish_version(out, "v1", _writer(1.0, storage_options=store.storage_options),
                            storage_options=store.storage_options, report={"method": "swudi"})
    assert first["version"] == "v1" and first["path"] == "versions/v1" and first["previous"] is None
    assert first["url"] == version_url(out, "v1")
    second = publish_version(out, "v2", _writer(2.0, storage_options=store.storage_options),
                             storage_options=store.storage_options, pointer_extra={"config_digest": "abc"})
    latest = read_latest(out, store.storage_options)
    assert latest["version"] == "v2" and latest["previous"] == "v1" and latest["config_digest"] == "abc"
    assert latest["published_at"] == second["published_at"]
    assert _value_of_latest(store) == 2.0
    manifest = read_manifest(out, "v1", store.storage_options)
    assert set(manifest["files"]) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                      "model.safetensors.index.json", "merge_report.json"}
    report_url = store.url("out", "versions", "v1", "merge_report.json")
    report = json.loads(store.fs().cat_file(report_url.split("://")[-1] if store.kind == "s3" else report_url))
    assert report == {"method": "swudi"}
    assert [v["version"] for v in list_versions(out, store.storage_options)] == ["v1", "v2"]


def test_republishing_a_complete_version_is_idempotent(store):
    out = store.url("out")
    calls: list[str] = []
    first = publish_version(out, "v1", _writer(1.0, storage_options=store.storage_options, calls=calls),
                            storage_options=store.storage_options)
    again = publish_version(out, "v1", _writer(9.0, storage_options=store.storage_options, calls=calls),
                            storage_options=store.storage_options)
    assert len(calls) == 1  # files not rewritten
    assert again["published_at"] == first["published_at"]  # pointer not rewritten either
    assert _value_of_latest(store) == 1.0
    # Going back to an older complete version re-points latest without rewriting files.
    publish_version(out, "v2", _writer(2.0, storage_options=store.storage_options),
                    storage_options=store.storage_options)
    back = publish_version(out, "v1", _writer(9.0, storage_options=store.storage_options, calls=calls),
                           storage_options=store.storage_options)
    assert len(calls) == 1 and back["version"] == "v1" and back["previous"] == "v2"
    assert _value_of_latest(store) == 1.0


def test_failed_write_is_never_pointed_to_and_is_cleared_on_retry(store):
    out = store.url("out")
    publish_version(out, "v1", _writer(1.0, storage_options=store.storage_options),
                    storage_options=store.storage_options)

    def failing(url):
        _writer(5.0, storage_options=store.storage_options)(url)
        raise RuntimeError("crash after writing everything but the manifest")

    with pytest.raises(RuntimeError):
        publish_version(out, "v2", failing, storage_options=store.storage_options)
    assert read_latest(out, store.storage_options)["version"] == "v1"
    assert [v["version"] for v in list_versions(out, store.storage_options)] == ["v1"]
    incomplete = list_versions(out, store.storage_options, include_incomplete=True)
    assert [(v["version"], v["complete"]) for v in incomplete] == [("v1", True)]  # the failed attempt is removed
    # A stray file (e.g. left by a killed attempt) must not survive the retry.
    stray = version_url(out, "v2") + "/stray.bin"
    put_bytes(stray, b"junk", store.storage_options)
    publish_version(out, "v2", _writer(2.0, n=2, storage_options=store.storage_options),
                    storage_options=store.storage_options)
    assert set(read_manifest(out, "v2", store.storage_options)["files"]) == {"model.safetensors"}
    assert _value_of_latest(store) == 2.0


def test_empty_write_and_bad_ids_are_refused(store):
    out = store.url("out")
    with pytest.raises(PublishError, match="wrote no files"):
        publish_version(out, "v1", lambda url: None, storage_options=store.storage_options)
    for bad in ("", "..", "../x", "a/b", ".hidden", "x" * 200, "sp ace"):
        with pytest.raises(PublishError, match="invalid version id"):
            publish_version(out, bad, lambda url: None, storage_options=store.storage_options)
    assert read_latest(out, store.storage_options) is None


def test_prune_keeps_the_newest_and_the_one_latest_names(store):
    out = store.url("out")
    for i, v in enumerate(["v1", "v2", "v3", "v4"]):
        publish_version(out, v, _writer(float(i), n=1, storage_options=store.storage_options),
                        storage_options=store.storage_options)
    publish_version(out, "v1", _writer(0.0, n=1, storage_options=store.storage_options),
                    storage_options=store.storage_options)  # roll back to v1
    assert prune_versions(out, 2, store.storage_options, dry_run=True) == ["v2"]
    assert prune_versions(out, 2, store.storage_options) == ["v2"]
    remaining = list_versions(out, store.storage_options, include_incomplete=True)
    assert [v["version"] for v in remaining] == ["v1", "v3", "v4"]
    assert prune_versions(out, 1, store.storage_options) == ["v3"]
    assert _value_of_latest(store) == 0.0
    with pytest.raises(ValueError):
        prune_versions(out, 0, store.storage_options)


def test_prune_leaves_recent_incomplete_folders(store):
    out = store.url("out")
    publish_version(out, "v1", _writer(1.0, n=1, storage_options=store.storage_options),
                    storage_options=store.storage_options)
    half = version_url(out, "v2") + "/model.safetensors"
    put_bytes(half, b"partial", store.storage_options)
    assert prune_versions(out, 1, store.storage_options) == []
    assert prune_versions(out, 1, store.storage_options, incomplete_older_than_s=3600) == []
    assert prune_versions(out, 1, store.storage_options, incomplete_older_than_s=0) == ["v2"]
    assert [v["version"] for v in list_versions(out, store.storage_options, include_incomplete=True)] == ["v1"]


@pytest.mark.slow
def test_publish_killed_half_way_leaves_the_old_version(store, tmp_path):
    out = store.url("out")
    publish_version(out, "v1", _writer(1.0, storage_options=store.storage_options),
                    storage_options=store.storage_options)
    signal_file = tmp_path / "signal"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(HELPERS / "crash_publish.py"), out,
                              json.dumps(store.storage_options), str(signal_file), "v2"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "child never reached the second shard"
            time.sleep(0.05)
        fs = store.fs()
        v2 = version_url(out, "v2")
        first_shard = v2 + "/model-00001-of-00002.safetensors"
        assert fs.exists(first_shard.split("://")[-1] if store.kind == "s3" else first_shard)  # really half-way
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    latest = read_latest(out, store.storage_options)
    assert latest["version"] == "v1"
    assert _value_of_latest(store) == 1.0
    assert read_manifest(out, "v2", store.storage_options) is None
    assert [v["version"] for v in list_versions(out, store.storage_options)] == ["v1"]
    # The next run completes v2.
    publish_version(out, "v2", _writer(2.0, storage_options=store.storage_options),
                    storage_options=store.storage_options)
    assert _value_of_latest(store) == 2.0


def test_output_lock(store):
    out = store.url("out")
    with output_lock(out, owner="refresh-1", ttl_s=60, storage_options=store.storage_options) as lock:
        assert read_lock(out, store.storage_options)["owner"] == "refresh-1"
        with pytest.raises(PublishError, match="locked by refresh-1"):
            acquire_lock(out, owner="refresh-2", storage_options=store.storage_options)
    assert read_lock(out, store.storage_options) is None
    # An expired lock (crashed owner) is taken over; its late release does not remove the new one.
    stale = acquire_lock(out, owner="crashed", ttl_s=-1, storage_options=store.storage_options)
    fresh = acquire_lock(out, owner="refresh-3", ttl_s=60, storage_options=store.storage_options)
    release_lock(stale)
    assert read_lock(out, store.storage_options)["owner"] == "refresh-3"
    release_lock(fresh)
    assert read_lock(out, store.storage_options) is None
    assert lock.owner == "refresh-1"
