"""A Dask cluster of separate processes, started as an operator starts one, sharing only S3.

`dask scheduler` and two `dask worker` processes (no nanny: the worker process is the one that
dies when killed) run on loopback from the command line; the merge is `swudi merge CONFIG` in its
own process with `task_runner: {kind: dask, address: tcp://127.0.0.1:PORT}`. Inputs, work folder
and output are on S3 (moto server); workers run in another folder than the client.

The client's config holds `key`/`secret` in `storage_options`; those stay in the client process
(swudi.storage.held_options). The workers get their credentials from their own environment, as on a real
cluster, and the endpoint (a public option) with each task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.merge import run_merge
from swudi.config.merge_config import config_from_mapping
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.card import CARD_NAME
from swudi.publish.versions import MANIFEST_NAME, REPORT_NAME, read_latest
from tests.helpers.services import Service, start, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]  # a scheduler, three workers, three merges (~2-4 min)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Large enough that the merge on the cluster takes several seconds (the kill lands mid-merge).
MODEL = SyntheticModel(layers=8, hidden=128, intermediate=512, vocab=64, positions=16)
NUM_EXPERTS = 3
# On a loaded 2-core machine a worker's event loop can stall for 30-40 s while a task imports torch
# and Prefect; Dask's default 30 s comm timeout then drops the worker. Production clusters tune the
# same settings through the same environment variables.
DASK_TIMEOUTS = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "300s", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "120s"}


@dataclass
class Cluster:
    address: str
    scheduler: Service
    workers: list[Service]
    env: dict[str, str]
    tmp: Path

    @property
    def services(self) -> list[Service]:
        return [self.scheduler, *self.workers]



def _scheduler_address(scheduler_file: Path) -> str | None:
    """The address the Dask scheduler wrote to its file, once it has."""
    return json.loads(scheduler_file.read_text())["address"] if scheduler_file.exists() else None

@pytest.fixture
def cluster(prefect_api: str, tmp_path: Path) -> Iterator[Cluster]:
    """`dask scheduler` + two `dask worker --no-nanny` processes on 127.0.0.1, stopped by PID."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,  # task states are reported from the workers
        "PYTHONPATH": str(REPO),
        # the workers' own credentials (moto accepts any); the client's stay in the client
        "AWS_ACCESS_KEY_ID": "worker-key",
        "AWS_SECRET_ACCESS_KEY": "worker-secret",
    }
    env.pop("AWS_SESSION_TOKEN", None)
    env.update(DASK_TIMEOUTS)
    logs = tmp_path / "logs"
    logs.mkdir()
    scheduler_file = tmp_path / "scheduler.json"
    services: list[Service] = []
    try:
        scheduler = start(
            "dask-scheduler",
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            logs, env, tmp_path,
        )
        services.append(scheduler)
        address: str = wait_for(lambda: _scheduler_address(scheduler_file), 120, "the scheduler file", services)
        assert address.startswith("tcp://127.0.0.1:")
        services += [_worker(address, i, tmp_path, env) for i in range(2)]
        wait_for(lambda: _worker_count(address) == 2, 120, "two workers registered", services)
        cluster = Cluster(address, scheduler, services[1:], env, tmp_path)
        yield cluster
        services[:] = [scheduler, *cluster.workers]
    finally:
        for service in reversed(services):
            service.stop()


def _worker(address: str, i: int, tmp_path: Path, env: dict[str, str]) -> Service:
    """`dask worker ADDRESS --no-nanny` in a folder of its own (nothing shared with the client but S3)."""
    folder = tmp_path / f"worker-{i}"
    folder.mkdir()
    return start(f"dask-worker-{i}",
                 [str(BIN / "dask"), "worker", address, "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1",
                  "--no-dashboard", "--memory-limit", "2GB", "--name", f"w{i}", "--local-directory", str(folder)],
                 tmp_path / "logs", env, folder)


