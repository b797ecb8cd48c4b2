"""Storage faults: a merge through a fault-injecting proxy in front of the moto S3 server.

Every storage request of these merges (inputs, work folder, output, lock) crosses
`helpers.faults.FaultProxy`, which resets connections, answers 500 and 503 SlowDown, stalls past
the read timeout and cuts bodies short. A merge must survive them and publish exactly the bytes
of a clean run; a store that goes silent must end the command with one line and exit code 2
within the retry policy's deadline, with nothing published.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from flows.merge import run_merge
from swudi.config.merge_config import config_from_mapping
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import list_versions, read_latest
from swudi.storage.faults import StorageFault, storage_fault
from swudi.storage.filesystem import resolve
from swudi.storage.retry import RETRY_KEY, RetryPolicy
from tests.helpers.faults import FAULT_KINDS, EveryNth, FaultProxy, silent_from_first

MODEL = SyntheticModel(layers=2, hidden=32, intermediate=64, vocab=32, positions=16)
#: Short timeouts so that a stall (3 s) outlasts the read timeout and the tests stay quick.
FAST_RETRY = {"attempts": 4, "connect_timeout_s": 2.0, "read_timeout_s": 1.0}


def _target(bucket) -> tuple[str, int]:
    endpoint = urlparse(bucket.endpoint_url)
    return endpoint.hostname, endpoint.port


def _config_data(bucket, base: str, experts: list[str], out: str, endpoint: str, retry=FAST_RETRY) -> dict:
    return {
        "base": base,
        "experts": experts,
        "output": f"{bucket.url}/{out}",
        "method": "swudi_a",
        "device": "cpu",
        "workers": 2,
        "storage_retry": dict(retry),
        "storage_options": {**bucket.storage_options, "endpoint_url": endpoint},
    }


def _version_files(bucket, out: str) -> dict[str, bytes]:
    """Files of the version `latest` names, except the two that hold times."""
    latest = read_latest(f"{bucket.url}/{out}", bucket.storage_options)
    assert latest is not None, f"{out}: nothing published"
    root = f"{bucket.name}/{out}/{latest['path']}"
    names = [p for p in bucket.fs.find(root) if not p.endswith(("swudi_version.json", "merge_report.json"))]
    return {p[len(root) :]: bucket.fs.cat_file(p) for p in names}


def test_the_proxy_injects_faults_and_retries_get_through_them(s3_bucket) -> None:
    """One request of each fault kind: no retries -> a one-line StorageFault; the policy -> success."""
    host, port = _target(s3_bucket)
    s3_bucket.fs.pipe_file(f"{s3_bucket.name}/blob", os.urandom(4096))
    with FaultProxy(host, port, EveryNth(1, ["500"], limit=1)) as proxy:
        options = {
            **s3_bucket.storage_options,
            "endpoint_url": proxy.endpoint_url,
            RETRY_KEY: {"attempts": 1, "connect_timeout_s": 2, "read_timeout_s": 2},
        }
        fs, path = resolve(f"{s3_bucket.url}/blob", options)
        with pytest.raises(Exception) as caught:
            fs.cat_file(path, start=0, end=4096)  # one GET (no HEAD first)
        fault = storage_fault(caught.value)
        assert isinstance(fault, StorageFault) and "\n" not in str(fault), caught.value
        assert proxy.injected["500"] == 1
    for kind in FAULT_KINDS:
        with FaultProxy(host, port, EveryNth(1, [kind], limit=1), stall_s=3.0) as proxy:
            options = {**s3_bucket.storage_options, "endpoint_url": proxy.endpoint_url, RETRY_KEY: FAST_RETRY}
            fs, path = resolve(f"{s3_bucket.url}/blob", options)
            assert len(fs.cat_file(path, start=0, end=4096)) == 4096, kind
            assert proxy.injected[kind] == 1, (kind, proxy.injected)


@pytest.mark.faults
@pytest.mark.slow
def test_a_merge_through_resets_5xx_throttling_stalls_and_truncation_is_bit_identical(
    prefect_api: str, s3_bucket
) -> None:
    host, port = _target(s3_bucket)
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", 2, MODEL, storage_options=s3_bucket.storage_options)
    clean = config_from_mapping(_config_data(s3_bucket, base, experts, "clean", s3_bucket.endpoint_url))
    run_merge(clean)
    with FaultProxy(host, port, EveryNth(4), stall_s=3.0) as proxy:
        faulty = config_from_mapping(_config_data(s3_bucket, base, experts, "faulty", proxy.endpoint_url))
        result = run_merge(faulty)
    assert result["computed"] == result["layers"] + result["groups"]
    assert set(proxy.injected) == set(FAULT_KINDS), proxy.injected
    assert proxy.faults >= 40, (proxy.requests, proxy.injected)
    print(f"faults injected and survived: {proxy.faults} of {proxy.requests} requests {dict(proxy.injected)}")
    assert _version_files(s3_bucket, "faulty") == _version_files(s3_bucket, "clean")


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("cpu_load", [False, True], ids=["idle", "cpu-load"])
def test_a_silent_store_fails_in_one_line_within_its_deadline_and_publishes_nothing(
    prefect_api: str, s3_bucket, tmp_path: Path, cpu_load: bool
) -> None:
    """Also with two busy loops per core (issue 24: the merge still ran at 150 s under load, because
    the flow waited for every queued task to meet the silent store in turn). The store goes silent at
    the merge's first layer write, with layer tasks running and queued; from then on the error must
    come within two storage deadlines (the call and its one task retry) plus clean-up."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * (os.cpu_count() or 2) if cpu_load else 0)
    ]
    try:
        _silent_store_run(prefect_api, s3_bucket, tmp_path)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def _silent_store_run(prefect_api: str, s3_bucket, tmp_path: Path) -> None:
    host, port = _target(s3_bucket)
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", 2, MODEL, storage_options=s3_bucket.storage_options)
    retry: dict[str, Any] = {"attempts": 2, "connect_timeout_s": 1.0, "read_timeout_s": 1.0}
    # silent from the merge's first layer write on: layer tasks are running and queued
    with FaultProxy(host, port, silent_from_first(f"PUT /{s3_bucket.name}/out/.swudi-work/decompositions/")) as proxy:
        data = _config_data(s3_bucket, base, experts, "out", proxy.endpoint_url, retry)
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump(data))
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}
        started = time.monotonic()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, "-m", "swudi.cli", "merge", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        ended = time.monotonic()
        wall = ended - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    first = proxy.log[0][0] if proxy.log else ended
    silent = [t for t, _, _, fault in proxy.log if fault == "silent"]
    went_silent = silent[0] if silent else ended
    timeline = (
        f"start-up to first request {first - started:.1f} s, first request to silence "
        f"{went_silent - first:.1f} s, silence to exit {ended - went_silent:.1f} s "
        f"({len(silent)} unanswered requests at +{', +'.join(f'{t - silent[0]:.1f}' for t in silent)} s); "
        f"merge process CPU {cpu:.1f} s, wall {wall:.1f} s"
    )
    print(f"silent store timeline: {timeline}")
    # Each storage call gives up after RetryPolicy.deadline_s(); a Prefect task retry repeats it
    # once (tasks/merge.py: retries=1); the rest is Python and Prefect start-up.
    storage_deadline = 2 * RetryPolicy(**retry).deadline_s()
    deadline = storage_deadline + 60
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: storage fault"), done.stderr[-3000:]
    assert silent, timeline  # the store did go silent mid-merge
    assert ended - went_silent < storage_deadline + 20, (storage_deadline, timeline)
    assert wall < deadline, (wall, deadline, timeline)
    print(f"silent store: exit 2 after {wall:.1f} s (deadline {deadline:.0f} s): {last}")
    assert proxy.injected["silent"] > 0
    assert read_latest(f"{s3_bucket.url}/out", s3_bucket.storage_options) is None
    assert list_versions(f"{s3_bucket.url}/out", s3_bucket.storage_options) == []
