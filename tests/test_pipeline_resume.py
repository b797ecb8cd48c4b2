"""A merge killed with SIGKILL resumes: the re-run computes only what had not finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.merge import run_merge
from swudi.config.merge_config import load_config
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import read_latest

pytestmark = pytest.mark.slow  # kills a merge subprocess and resumes it

MODEL = SyntheticModel(layers=6, hidden=48, intermediate=96, vocab=32, positions=16)


def _artefacts(work: Path, kind: str) -> int:
    """Complete artefacts of one kind (a file appears only when it is complete: atomic rename)."""
    folder = work / kind
    return sum(1 for p in folder.glob("*.safetensors")) if folder.exists() else 0


def _write_config(path: Path, base: str, experts: list[str], output: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "experts": experts,
                "output": str(output),
                "method": "swudi_a",
                "device": "cpu",
                "workers": 1,
            }
        )
    )
    return path


def test_killed_merge_resumes_and_matches_an_uninterrupted_run(prefect_api: str, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 3, MODEL)
    config_path = _write_config(tmp_path / "merge.yaml", base, experts, tmp_path / "out")
    work = tmp_path / "out" / ".swudi-work"
    layers = MODEL.layers * 6

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "swudi.cli", "merge", str(config_path)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    try:
        while _artefacts(work, "merged") < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    merged_before = _artefacts(work, "merged")
    decomposed_before = _artefacts(work, "decompositions")
    assert 4 <= merged_before < layers, "the kill should land mid-merge"
    assert read_latest(str(tmp_path / "out")) is None, "a killed merge must not publish"

    cfg = load_config(config_path)
    resumed = run_merge(cfg)
    total = resumed["layers"] + resumed["groups"]
    assert resumed["computed"] == total - merged_before
    assert resumed["decompositions_computed"] == layers - decomposed_before
    assert resumed["reused"] == merged_before

    fresh_cfg = load_config(_write_config(tmp_path / "fresh.yaml", base, experts, tmp_path / "fresh"))
    fresh = run_merge(fresh_cfg)
    assert fresh["version"] == resumed["version"]
    resumed_dir, fresh_dir = Path(resumed["url"]), Path(fresh["url"])
    names = sorted(p.name for p in fresh_dir.iterdir() if p.name != "merge_report.json")
    assert names == sorted(p.name for p in resumed_dir.iterdir() if p.name != "merge_report.json")
    for name in names:
        if name == "swudi_version.json":
            continue  # holds the completion time
        assert (resumed_dir / name).read_bytes() == (fresh_dir / name).read_bytes(), name
