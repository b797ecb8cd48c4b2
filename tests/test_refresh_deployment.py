"""The refresh deployment end to end: `swudi serve` against a real Prefect API, inputs/output on S3.

`swudi serve CONFIG` runs in a subprocess (as in production: it registers the deployment and
executes its runs in their own processes); the test triggers runs with `run_deployment` and checks
what each run did from its Prefect artifact and from the bucket (moto server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, FlowRun
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments import run_deployment

from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import (
    SyntheticModel,
    base_state_dict,
    expert_state_dict,
    write_checkpoint,
    write_synthetic_models,
)
from swudi.publish.versions import list_versions, read_latest, version_url

# a served deployment with subprocess runs (~1.5 min): the services lane
pytestmark = [pytest.mark.slow, pytest.mark.services]

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)
WEIGHT = "encoder.layer.0.attention.self.query.weight"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    name: str  # flow/deployment
    config_path: Path
    config: dict[str, Any]
    log: Path
    process: subprocess.Popen

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def trigger(self) -> tuple[Any, str]:
        """Run the deployment to the end; return the flow run and its refresh artifact's markdown."""
        run = run_deployment(self.name, timeout=300, poll_interval=1)
        assert isinstance(run, FlowRun)  # called from sync code: the run itself, not a coroutine
        assert run.state and run.state.is_completed(), f"{run.state}\n{self.log_tail()}"
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        markdown = [a.data for a in artifacts if a.key and a.key.startswith("swudi-refresh-")]
        assert len(markdown) == 1, [a.key for a in artifacts]
        return run, str(markdown[0])


@pytest.fixture
def served(prefect_api: str, s3_bucket, tmp_path: Path) -> Iterator[Served]:
    options = dict(s3_bucket.storage_options)
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", 2, MODEL, storage_options=options)
    config = {"base": base, "experts": experts, "output": f"{s3_bucket.url}/out", "method": "swudi_a",
              "device": "cpu", "workers": 1, "keep_versions": 2, "storage_options": options}
    config_path = tmp_path / "refresh.yaml"
    config_path.write_text(yaml.safe_dump(config))
    name = f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(REPO)}
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:  # run from another folder: the deployment must not depend on cwd
        process = subprocess.Popen(
            [sys.executable, "-m", "swudi.cli", "serve", str(config_path), "--name", name,
             "--cron", "0 3 * * *"], cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True)
    served = Served(f"swudi-refresh/{name}", config_path, config, log, process)
    try:
        _wait_for_deployment(served)
        yield served
    finally:
        _stop(process)


def _wait_for_deployment(served: Served, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert served.process.poll() is None, f"swudi serve exited:\n{served.log_tail()}"
            try:
                client.read_deployment_by_name(served.name)
                return
            except Exception:  # noqa: BLE001 - not registered yet
                time.sleep(1.0)
    pytest.fail(f"deployment {served.name} not registered in {timeout_s} s:\n{served.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the serve process group (runner + any flow-run process), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _latest(served: Served) -> dict[str, Any]:
    latest = read_latest(served.config["output"], served.config["storage_options"])
    assert latest is not None
    return latest


def test_scheduled_refresh_deployment_noop_then_new_version_on_changed_expert(served: Served, s3_bucket) -> None:
    options = served.config["storage_options"]
    out = served.config["output"]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(served.name)
    assert deployment.entrypoint == "flows.refresh.refresh"
    assert deployment.parameters["config"] == str(served.config_path)
    schedules = [s.schedule for s in deployment.schedules]
    assert [s.cron for s in schedules if isinstance(s, CronSchedule)] == ["0 3 * * *"] and len(schedules) == 1
    assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE

    _, markdown = served.trigger()
    assert markdown.startswith("# swudi refresh: published")
    v1 = _latest(served)["version"]
    old_weight = Checkpoint.open(version_url(out, v1), options).read(WEIGHT)
    pointer = s3_bucket.fs.cat_file(f"{s3_bucket.name}/out/latest.json")

    _, markdown = served.trigger()
    assert markdown.startswith("# swudi refresh: unchanged") and "Already up to date" in markdown
    assert s3_bucket.fs.cat_file(f"{s3_bucket.name}/out/latest.json") == pointer  # untouched

    # An expert is retrained: new bytes at the same S3 key (a new ETag).
    write_checkpoint(served.config["experts"][1], expert_state_dict(base_state_dict(MODEL), 1, seed=3),
                     MODEL, storage_options=options)
    _, markdown = served.trigger()
    assert markdown.startswith("# swudi refresh: published")
    latest = _latest(served)
    v2 = latest["version"]
    assert v2 != v1 and latest["previous"] == v1
    assert f"expert 1 {served.config['experts'][1]} changed" in markdown
    # The old version is still complete and readable beside the new one (keep_versions: 2).
    assert {v["version"] for v in list_versions(out, options)} == {v1, v2}
    torch.testing.assert_close(Checkpoint.open(version_url(out, v1), options).read(WEIGHT), old_weight)
    new_weight = Checkpoint.open(latest["url"], options).read(WEIGHT)
    assert not torch.equal(new_weight, old_weight)
    report = json.loads(s3_bucket.fs.cat_file(f"{s3_bucket.name}/out/versions/{v2}/merge_report.json"))
    assert report["version"] == v2 and report["method"] == "swudi_a"

    # The config is re-read at every run: lowering keep_versions prunes v1, never latest (v2).
    served.config_path.write_text(yaml.safe_dump({**served.config, "keep_versions": 1}))
    _, markdown = served.trigger()
    assert markdown.startswith("# swudi refresh: unchanged") and f"pruned (keep 1): {v1}" in markdown
    assert [v["version"] for v in list_versions(out, options)] == [v2] and _latest(served)["version"] == v2
