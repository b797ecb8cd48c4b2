"""The per-task interference means of a merge report cover every layer or are not given.

A resumed merge reuses layers whose task vectors it never read (their decomposition was stored
before the kill), so those layers carry no per-task values; a mean over the remaining layers would
describe other weights than an uninterrupted run's (docs/reliability.md). Runs the merge steps of
the library directly (no Prefect) on real safetensors files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from swudi.config.merge_config import config_from_mapping
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.pipeline.artefacts import artefact_url
from swudi.pipeline.layer_step import merge_layers
from swudi.pipeline.plan import build_plan
from swudi.pipeline.records import MERGED, MergedRecord
from swudi.pipeline.summary import summarize_layers

MODEL = SyntheticModel(layers=2, hidden=16, intermediate=32, vocab=16, positions=8)


def _record(name: str, total: float, per_task: tuple[float, ...] | None) -> MergedRecord:
    return MergedRecord(key=name, url=name, names=(name,), method="swudi_a", rank=3, kept_mass=0.9,
                        interference=total, task_interference=per_task)


def test_means_over_every_layer_and_none_when_a_layer_lacks_them() -> None:
    full = [_record("a", 0.1, (0.2, 0.4)), _record("b", 0.3, (0.6, 0.0))]
    summary = summarize_layers(full)
    assert summary["mean_interference_vs_sum_per_task"] == pytest.approx([0.4, 0.2])
    assert summary["mean_interference_vs_sum"] == pytest.approx(0.2)
    assert summary["layers_with_per_task_interference"] == 2

    partial = [*full, _record("c", 0.5, None)]
    summary = summarize_layers(partial)
    assert summary["mean_interference_vs_sum_per_task"] == []
    assert summary["layers_with_per_task_interference"] == 2
    assert summary["layers"] == 3
    assert summary["mean_interference_vs_sum"] == pytest.approx(0.3)  # the total covers every layer
    assert summary["per_layer"]["a"]["interference_vs_sum_per_task"] == [0.2, 0.4]  # kept per layer
    assert summary["per_layer"]["c"]["interference_vs_sum_per_task"] == []


def test_a_resumed_merge_reports_no_partial_per_task_means(tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, MODEL)
    config = config_from_mapping({"base": base, "experts": experts, "output": str(tmp_path / "out"),
                                  "work_dir": str(tmp_path / "work"), "method": "swudi_a", "device": "cpu",
                                  "workers": 1})
    jobs = build_plan(config).layer_jobs
    first = merge_layers(jobs, config, "first")
    fresh = summarize_layers(first)
    assert fresh["layers_with_per_task_interference"] == len(jobs)
    assert len(fresh["mean_interference_vs_sum_per_task"]) == 2

    # a kill between a weight's stored decomposition and its merge: the merged artefact is missing
    Path(artefact_url(config, MERGED, first[0].key)).unlink()
    resumed = summarize_layers(merge_layers(jobs, config, "resumed"))
    assert resumed["layers_with_per_task_interference"] == len(jobs) - 1
    assert resumed["mean_interference_vs_sum_per_task"] == []
    assert resumed["mean_interference_vs_sum"] == pytest.approx(fresh["mean_interference_vs_sum"], rel=1e-6)
