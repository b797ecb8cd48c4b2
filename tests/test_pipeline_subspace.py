"""Subspace methods and the SVC post-filter through the merge flow (real Prefect, generated models): the
output equals the in-memory merge, and the per-task SVDs stored by the first merge serve a second
method, a new scale and a post-filter without reading an expert byte again."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flows.merge import run_merge
from swudi import merge_state_dicts
from swudi.config.merge_config import config_from_mapping
from swudi.core.task_svd import task_svds
from swudi.core.task_vectors import stack_task_vectors
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, base_state_dict, expert_state_dict, write_synthetic_models
from swudi.methods import apply_post_filter
from swudi.pipeline.plan import build_plan, describe_plan
from swudi.publish.versions import read_latest

MODEL = SyntheticModel(layers=1, hidden=32, intermediate=48, vocab=16, positions=8)
N = 3


def _inputs() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = base_state_dict(MODEL)
    return base, [expert_state_dict(base, i) for i in range(N)]


def _published(output: str) -> dict[str, torch.Tensor]:
    latest = read_latest(output)
    assert latest is not None
    return Checkpoint.open(latest["url"]).state_dict()


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _expert_bytes(result: dict) -> int:
    return sum(c["tensor_bytes"] for c in result["io"]["per_checkpoint"] if c["role"].startswith("expert"))


def _with_svc(merged: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """SVC applied by hand to every 2-D weight the method merged: W0 + scale * svc(theta)."""
    base, experts = _inputs()
    out = dict(merged)
    for name, w0 in base.items():
        if w0.ndim != 2 or not name.startswith("encoder"):
            continue
        theta = (merged[name] - w0) / scale
        tv = stack_task_vectors(w0, [e[name] for e in experts], name)
        out[name] = w0 + scale * apply_post_filter(theta, task_svds(tv, device="cpu"), "svc", device="cpu")
    return out


def test_subspace_methods_and_post_filter_through_the_flow(prefect_api: str, tmp_path: Path) -> None:
    base_url, expert_urls = write_synthetic_models(str(tmp_path / "in"), N, MODEL)
    common = {"base": base_url, "experts": expert_urls, "output": str(tmp_path / "out"), "device": "cpu"}
    base, experts = _inputs()

    first = run_merge(config_from_mapping({**common, "method": "iso_cts"}))
    assert _expert_bytes(first) > 0
    _close(_published(common["output"]), merge_state_dicts(base, experts, "iso_cts", device="cpu"))
    stored = list((tmp_path / "out" / ".swudi-work" / "task_svds").glob("*.safetensors"))
    assert len(stored) == first["layers"]

    second = run_merge(config_from_mapping({**common, "method": "tsv_m", "scale": 0.5}))
    assert _expert_bytes(second) == 0 and second["io"]["work_bytes"] > 0  # from the stored task SVDs
    _close(_published(common["output"]), merge_state_dicts(base, experts, "tsv_m", scale=0.5, device="cpu"))
    report = json.loads((Path(second["url"]) / "merge_report.json").read_text())
    layer = report["diagnostics"]["per_layer"]["encoder.layer.0.output.dense.weight"]
    assert len(layer["interference_vs_sum_per_task"]) == N  # from the task SVDs, no task vector read

    cfg = config_from_mapping({**common, "method": "task_arithmetic", "post": "svc"})
    third = run_merge(cfg)
    assert _expert_bytes(third) > 0  # task arithmetic's deltas need the task vectors once
    want = _with_svc(merge_state_dicts(base, experts, "task_arithmetic", device="cpu"), 1.0)
    _close(_published(common["output"]), want)
    summary = describe_plan(cfg, build_plan(cfg))
    assert summary["post"] == "svc" and summary["estimated_task_svd_bytes"] > 0

    fourth = run_merge(config_from_mapping({**common, "method": "task_arithmetic", "post": "svc", "scale": 2.0}))
    assert _expert_bytes(fourth) == 0  # stored deltas + stored task SVDs
    want = _with_svc(merge_state_dicts(base, experts, "task_arithmetic", scale=2.0, device="cpu"), 2.0)
    _close(_published(common["output"]), want)
