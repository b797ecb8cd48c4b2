"""Kill points: SIGKILL a real `swudi merge` at every storage mutation, then run it again.

`SWUDI_KILL_AFTER_WRITES=k` (swudi/storage/killpoints.py) makes the CLI process kill itself
with SIGKILL right after its k-th storage mutation (file staged, file committed, file or folder
deleted). An uninterrupted run traced with `SWUDI_WRITE_TRACE` gives the number of kill points
and the phase of each: plan (the run's lease), decompose, merge, publish (lock, shards, files,
report, manifest, `latest.json`), prune (the older version removed by `keep_versions: 1`).

For each kill point, starting from an output that already holds an older version:
- after the kill, `latest.json` names a complete version and every version that looks complete
  (has a manifest) is complete;
- a re-run finishes (the dead process's lock is taken over at once: same machine, pid gone) and
  publishes exactly the bytes of the uninterrupted run, prunes the older version and leaves no lock.

The default suite samples one point per phase; the full sweep is the slow lane
(`scripts/kill_point_sweep.sh`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.merge import run_merge
from swudi.config.merge_config import load_config
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import is_version_complete, list_versions, read_latest
from swudi.storage.killpoints import TRACE_ENV

MODEL = SyntheticModel(layers=2, hidden=16, intermediate=32, vocab=16, positions=8)
PHASES = ("plan", "decompose", "merge", "publish", "prune")


def _write_config(path: Path, inputs: tuple[str, list[str]], out: Path, work: Path, **extra) -> Path:
    base, experts = inputs
    data = {
        "base": base,
        "experts": experts,
        "output": str(out),
        "work_dir": str(work),
        "method": "swudi_a",
        "device": "cpu",
        "workers": 1,
        "keep_versions": 1,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(config: Path, prefect_api: str, log: Path, **env_extra: str) -> int:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING", **env_extra}
    with log.open("wb") as out:
        return subprocess.run(
            [sys.executable, "-m", "swudi.cli", "merge", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        ).returncode


def _phase(line: str, seed_version: str) -> str:
    _, event, url = line.split(" ", 2)
    if "/runs/" in url:
        return "plan"
    if "/decompositions/" in url:
        return "decompose"
    if "/merged/" in url or "/deltas/" in url:
        return "merge"
    if event == "deleted" and f"versions/{seed_version}" in url:
        return "prune"
    return "publish"


def _version_files(out: Path, version: str) -> dict[str, bytes]:
    folder = out / "versions" / version
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name not in ("swudi_version.json", "merge_report.json")
    }


@pytest.fixture(scope="module")
def scenario(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Inputs, an output seeded with an older version, and the traced uninterrupted run."""
    root = tmp_path_factory.mktemp("kill-points")
    inputs = write_synthetic_models(str(root / "in"), 2, MODEL)
    seed_out = root / "seed-out"
    seed_cfg = _write_config(root / "seed.yaml", inputs, seed_out, root / "seed-work", scale=0.5)
    seed_version = run_merge(load_config(seed_cfg))["version"]
    ref_out = root / "ref-out"
    shutil.copytree(seed_out, ref_out)
    trace = root / "trace.txt"
    config = _write_config(root / "ref.yaml", inputs, ref_out, root / "ref-work")
    os.environ[TRACE_ENV] = str(trace)  # the uninterrupted run, in this process: cheaper than a CLI
    try:
        run_merge(load_config(config))
    finally:
        del os.environ[TRACE_ENV]
    latest = read_latest(str(ref_out))
    lines = trace.read_text().splitlines()
    phases = [_phase(line, seed_version) for line in lines]
    return {
        "root": root,
        "inputs": inputs,
        "seed_out": seed_out,
        "seed_version": seed_version,
        "version": latest["version"],
        "reference": _version_files(ref_out, latest["version"]),
        "phases": phases,
        "trace": lines,
    }


def _check_kill_point(scenario: dict, prefect_api: str, k: int) -> None:
    point = scenario["root"] / f"k{k:03d}"
    out, work = point / "out", point / "work"
    shutil.copytree(scenario["seed_out"], out)
    config = _write_config(point / "merge.yaml", scenario["inputs"], out, work)
    code = _cli(config, prefect_api, point / "killed.log", SWUDI_KILL_AFTER_WRITES=str(k))
    assert code == -signal.SIGKILL, f"k={k}: exit {code}: {(point / 'killed.log').read_text()[-2000:]}"
    latest = read_latest(str(out))
    assert latest is not None and is_version_complete(str(out), latest["version"]), f"k={k}: latest incomplete"
    for version in list_versions(str(out)):  # every version with a manifest is complete
        assert is_version_complete(str(out), version["version"]), f"k={k}: {version['version']} incomplete"
    result = run_merge(load_config(config))
    assert result["version"] == scenario["version"]
    assert _version_files(out, result["version"]) == scenario["reference"], f"k={k}: output differs"
    assert [v["version"] for v in list_versions(str(out))] == [scenario["version"]], f"k={k}: not pruned"
    assert not (out / ".lock").exists(), f"k={k}: lock left behind"
    shutil.rmtree(point)


def _sample(phases: list[str]) -> list[int]:
    """One kill point per phase: the middle event of each."""
    points = []
    for phase in PHASES:
        ks = [i + 1 for i, p in enumerate(phases) if p == phase]
        points.append(ks[len(ks) // 2])
    return points


def test_killed_at_a_sample_of_points_the_rerun_is_bit_identical(scenario: dict, prefect_api: str) -> None:
    counts = Counter(scenario["phases"])
    assert all(counts[p] for p in PHASES), counts
    publish = _sample(scenario["phases"])[PHASES.index("publish")]  # one point keeps the default suite short
    _check_kill_point(scenario, prefect_api, publish)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SWUDI_KILL_SWEEP"), reason="every kill point: scripts/kill_point_sweep.sh")
@pytest.mark.timeout(4 * 3600)  # about 20 s per kill point on 2 idle cores, several times that under load
def test_killed_at_every_storage_mutation_the_rerun_is_bit_identical(scenario: dict, prefect_api: str) -> None:
    total = len(scenario["phases"])
    assert total >= 50, f"only {total} kill points"
    for k in range(1, total + 1):
        started = time.monotonic()
        _check_kill_point(scenario, prefect_api, k)
        print(
            f"kill point {k}/{total} ({scenario['phases'][k - 1]}: {scenario['trace'][k - 1].split(' ', 1)[1]}) "
            f"survived in {time.monotonic() - started:.1f} s",
            flush=True,
        )
    print(f"kill points survived: {total} {dict(Counter(scenario['phases']))}")
