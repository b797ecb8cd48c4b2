"""Subspace methods and the SVC post-filter through the merge flow (real Prefect, generated models): the
output equals the in-memory merge, and the per-task SVDs stored by the first merge serve a second
method, a new scale and a post-filter without reading an expert byte again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def _expert_bytes(result: Mapping[str, Any]) -> int:
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
    common: dict[str, Any] = {
        "base": base_url, "experts": expert_urls, "output": str(tmp_path / "out"), "device": "cpu"
    }
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

    fifth = run_merge(config_from_mapping({**common, "method": "task_arithmetic", "scale": 2.0}))
    assert fifth["version"] != fourth["version"] and _expert_bytes(fifth) == 0  # no post: another version
    _close(_published(common["output"]), merge_state_dicts(base, experts, "task_arithmetic", scale=2.0, device="cpu"))


# ------------------------------------------------------------------------------ LoRA experts
LORA: dict[str, dict[str, Any]] = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]},
}


def test_lora_experts_in_factor_space_and_the_plan(tmp_path: Path) -> None:
    """Per-task SVDs of LoRA experts come from their factors; the layer equals the in-memory merge of
    PEFT's dense experts; the plan shows the path (ACE: dense, with its reason) and the storage."""
    from swudi.core.task_svd import TaskSVDs
    from swudi.pipeline.layer_step import merge_layer
    from tests.helpers.lora import llama_config, write_adapter, write_base, write_full_expert

    config = llama_config()
    base = write_base(tmp_path / "base", config)
    dense = [write_adapter(tmp_path / name, config, seed=i + 1, **spec) for i, (name, spec) in enumerate(LORA.items())]
    common = {"base": str(tmp_path / "base"), "experts": [str(tmp_path / n) for n in LORA], "device": "cpu"}
    name = "model.layers.0.self_attn.q_proj.weight"
    m, d = base[name].shape

    cfg = config_from_mapping({**common, "output": str(tmp_path / "out"), "method": "tsv_m", "post": "svc"})
    rows = {row["name"]: row for row in describe_plan(cfg, build_plan(cfg))["tensors"]}
    assert rows[name]["path"] == "factor space" and rows[name]["task_svd_bytes"] == 4 * (m + d + 1) * (4 + 2)
    job = next(j for j in build_plan(cfg).layer_jobs if j.name == name)
    record = merge_layer(job, cfg)
    stored = list((tmp_path / "out" / ".swudi-work" / "task_svds").glob("*.safetensors"))
    svds = TaskSVDs.from_tensors(*_load(stored[0]))
    assert svds.route == "factors" and svds.ranks == [4, 2]
    want = merge_state_dicts(base, dense, "tsv_m", device="cpu")[name]
    tv = torch.stack([e[name] - base[name] for e in dense])
    want = base[name] + apply_post_filter(want - base[name], task_svds(tv, device="cpu"), "svc", device="cpu")
    got = Checkpoint.open(record.url).read(name)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float((want - base[name]).abs().max()))

    ace = config_from_mapping({**common, "output": str(tmp_path / "o2"), "method": "ace"})
    row = {r["name"]: r for r in describe_plan(ace, build_plan(ace))["tensors"]}[name]
    assert row["path"] == "dense" and "d x d system" in row["path_reason"]
    write_full_expert(tmp_path / "full", base, seed=9, config=config)
    mixed = config_from_mapping(
        {
            **common,
            "experts": [str(tmp_path / "a"), str(tmp_path / "full")],
            "output": str(tmp_path / "o3"),
            "method": "iso_c",
        }
    )
    row = {r["name"]: r for r in describe_plan(mixed, build_plan(mixed))["tensors"]}[name]
    assert row["path"] == "dense" and "full checkpoint" in row["path_reason"]
    assert row["task_svd_bytes"] == 4 * (m + d + 1) * (4 + min(m, d))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    artefact = Checkpoint.open(str(path))
    return artefact.state_dict(), dict(artefact.metadata)


def test_layer_step_on_local_and_s3_reuses_the_stored_task_svds(store) -> None:
    """One weight, no Prefect: the first subspace merge reads the experts once and stores the per-task
    SVDs; another method, a post-filter and a resume read no expert byte (local folder and S3)."""
    from swudi.pipeline.layer_step import merge_layer

    opts = store.storage_options
    base_url, expert_urls = write_synthetic_models(store.url("in"), N, MODEL, storage_options=opts)
    common = {"base": base_url, "experts": expert_urls, "output": store.url("out"), "device": "cpu"}
    common["storage_options"] = opts or {}
    base, experts = _inputs()
    name = "encoder.layer.0.attention.self.query.weight"

    def layer(**settings):
        cfg = config_from_mapping({**common, **settings})
        job = next(j for j in build_plan(cfg).layer_jobs if j.name == name)
        record = merge_layer(job, cfg)
        return record, Checkpoint.open(record.url, cfg.storage_options).read(name)

    first, got = layer(method="iso_c")
    assert first.decomposed and sum(first.bytes_read[1:]) > 0
    torch.testing.assert_close(got, merge_state_dicts(base, experts, "iso_c", device="cpu")[name])
    second, got = layer(method="cart", params={"rank_ratio": 0.3})
    assert not second.decomposed and sum(second.bytes_read[1:]) == 0 and second.work_bytes_read > 0
    want = merge_state_dicts(base, experts, "cart", device="cpu", rank_ratio=0.3)[name]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    third, _ = layer(method="ace", post="svc", post_params={"alpha": 0.5})
    assert sum(third.bytes_read[1:]) == 0
    resumed, _ = layer(method="ace", post="svc", post_params={"alpha": 0.5})
    assert (resumed.key, resumed.seconds) == (third.key, third.seconds)  # loaded: nothing recomputed
