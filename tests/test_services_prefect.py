"""A Prefect server, a process work pool and a worker, started as an operator starts them.

`prefect server start` on a loopback port with its own PREFECT_HOME, `prefect work-pool create`,
`prefect deploy --prefect-file deployments/prefect.yaml --all` (the refresh and the merge
deployments), `prefect worker start --pool swudi`, runs triggered with `prefect deployment run`.
Checked through the server's API: the merge publishes, a refresh with unchanged inputs is a no-op,
two refreshes triggered together run one at a time, the runs' artifacts (diagnostics table, merge
report link, progress) are there, and the worker's log names the published version. Every
process is stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.server import PrefectServer, free_port
from swudi.io.synthetic import (
    SyntheticModel,
    base_state_dict,
    expert_state_dict,
    write_checkpoint,
    write_synthetic_models,
)
from swudi.publish.versions import read_latest
from tests.helpers.services import Service, start, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]  # a server, a worker, four flow runs (~3-5 min)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = SyntheticModel(layers=2, hidden=16, intermediate=32, vocab=16, positions=8)
POOL = "swudi"  # the work pool deployments/prefect.yaml names


@dataclass
class Prefect:
    api_url: str
    env: dict[str, str]
    server: Service
    worker: Service | None
    tmp: Path

    @property
    def services(self) -> list[Service]:
        return [s for s in (self.server, self.worker) if s is not None]

    def cli(self, *args: str, timeout_s: float = 180) -> str:
        """Run ``prefect ARGS`` against this server from the project root; return its output."""
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def client(self) -> Any:
        """A sync client of this server (not the session's test harness)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


@pytest.fixture
def prefect(tmp_path: Path) -> Iterator[Prefect]:
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME; a process work pool, no worker yet."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        # a run waiting for the deployment's concurrency slot is retried every 2 s (default 30)
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PYTHONPATH": str(REPO),
    }
    for name in ("PREFECT_PROFILES_PATH", "PREFECT_API_KEY"):
        env.pop(name, None)
    logs = tmp_path / "logs"
    logs.mkdir()
    # swudi's one server starter (flows/server.py): `prefect server start` in its own process group
    starter = PrefectServer(240, attempts=1, full=True, env=env, port=port, log_path=logs / "prefect-server.log")
    starter.start()
    assert starter.process is not None
    server = Service("prefect-server", starter.process, starter.log)
    instance = Prefect(api_url, env, server, None, tmp_path)
    try:
        instance.cli("work-pool", "create", POOL, "--type", "process")
        yield instance
    finally:
        for service in reversed(instance.services):
            service.stop()
        starter.stop()


def _config(tmp: Path) -> Path:
    base, experts = write_synthetic_models(str(tmp / "in"), 2, MODEL)
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": base, "experts": experts, "output": str(tmp / "out"),
                                    "method": "swudi_a", "device": "cpu", "workers": 1, "keep_versions": 3}))
    return path


def _run(prefect: Prefect, deployment: str) -> str:
    """``prefect deployment run DEPLOYMENT`` -> the flow run id."""
    output = prefect.cli("deployment", "run", deployment)
    for token in output.replace("'", " ").split():
        try:
            return str(uuid.UUID(token))
        except ValueError:
            continue
    raise AssertionError(f"no flow run id in: {output}")


def _final(prefect: Prefect, run_id: str, timeout_s: float = 300) -> Any:
    def finished() -> Any:
        with prefect.client() as client:
            run = client.read_flow_run(uuid.UUID(run_id))
        return run if run.state and run.state.is_final() else None

    run = wait_for(finished, timeout_s, f"flow run {run_id} to finish", prefect.services, poll_s=1.0)
    assert run.state.is_completed(), f"{run.state}\n" + "\n".join(s.log_tail() for s in prefect.services)
    return run


def _artifacts(prefect: Prefect, key: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect.client() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _refresh_markdown(prefect: Prefect, run_id: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect.client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run_id)])))
    markdown = [a.data for a in found if a.key and a.key.startswith("swudi-refresh-")]
    assert len(markdown) == 1, [a.key for a in found]
    return markdown[0]


