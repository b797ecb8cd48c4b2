"""benchmarks/gpu_check.py in its CPU quick mode, and the wrapper's refusal without CUDA.

The GPU itself is exercised only on a machine that has one (docs/results/gpu_check.md); here the
script must keep working end to end: the parity against the independent float64 reference passes,
the timings and the generated merge run, and the JSON holds what the results page is built from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # about 10 s and 6 s on the 2-core machine


def test_quick_cpu_run_passes_parity_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        # one torch thread: on a loaded 2-core machine two threads oversubscribe (4x slower seen)
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    result = json.loads(out.read_text())

    parity = result["parity"]
    assert parity["all_pass"] is True
    assert parity["checks"] == parity["passed"] == sum(line.startswith("PASS ") for line in lines) > 0
    assert not any(line.startswith("FAIL ") for line in lines)
    assert "parity PASS" in proc.stdout
    for what in ("eigenvalues", "theta swudi (decompose)", "theta swudi_a (merge_matrix)"):
        assert any(line.startswith("PASS ") and what in line and "cpu vs float64" in line for line in lines), what
    assert {c["route"] for c in parity["cases"]} == {"eigh", "svd"}  # both decomposition routes are checked
    assert {c["experts"] for c in parity["cases"]} == {4, 8}
    for case in parity["cases"]:
        assert set(case) >= {"shape", "experts", "route", "rank_swudi_a", "float32_floor", "checks"}
        assert case["rank_swudi_a"]["cpu"] == case["rank_swudi_a"]["float64"]

    assert set(result) >= {"settings", "environment", "parity", "timings", "merge_3b", "total_seconds"}
    assert result["settings"]["profile"] == "quick" and result["settings"]["device"] == "cpu"
    assert result["environment"]["torch"] == torch.__version__
    timings = result["timings"]["cases"]
    assert len(timings) >= 8
    for row in timings:
        assert set(row) >= {"weight", "shape", "experts", "route", "decompose_s", "filter_swudi_s", "merge_matrix_s"}
        assert row["decompose_s"] > 0 and row["peak_extra_mib"] is None  # no CUDA memory on the CPU
    merge = result["merge_3b"]
    assert merge["layers"] == merge["layers_measured"] == 2 and merge["weights_per_layer"] == 7
    assert merge["total_is_projected"] is False and merge["total_seconds"] > 0
    assert merge["seconds_per_layer_mean"] > 0 and merge["paper_seconds"] == 70.9
    assert merge["llama_3b_seconds"] is None  # the quick profile is not compared with the paper


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_wrapper_refuses_clearly_without_cuda() -> None:
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2
    assert "no interpreter with a CUDA-enabled torch" in proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout  # it says what it found