def _worker_count(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


def _published_files(output: str, options: dict[str, Any]) -> dict[str, bytes]:
    """Weights, index and config of the version ``latest`` names. Not the report and the manifest
    (timings, publish time), nor the model card: a weight resumed from a decomposition stored before
    the kill has no per-task interference (the task vectors were not in memory), so its means can
    differ."""
    import fsspec

    latest = read_latest(output, options)
    assert latest is not None, f"nothing published under {output}"
    fs = fsspec.filesystem("s3", **options, skip_instance_cache=True, use_listings_cache=False)
    folder = latest["url"].removeprefix("s3://")
    names = [p for p in fs.ls(folder, detail=False) if not p.endswith((REPORT_NAME, MANIFEST_NAME, CARD_NAME))]
    return {Path(p).name: fs.cat_file(p) for p in names}


def _merge_cli(config_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "swudi.cli", "merge", str(config_path)], env=env,
                                cwd=config_path.parent, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_dask_cluster_of_processes_on_s3_equals_threads_and_survives_a_killed_worker(
        cluster: Cluster, prefect_api: str, s3_bucket, tmp_path: Path) -> None:
    client_options = {**s3_bucket.storage_options, "key": "client-only-key", "secret": "client-only-secret"}
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", NUM_EXPERTS, MODEL,
                                           storage_options=s3_bucket.storage_options)
    # the same torch threads per task on both runners: float reductions (eigh, matmul) then run in the
    # same order and the bytes can be equal (a Dask worker's default is its cores // its threads)
    common = {"base": base, "experts": experts, "method": "swudi_a", "device": "cpu", "workers": 2,
              "torch_threads": 1, "storage_options": client_options}

    threads = config_from_mapping({**common, "output": f"{s3_bucket.url}/threads"})
    reference = run_merge(threads)
    want = _published_files(threads.output, s3_bucket.storage_options)

    dask_config: dict[str, Any] = {**common, "output": f"{s3_bucket.url}/dask",
                   "task_runner": {"kind": "dask", "address": cluster.address}}
    config_path = tmp_path / "client" / "merge.yaml"
    config_path.parent.mkdir()
    config_path.write_text(yaml.safe_dump(dask_config))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), **DASK_TIMEOUTS}
    log = tmp_path / "logs" / "swudi-merge.log"

    # First run: SIGKILL worker 0 as soon as the first merged weight is in the S3 work folder.
    merged = f"{s3_bucket.name}/dask/.swudi-work/merged"
    total = reference["layers"] + reference["groups"]
    client = _merge_cli(config_path, env, log)
    try:
        done_at_kill = wait_for(lambda: len(_listing(s3_bucket.fs, merged)), 300, "a first merged weight on S3",
                                cluster.services, poll_s=0.2)
        cluster.workers[0].kill()
        # as a nanny or Kubernetes would: a new worker process joins in place of the dead one
        cluster.workers.append(_worker(cluster.address, 2, cluster.tmp, cluster.env))
        rc = client.wait(timeout=400)
    finally:
        if client.poll() is None:
            client.kill()
    assert done_at_kill < total, "the merge had finished before the worker was killed"
    assert not cluster.workers[0].alive()
    if rc != 0:  # the run failed with its worker: run it again; it resumes from the work folder
        rerun = _merge_cli(config_path, env, log)
        assert rerun.wait(timeout=400) == 0, log.read_text()[-4000:]
    got = _published_files(dask_config["output"], s3_bucket.storage_options)

    assert read_latest(dask_config["output"], s3_bucket.storage_options)["version"] == reference["version"]
    assert sorted(got) == sorted(want) and {"model.safetensors", "config.json"} <= set(got)
    for name, data in want.items():
        assert got[name] == data, f"{name} differs between the Dask cluster and the thread runner"
    assert reference["layers"] > 0 and len(_listing(s3_bucket.fs, merged)) == total


def _listing(fs: Any, path: str) -> list[str]:
    try:
        return [p for p in fs.ls(path, detail=False, refresh=True) if p.endswith(".safetensors")]
    except FileNotFoundError:
        return []