def test_work_pool_worker_runs_the_deployments_from_prefect_yaml(prefect: Prefect) -> None:
    config = _config(prefect.tmp)
    output = prefect.tmp / "out"
    deploy_env = {"SWUDI_PROJECT_DIR": str(REPO), "SWUDI_REFRESH_CONFIG": str(config),
                  "SWUDI_MERGE_CONFIG": str(config)}
    prefect.env.update(deploy_env)
    prefect.cli("deploy", "--no-prompt", "--prefect-file", "deployments/prefect.yaml", "--all")
    with prefect.client() as client:
        refresh = client.read_deployment_by_name("swudi-refresh/nightly")
        manual = client.read_deployment_by_name("swudi-merge-config/manual")
    assert refresh.work_pool_name == manual.work_pool_name == POOL
    assert refresh.parameters["config"] == manual.parameters["config"] == str(config)
    assert refresh.global_concurrency_limit and refresh.global_concurrency_limit.limit == 1

    worker_folder = prefect.tmp / "worker"
    worker_folder.mkdir()
    prefect.worker = start("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
                           prefect.tmp / "logs", prefect.env, worker_folder)

    # 1. The merge deployment publishes; the worker's log names the version.
    merge_run = _final(prefect, _run(prefect, "swudi-merge-config/manual"))
    latest = read_latest(str(output))
    assert latest is not None and merge_run.name
    version = latest["version"]
    wait_for(lambda: f"published version {version}" in prefect.worker.log.read_text(errors="replace"), 60,
             "the worker's log to name the published version", prefect.services)

    # 2. Its artifacts, through the server's API: diagnostics table, merge report link, progress.
    table = _artifacts(prefect, "swudi-layer-diagnostics")
    assert len(table) == 1
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert {row["layer"] for row in rows} >= {"encoder.layer.0.attention.self.query.weight"}
    assert all(1 <= row["rank"] <= MODEL.hidden for row in rows)
    link = _artifacts(prefect, "swudi-merge-report")
    assert len(link) == 1  # Prefect stores a link artifact as Markdown: [text](url)
    assert link[0].data == f"[merge report of version {version}]({output}/versions/{version}/merge_report.json)"
    assert json.loads((output / "versions" / version / "merge_report.json").read_text())["version"] == version
    progress = _artifacts(prefect, "swudi-merge-progress")
    assert len(progress) == 1 and progress[0].type == "progress" and float(progress[0].data) == 100.0
    with prefect.client() as client:
        task_runs = client.read_task_runs()
    names = {t.name for t in task_runs}
    assert any(n.startswith("decompose-select-rank-merge[encoder.layer.0: attention.self.query") for n in names), names

    # 3. A refresh with unchanged inputs is a no-op: latest.json is not rewritten.
    pointer = (output / "latest.json").read_bytes()
    first_refresh = _run(prefect, "swudi-refresh/nightly")
    _final(prefect, first_refresh)
    assert _refresh_markdown(prefect, first_refresh).startswith("# swudi refresh: unchanged")
    assert (output / "latest.json").read_bytes() == pointer

    # 4. An expert changes; two refreshes triggered together run one at a time.
    expert = yaml.safe_load(config.read_text())["experts"][1]
    write_checkpoint(expert, expert_state_dict(base_state_dict(MODEL), 1, seed=7), MODEL)
    ids = [_run(prefect, "swudi-refresh/nightly"), _run(prefect, "swudi-refresh/nightly")]
    runs = sorted((_final(prefect, run_id) for run_id in ids), key=lambda r: r.start_time)
    assert runs[0].end_time <= runs[1].start_time + timedelta(seconds=0), [(r.start_time, r.end_time) for r in runs]
    with prefect.client() as client:
        waited = {r.id: [s.name for s in client.read_flow_run_states(r.id)] for r in runs}
    assert any("AwaitingConcurrencySlot" in names for names in waited.values()), waited
    outcomes = [_refresh_markdown(prefect, str(r.id)).splitlines()[0] for r in runs]
    assert outcomes == ["# swudi refresh: published", "# swudi refresh: unchanged"], outcomes
    new_version = read_latest(str(output))["version"]
    assert new_version != version
    wait_for(lambda: f"published version {new_version}" in prefect.worker.log.read_text(errors="replace"), 60,
             "the worker's log to name the refreshed version", prefect.services)
