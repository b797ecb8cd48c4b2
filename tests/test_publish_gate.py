"""The publish gate on real Prefect refreshes: a refresh with a damaged expert is refused (latest
unchanged, the version kept, the run Failed with the reason in its artifact, `swudi merge` exits 3);
a good refresh publishes. The evaluator is real: the distance of the merged weights to a target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from typer.testing import CliRunner

from flows.refresh import refresh
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping
from swudi.errors import GateError
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_checkpoint, write_synthetic_models
from swudi.publish.gate import check_gate
from swudi.publish.versions import is_version_complete, list_versions, read_latest
from tests.helpers.builders import write_reference_checkpoint

pytestmark = pytest.mark.slow  # four merges

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)
NAMES = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"]
EVALUATOR = "tests.helpers.evaluators:distance_to_target"
OBJECTIVE = f"{EVALUATOR}:all.closeness"


def _state(url: str) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(url)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def _replace_expert(url: str, original: dict[str, torch.Tensor], noise: float, seed: int) -> float:
    """Rewrite the expert as ``original`` + Gaussian noise of std ``noise`` on NAMES; return the
    Frobenius norm of what was added (float64)."""
    generator = torch.Generator().manual_seed(seed)
    state = dict(original)
    added = 0.0
    for name in NAMES:
        delta = noise * torch.randn(state[name].shape, generator=generator)
        state[name] = original[name] + delta
        added += float((state[name].double() - original[name].double()).pow(2).sum())
    write_checkpoint(url, state, MODEL)
    return added**0.5


def _artifact(state) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return str(next(a.data for a in artifacts if a.key and a.key.startswith("swudi-refresh-")))


def test_gate_refuses_a_damaged_refresh_and_lets_a_good_one_publish(prefect_api, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 3, MODEL)
    w0 = _state(base)
    originals = [_state(e) for e in experts]
    # the target: task arithmetic of the original experts (float64), so the first merge scores 1
    target = {n: (w0[n].double() + sum(e[n].double() - w0[n].double() for e in originals)).float() for n in NAMES}
    write_reference_checkpoint(str(tmp_path / "target"), target)
    log = tmp_path / "calls.log"
    gate = {"objective": OBJECTIVE, "at_least": 0.5, "no_worse_than": "latest", "tolerance": 0.01}
    config: dict[str, Any] = {
        "base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "task_arithmetic",
        "params": {"scale": 1.0}, "device": "cpu", "workers": 1, "gate": gate,
        "evaluators": [{"function": EVALUATOR, "options": {"target": str(tmp_path / "target"), "names": NAMES,
                                                           "log": str(log)}}],
    }  # fmt: skip
    first = refresh(config)
    assert first["status"] == "published"
    v1 = read_latest(config["output"])["version"]
    report = json.loads((tmp_path / "out" / "versions" / v1 / "merge_report.json").read_text())
    assert report["gate"]["passed"] and report["gate"]["value"] == pytest.approx(1.0, abs=1e-5)

    # a damaged expert: noise far above the task vectors
    noise = _replace_expert(experts[1], originals[1], noise=1.0, seed=1)
    state = refresh(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(GateError):
        state.result()
    assert read_latest(config["output"])["version"] == v1  # latest unchanged
    refused = [v["version"] for v in list_versions(config["output"]) if v["version"] != v1]
    assert len(refused) == 1 and is_version_complete(config["output"], refused[0])  # kept for inspection
    # merged - target = the noise: closeness 1 / (1 + ||noise||), computed here independently
    expected = 1.0 / (1.0 + noise)
    kept = json.loads((tmp_path / "out" / "versions" / refused[0] / "merge_report.json").read_text())
    assert kept["gate"]["value"] == pytest.approx(expected, rel=1e-4) and not kept["gate"]["passed"]
    markdown = _artifact(state)
    assert "refused by the publish gate" in markdown and f"latest still names `{v1}`" in markdown
    line = kept["gate"]["reason"]
    assert line in markdown and "\n" not in line
    assert line.startswith(f"gate refused the version: {OBJECTIVE} = {expected:.6g} is below at_least 0.5")
    assert f"latest version {v1}'s 1 - tolerance 0.01 = 0.99" in line

    # the same from the command line: exit 3 and the one-line reason (the version is found complete)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    run = CliRunner().invoke(app, ["merge", str(path)])
    assert run.exit_code == 3, run.output
    assert "gate refused the version" in run.output and read_latest(config["output"])["version"] == v1

    # a good refresh (the expert retrained: a small change) publishes
    small = _replace_expert(experts[1], originals[1], noise=1e-4, seed=2)
    assert 1.0 / (1.0 + small) > 0.99
    good = refresh(config)
    assert good["status"] == "published" and good["previous"] == v1
    assert read_latest(config["output"])["version"] == good["version"] != refused[0]

    # no_worse_than: base evaluates the base once (cached by its fingerprint and the evaluator)
    calls = len(log.read_text().splitlines())
    cfg = config_from_mapping({**config, "gate": {"objective": OBJECTIVE, "no_worse_than": "base"}})
    result = check_gate(cfg, good["url"])
    base_closeness = 1.0 / (
        1.0 + float(torch.sqrt(torch.stack([(target[n].double() - w0[n].double()).pow(2).sum() for n in NAMES]).sum()))
    )
    assert result.passed and result.bounds[0]["reference"] == pytest.approx(base_closeness, rel=1e-5)
    assert len(log.read_text().splitlines()) == calls + 1
    assert check_gate(cfg, good["url"]).passed
    assert len(log.read_text().splitlines()) == calls + 1
