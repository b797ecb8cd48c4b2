"""Fused mixture-of-experts tensors [E, a, b] (gpt-oss: [E, in, out]) are merged as E independent
2-D weights, each its own stored decomposition (resumable per expert), not by the mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swudi.config.merge_config import MergeConfig
from swudi.io.checkpoint import TensorLocation, read_tensor
from swudi.pipeline.layer_step import merge_layer
from swudi.pipeline.merged_reader import MergedTensorReader
from swudi.pipeline.plan import build_plan, describe_plan
from tests.conformance.families import BY_NAME, build_family
from tests.conformance.reference import swudi_a

FUSED = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return build_family(BY_NAME["gpt_oss"], tmp_path_factory.mktemp("gpt_oss"))


def _config(models: tuple[Path, list[Path]], out: Path) -> MergeConfig:
    base, experts = models
    return MergeConfig(base=str(base), experts=[str(e) for e in experts], output=str(out), device="cpu")


def test_fused_experts_are_merged_one_expert_at_a_time(gpt_oss: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config = _config(gpt_oss, tmp_path / "out")
    plan = build_plan(config)
    fused = {job.name: job for job in plan.jobs}[FUSED]
    rows = {row["name"]: row for row in describe_plan(config, plan)["tensors"]}
    assert rows[FUSED]["treatment"] == "layer per expert (4)"
    assert rows[FUSED]["orientation"] == "in_out"
    assert rows["model.layers.0.mlp.experts.gate_up_proj_bias"]["treatment"] == "mean"  # [E, out] biases
    parts = [job for job in plan.layer_jobs if job.name.startswith(FUSED + "[")]
    assert [p.name for p in parts] == [f"{FUSED}[{e}]" for e in range(4)]
    assert all(group_job.name != FUSED for group in plan.group_jobs for group_job in group)

    records = [merge_layer(part, config) for part in parts]
    assert len({r.decomposition_url for r in records}) == 4  # each expert its own decomposition
    merged = MergedTensorReader(records, plan.jobs, config).tensor(FUSED).double()
    w0 = read_tensor(fused.base).double()
    experts = [read_tensor(e).double() for e in fused.experts if isinstance(e, TensorLocation)]
    assert len(experts) == 3
    assert merged.shape == w0.shape
    for e in range(4):  # expert e's weight is [in, out]: merged as its transpose
        taus = [x[e] - w0[e] for x in experts]
        torch.testing.assert_close(merged[e], w0[e] + swudi_a([t.T for t in taus]).T, rtol=1e-4, atol=1e-6)
    mean = w0 + sum(x - w0 for x in experts) / len(experts)
    assert (merged - mean).abs().max() > 1e-2 * mean.abs().max(), "merged like the mean"


def test_a_fused_tensor_resumes_per_expert(gpt_oss: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config = _config(gpt_oss, tmp_path / "out")
    parts = [job for job in build_plan(config).layer_jobs if job.name.startswith(FUSED + "[")]
    first = [merge_layer(part, config, run_id="first") for part in parts[:2]]  # then the run stops
    again = [merge_layer(part, config, run_id="second") for part in parts]
    assert [r.computed_in for r in again] == ["first", "first", "second", "second"]
    assert [r.url for r in again[:2]] == [r.url for r in first]
    work = Path(config.resolved_work_dir)
    assert len(list((work / "decompositions").glob("*.safetensors"))) == 4


def test_merge_state_dicts_merges_each_fused_expert_on_its_own() -> None:
    """The in-memory API routes a fused tensor the same way: each expert's [m, d] weight on its own."""
    from swudi import merge_state_dicts

    g = torch.Generator().manual_seed(3)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    base = {name: torch.randn(3, 6, 5, generator=g)}
    experts = [{name: base[name] + 0.1 * torch.randn(3, 6, 5, generator=g)} for _ in range(3)]
    merged = merge_state_dicts(base, experts, "swudi_a")[name].double()
    w0 = base[name].double()
    for e in range(3):
        want = w0[e] + swudi_a([x[name][e].double() - w0[e] for x in experts])
        torch.testing.assert_close(merged[e], want, rtol=1e-4, atol=1e-6)
