"""The refresh flow on a local output: no-op detection, what-changed, retention that spares `latest`.

Runs the flow in-process against the session's Prefect API (``prefect_api``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.refresh import refresh
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import (
    SyntheticModel,
    base_state_dict,
    expert_state_dict,
    write_checkpoint,
    write_synthetic_models,
)
from swudi.publish.versions import list_versions, read_latest

pytestmark = pytest.mark.slow  # several refresh flow runs per test

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)


def run(config: dict[str, Any], **overrides: Any) -> tuple[dict[str, Any], str]:
    """Run the refresh flow; return its result and its refresh artifact's markdown."""
    state = refresh({**config, **overrides}, return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    markdown = [a.data for a in artifacts if a.key and a.key.startswith("swudi-refresh-")]
    assert len(markdown) == 1, f"expected one refresh artifact, got {[a.key for a in artifacts]}"
    return result, str(markdown[0])


def versions(output: str) -> set[str]:
    return {v["version"] for v in list_versions(output, include_incomplete=True)}


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, MODEL)
    return {"base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "swudi",
            "device": "cpu", "workers": 1}


def test_refresh_is_a_noop_when_nothing_changed_and_republishes_on_change(prefect_api: str, config,
                                                                         tmp_path: Path) -> None:
    first, _ = run(config)
    assert first["status"] == "published" and first["previous"] is None and first["new_version"]
    assert first["changes"] == ["nothing published yet"]
    latest_file = Path(config["output"]) / "latest.json"
    pointer_bytes = latest_file.read_bytes()

    again, markdown = run(config)
    assert again["status"] == "unchanged"
    assert again["version"] == again["previous"] == first["version"]
    assert "Already up to date" in markdown and first["version"] in markdown
    assert latest_file.read_bytes() == pointer_bytes  # the pointer was not even rewritten
    assert versions(config["output"]) == {first["version"]}

    # A damaged published version (a shard deleted by hand) is not "up to date": it is written again.
    (Path(first["url"]) / "model.safetensors").unlink()
    repaired, _ = run(config)
    assert repaired["status"] == "published" and repaired["version"] == first["version"]
    assert repaired["new_version"] and "incomplete" in repaired["changes"][0]
    assert repaired["computed"] == 0  # every merged tensor came from the work folder's cache
    assert (Path(first["url"]) / "model.safetensors").is_file()

    # Retrain expert 1 (new bytes at the same URL): a new version, only what it touches recomputed.
    base = base_state_dict(MODEL)
    write_checkpoint(config["experts"][1], expert_state_dict(base, 1, seed=5), MODEL)
    changed, markdown = run(config)
    assert changed["status"] == "published" and changed["new_version"]
    assert changed["previous"] == first["version"] != changed["version"]
    assert changed["changes"] == [f"expert 1 {config['experts'][1]} changed"]
    assert "expert 1" in markdown and "What changed" in markdown
    assert read_latest(config["output"])["version"] == changed["version"]
    assert versions(config["output"]) == {first["version"], changed["version"]}
    report = json.loads((Path(changed["url"]) / "merge_report.json").read_text())
    assert report["version"] == changed["version"] and report["inputs"]["experts"][1]["url"] == config["experts"][1]
    assert {"rank", "kept_mass"} <= set(next(iter(report["diagnostics"]["per_layer"].values())))
    assert report["software"]["merge_code"] and report["software"]["decomposition_code"] and report["timings"]


def test_retention_on_the_refresh_path_never_deletes_the_pointed_version(prefect_api: str, config) -> None:
    out = config["output"]
    v1 = run(config, params={"t": 100.0})[0]["version"]
    v2 = run(config, params={"t": 200.0})[0]["version"]
    v3 = run(config, params={"t": 300.0})[0]["version"]
    assert len({v1, v2, v3}) == 3 and versions(out) == {v1, v2, v3}

    # Lowering keep_versions applies at the next refresh even when nothing changed.
    noop, _ = run(config, params={"t": 300.0}, keep_versions=2)
    assert noop["status"] == "unchanged" and noop["pruned"] == [v1]
    assert versions(out) == {v2, v3}

    # Back to t=200: v2 is complete, so only the pointer moves to it; with keep_versions=1 the
    # newest version (v3) is kept and so is v2, older but named by latest.
    back, markdown = run(config, params={"t": 200.0}, keep_versions=1)
    assert back["status"] == "published" and back["version"] == v2 and not back["new_version"]
    assert back["computed"] == 0 and "only `latest.json` moved" in markdown
    assert read_latest(out)["version"] == v2
    assert versions(out) == {v2, v3} and back["pruned"] == []
    ckpt = Checkpoint.open(read_latest(out)["url"])
    assert torch.isfinite(ckpt.read("encoder.layer.0.attention.self.query.weight")).all()
