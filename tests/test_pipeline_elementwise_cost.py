"""An elementwise merge of 2-D weights does the diagnostics work that was asked for, and no more.

Its interference (per task and total) costs 2N products of m x d x min(m, d), far more than the
merge; it is computed once per weight from the task vectors in memory, and with
``per_task_diagnostics: false`` not at all. Runs the layer step of the library directly (no
Prefect) on real safetensors files; the merged tensors are the same either way and equal the
method's formula, written here in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swudi.config.merge_config import config_from_mapping
from swudi.io.synthetic import SyntheticLlama, write_synthetic_models
from swudi.pipeline.artefacts import artefact_url
from swudi.pipeline.layer_step import merge_layers
from swudi.pipeline.plan import build_plan
from swudi.pipeline.records import MERGED

MODEL = SyntheticLlama(layers=1, hidden=16, intermediate=40, heads=4, kv_heads=2, vocab=24)
NUM_EXPERTS = 3
SCALE = 0.3


def _merge(tmp_path: Path, name: str, per_task: bool) -> tuple[list, dict[str, torch.Tensor]]:
    base, experts = write_synthetic_models(str(tmp_path / "in"), NUM_EXPERTS, MODEL)
    config = config_from_mapping(
        {
            "base": base,
            "experts": experts,
            "method": "task_arithmetic",
            "params": {"scale": SCALE},
            "output": str(tmp_path / name / "out"),
            "work_dir": str(tmp_path / name / "work"),
            "device": "cpu",
            "output_dtype": "float32",
            "per_task_diagnostics": per_task,
        }
    )
    jobs = build_plan(config).layer_jobs
    records = merge_layers(jobs, config, name)
    merged = {}
    for record in records:
        merged.update(load_file(artefact_url(config, MERGED, record.key)))
    return records, merged


def _checkpoint(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "in" / name / "model.safetensors"))


def _interference(theta: torch.Tensor, taus: list[torch.Tensor]) -> list[float]:
    """L_i(theta) / L_i(sum), L_i(X) = ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2, in float64."""
    total = torch.stack(taus).sum(dim=0)
    out = []
    for tau in taus:
        merged = ((theta - tau) @ tau.T).square().sum() / tau.square().sum()
        reference = ((total - tau) @ tau.T).square().sum() / tau.square().sum()
        out.append(float(merged / reference))
    return out


def test_no_per_task_diagnostics_skips_the_interference_work(tmp_path: Path) -> None:
    skipped, merged_skipped = _merge(tmp_path, "skipped", per_task=False)
    full, merged_full = _merge(tmp_path, "full", per_task=True)
    assert len(skipped) == len(full) > 0

    # asked: per task and total, once per weight (the diagnostics phase ran), against the formula
    base = {k: v.double() for k, v in _checkpoint(tmp_path, "base").items()}
    experts = [{k: v.double() for k, v in _checkpoint(tmp_path, f"expert-{i}").items()} for i in range(NUM_EXPERTS)]
    for record in full:
        (name,) = record.names
        taus = [e[name] - base[name] for e in experts]
        expected = _interference(SCALE * torch.stack(taus).sum(dim=0), taus)
        assert record.task_interference == pytest.approx(expected, rel=1e-4), name
        assert "diagnostics" in record.phases

    # not asked: no value, no time in the diagnostics phase, the same merged tensors
    for record in skipped:
        assert record.interference is None and record.task_interference is None, record.names
        assert "diagnostics" not in record.phases, record.names
        assert record.decomposed  # the weight was read and its delta built in this step
    assert merged_skipped.keys() == merged_full.keys()
    for name, tensor in merged_skipped.items():
        assert torch.equal(tensor, merged_full[name]), name
        formula = base[name] + SCALE * torch.stack([e[name] - base[name] for e in experts]).sum(dim=0)
        torch.testing.assert_close(tensor.double(), formula, rtol=1e-5, atol=1e-6)
