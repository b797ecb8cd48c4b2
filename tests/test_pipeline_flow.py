"""End-to-end merge flow on a real Prefect API: output, caching, S3, Dask.

The expected output is computed independently, in memory, by ``swudi.merge_state_dicts`` on the
same (generated) checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flows.merge import run_merge
from swudi import merge_state_dicts
from swudi.config.merge_config import config_from_mapping
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, base_state_dict, expert_state_dict, write_synthetic_models
from swudi.methods.registry import MethodParams, MethodSpec, registered_method
from swudi.publish.versions import read_latest

MODEL = SyntheticModel(layers=2, hidden=32, intermediate=64, vocab=48, positions=16)
NUM_EXPERTS = 3


def _expected(method: str, scale: float = 1.0, **params) -> dict[str, torch.Tensor]:
    base = base_state_dict(MODEL)
    experts = [expert_state_dict(base, i) for i in range(NUM_EXPERTS)]
    return merge_state_dicts(base, experts, method, scale=scale, device="cpu", method_params=params)


def _published(output: str, storage_options=None) -> dict[str, torch.Tensor]:
    latest = read_latest(output, storage_options)
    assert latest is not None, "nothing published"
    ckpt = Checkpoint.open(latest["url"], storage_options)
    return ckpt.state_dict()


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _config(tmp: Path | str, base: str, experts: list[str], **overrides):
    data = {
        "base": base,
        "experts": experts,
        "output": f"{tmp}/out",
        "method": "swudi_a",
        "device": "cpu",
        "workers": 2,
        **overrides,
    }
    return config_from_mapping(data)


@pytest.fixture
def local_inputs(tmp_path: Path) -> tuple[str, list[str]]:
    return write_synthetic_models(str(tmp_path / "in"), NUM_EXPERTS, MODEL)


def test_local_merge_equals_in_memory_merge(prefect_api: str, tmp_path: Path, local_inputs) -> None:
    base, experts = local_inputs
    cfg = _config(tmp_path, base, experts, scale=0.7, max_shard_size="40KB")
    result = run_merge(cfg)
    assert result["layers"] == 2 * 6 and result["computed"] == result["layers"] + result["groups"]
    got = _published(cfg.output)
    _assert_close(got, _expected("swudi_a", scale=0.7))
    version = Path(result["url"])
    index = json.loads((version / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    with safe_open(str(version / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((version / "config.json").read_text())["hidden_size"] == MODEL.hidden
    report = json.loads((version / "merge_report.json").read_text())
    assert report["method"] == "swudi_a" and report["params"]["rank_rule"] == "participation_sqrt"
    per_layer = report["diagnostics"]["per_layer"]
    assert set(per_layer) == {j for j in got if j.startswith("encoder") and got[j].ndim == 2}
    layer = per_layer["encoder.layer.1.output.dense.weight"]
    assert len(layer["interference_vs_sum_per_task"]) == NUM_EXPERTS
    assert 0 < layer["interference_vs_sum"] < 1  # SWUDI-A interferes less than summing
    assert 1 <= layer["rank"] <= MODEL.hidden


@pytest.mark.slow
def test_rerun_computes_nothing_and_new_t_reuses_decompositions(prefect_api: str, tmp_path: Path, local_inputs) -> None:
    base, experts = local_inputs
    cfg = _config(tmp_path, base, experts, method="swudi")
    first = run_merge(cfg)
    assert first["decompositions_computed"] == first["layers"] > 0
    again = run_merge(cfg)
    assert again["computed"] == 0 and again["decompositions_computed"] == 0
    assert again["version"] == first["version"]

    new_t = _config(tmp_path, base, experts, method="swudi", params={"t": 50.0})
    third = run_merge(new_t)
    assert third["decompositions_computed"] == 0 and third["decompositions_reused"] == first["layers"]
    assert third["computed"] == third["layers"]  # only the layers, the mean-merged groups are reused
    assert third["version"] != first["version"]
    _assert_close(_published(cfg.output), _expected("swudi", t=50.0))


def test_s3_inputs_work_folder_and_output(prefect_api: str, s3_bucket) -> None:
    options = s3_bucket.storage_options
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", NUM_EXPERTS, MODEL, storage_options=options)
    cfg = _config(s3_bucket.url, base, experts, method="swudi", storage_options=options)
    result = run_merge(cfg)
    assert result["url"].startswith("s3://")
    _assert_close(_published(cfg.output, options), _expected("swudi"))
    assert s3_bucket.fs.exists(f"{s3_bucket.name}/out/.swudi-work/decompositions")
    again = run_merge(cfg)  # cache records live in the S3 work folder too
    assert again["computed"] == 0 and again["decompositions_computed"] == 0


@pytest.mark.parametrize("method", ["ties", pytest.param("wudi", marks=pytest.mark.slow)])
def test_non_spectral_methods(prefect_api: str, tmp_path: Path, local_inputs, method: str) -> None:
    base, experts = local_inputs
    params = {"iterations": 5} if method == "wudi" else {}
    cfg = _config(tmp_path, base, experts, method=method, params=params)
    run_merge(cfg)
    _assert_close(_published(cfg.output), _expected(method, **params))


@pytest.mark.services  # a local Dask cluster of worker processes (~45 s): the services lane
@pytest.mark.slow
def test_dask_runner_equals_thread_runner(prefect_api: str, tmp_path: Path, local_inputs) -> None:
    base, experts = local_inputs
    threads = _config(tmp_path / "threads", base, experts)
    dask = _config(
        tmp_path / "dask", base, experts, task_runner={"kind": "dask", "n_workers": 2, "threads_per_worker": 1}
    )
    run_merge(threads)
    result = run_merge(dask)
    assert result["computed"] == result["layers"] + result["groups"]
    got, want = _published(dask.output), _published(threads.output)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_published_files_load_with_safetensors(prefect_api: str, tmp_path: Path, local_inputs) -> None:
    base, experts = local_inputs
    cfg = _config(tmp_path, base, experts, output_dtype="bfloat16", memory_budget="1MB")  # one task at a time
    result = run_merge(cfg)
    tensors = load_file(str(Path(result["url"]) / "model.safetensors"))
    assert tensors["encoder.layer.0.attention.self.query.weight"].dtype == torch.bfloat16
    assert tensors["embeddings.position_ids"].dtype == torch.int64  # integer buffers keep the base


class _KeepTopParams(MethodParams):
    """f = level on the top ``k`` directions, 0 elsewhere."""

    k: int = 2
    level: float = 0.5


def _keep_top(eigenvalues: torch.Tensor, shape: tuple[int, int], p: _KeepTopParams) -> torch.Tensor:
    f = torch.zeros_like(eigenvalues)
    f[: p.k] = p.level
    return f


class _SignMeanParams(MethodParams):
    """theta = sign(sum) * mean |tau|."""


def _sign_mean(tv: torch.Tensor, p: _SignMeanParams) -> torch.Tensor:
    return torch.sign(tv.sum(dim=0)) * tv.abs().mean(dim=0)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(
            MethodSpec("tmp_keep_top", "spectral", _KeepTopParams, "test: f = level on the top k", filter=_keep_top),
            marks=pytest.mark.slow,
        ),
        MethodSpec(
            "tmp_sign_mean", "elementwise", _SignMeanParams, "test: elected sign x mean |tau|", merge=_sign_mean
        ),
    ],
    ids=lambda s: s.name,
)
def test_a_registered_method_merges_through_the_flow(
    prefect_api: str, tmp_path: Path, local_inputs, spec: MethodSpec
) -> None:
    """One declaration is all a new method needs: config validation, the flow and the library agree."""
    base, experts = local_inputs
    params = {"k": 3} if spec.kind == "spectral" else {}
    with registered_method(spec):
        cfg = _config(tmp_path, base, experts, method=spec.name, params=params)
        result = run_merge(cfg)
        want = _expected(spec.name, **params)
    assert result["computed"] == result["layers"] + result["groups"] > 0
    _assert_close(_published(cfg.output), want)
    theta = {k: v for k, v in want.items() if k.endswith("query.weight")}
    assert theta  # the method changed the merged weights away from the mean of the task vectors
    mean = _expected("mean")
    assert any(not torch.allclose(want[k], mean[k]) for k in theta)
