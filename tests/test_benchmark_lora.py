"""benchmarks/lora.py on a small weight: both paths run in their subprocesses and agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # three Python subprocesses importing torch


def test_small_run_prints_both_paths_and_they_agree() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/lora.py", "--shapes", "96x160", "--no-llama", "--experts", "3", "--rank", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 96x160")]
    assert [row.split("|")[2].strip() for row in rows] == ["factor", "dense", "dense / factor"]
    capped = float(rows[1].split("|")[10])
    assert capped < 1e-5  # K <= sum r_i: the same closed form on both paths
    artefacts = [float(row.split("|")[8]) for row in rows[:2]]
    assert artefacts[0] < artefacts[1]  # the factored decomposition holds no m x d sum
    assert re.search(r"sum r = 12", proc.stdout)
