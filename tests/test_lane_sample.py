"""The faults lane's sample (tests/conftest.py): CI runs `pytest -m faults --lane-sample K`, which
keeps K lane tests drawn by a printed seed, the same ones for the same seed on any machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import lane_sample

ROOT = Path(__file__).resolve().parents[1]
LANE_FILES = ["tests/test_faults_storage.py", "tests/test_input_safety.py", "tests/test_faults_credentials.py"]


def test_a_seed_names_the_same_sample_whatever_the_order() -> None:
    ids = [f"tests/test_x.py::test_{i}" for i in range(10)]
    first = lane_sample(ids, 3, "20261128")
    assert first == lane_sample(list(reversed(ids)), 3, "20261128")
    assert len(first) == 3 and set(first) <= set(ids)
    assert lane_sample(ids, 30, "x") == sorted(ids)  # more than there are: all of them
    draws = {tuple(lane_sample(ids, 3, str(seed))) for seed in range(20)}
    assert len(draws) > 1  # the seed matters


def _collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *LANE_FILES, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _collected(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith("tests/") and "::" in line)


def test_the_sample_keeps_k_lane_tests_and_prints_its_seed() -> None:
    sample = _collect("-m", "faults", "--lane-sample", "1", "--lane-seed", "abc")
    assert sample.returncode == 0, sample.stdout + sample.stderr
    picked = _collected(sample.stdout)
    assert len(picked) == 1, sample.stdout
    note = next(line for line in sample.stdout.splitlines() if line.startswith("lane sample: "))
    lane = _collected(_collect("-m", "faults").stdout)  # every `faults` test of LANE_FILES
    assert len(lane) >= 4 and picked[0] in lane
    assert note.startswith(f"lane sample: 1 of {len(lane)} lane tests, seed abc")
    assert "--lane-seed abc" in note and note.endswith(picked[0])
