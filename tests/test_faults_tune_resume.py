"""A `swudi tune` killed (SIGKILL) after some candidates were scored resumes without evaluating
them again, and publishes the same winner as an uninterrupted tune would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from swudi.publish.versions import list_versions, read_latest
from tests.test_tune_flow import EVALUATOR, NAMES, OBJECTIVE, TARGET_SCALE, _setup

pytestmark = pytest.mark.faults


def _tune(config: Path, prefect_api: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [
        sys.executable,
        "-m",
        "swudi.cli",
        "tune",
        str(config),
        "--objective",
        OBJECTIVE,
        "--minimize",
        "--grid",
        "scale=0.25,0.5,1,2",
    ]
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def test_killed_tune_resumes_from_the_cached_scores(prefect_api: str, tmp_path: Path) -> None:
    base, experts, target, _ = _setup(str(tmp_path))
    calls = tmp_path / "calls.log"
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "task_arithmetic",
        "params": {"scale": 1.0}, "device": "cpu", "workers": 1,
        "evaluators": [{"function": EVALUATOR, "options": {"target": target, "names": NAMES, "log": str(calls)}}],
    }))  # fmt: skip
    scores = tmp_path / "out" / ".swudi-work" / "scores.json"
    process = _tune(config, prefect_api, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if scores.exists() and len(json.loads(scores.read_text() or "{}")) >= 2:  # 2 candidates scored
            break
        time.sleep(0.2)
    assert process.poll() is None, (tmp_path / "first.log").read_text()
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = calls.read_text().splitlines()
    scored = [entry["model"] for entry in json.loads(scores.read_text()).values()]  # candidate labels
    assert len(scored) >= 2 and read_latest(str(tmp_path / "out")) is None

    again = _tune(config, prefect_api, tmp_path / "second.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    new = calls.read_text().splitlines()[len(before) :]
    assert base not in new  # the base was scored before the kill (WORK/evaluations)
    for label in scored:  # so were these candidates: none is evaluated again
        assert not [line for line in new if f"/staged/{label}/" in line]
    # evaluated now: the candidates not scored before the kill, and the published winner
    assert len(new) == 4 - len(scored) + 1
    latest = read_latest(str(tmp_path / "out"))
    report = json.loads((Path(latest["url"]) / "merge_report.json").read_text())
    assert report["scale"] == TARGET_SCALE and len(list_versions(str(tmp_path / "out"))) == 1
    assert [c["label"] for c in report["tuning"]["candidates"]] == ["scale-0.25", "scale-0.5", "scale-1", "scale-2"]
