"""The read floor and the artefact as the only cache, measured on the wire and in the work folder.

Inputs live on S3 (moto) behind a counting TCP proxy, the work folder and the output on local disk,
so every byte the proxy forwards is a byte read from an input checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from flows.merge import run_merge
from swudi.config.merge_config import config_from_mapping
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import read_latest
from tests.helpers.proxy import CountingProxy

pytestmark = pytest.mark.slow  # each test runs two or three merges end to end

# Big enough that HTTP framing is far below 1% of the tensor bytes (the largest tensors are 1 MiB).
BIG = SyntheticModel(layers=2, hidden=256, intermediate=1024, vocab=64, positions=16)
SMALL = SyntheticModel(layers=3, hidden=32, intermediate=64, vocab=40, positions=8)
NUM_EXPERTS = 3


def _tensor_bytes(url: str, options=None, floating_only: bool = False) -> int:
    """Tensor bytes of a checkpoint from its headers (independent of the merge's accounting); an
    expert's integer buffers are never read (they keep the base value)."""
    return sum(loc.nbytes for loc in Checkpoint.open(url, options).tensors.values()
               if not floating_only or loc.dtype in ("F32", "F16", "BF16", "F64"))


def _config(base: str, experts: list[str], out: Path, options=None, **extra):
    return config_from_mapping({"base": base, "experts": experts, "output": str(out / "out"), "method": "swudi",
                                "device": "cpu", "workers": 2, "storage_options": options or {}, **extra})


def test_first_merge_reads_each_tensor_once_and_a_new_t_or_scale_reads_no_expert(
        prefect_api: str, s3_bucket, tmp_path: Path) -> None:
    options = dict(s3_bucket.storage_options)
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", NUM_EXPERTS, BIG, storage_options=options)
    endpoint = urlparse(s3_bucket.endpoint_url)
    with CountingProxy(endpoint.hostname, endpoint.port) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url}
        tensor_bytes = [_tensor_bytes(base, options), *(_tensor_bytes(url, options, True) for url in experts)]
        proxy.reset()

        first = run_merge(_config(base, experts, tmp_path, proxied))
        wire_first = proxy.bytes_down
        io = first["io"]
        proxy.reset()
        new_t = run_merge(_config(base, experts, tmp_path, proxied, params={"t": 50.0}))
        wire_new_t = proxy.bytes_down
        proxy.reset()
        new_scale = run_merge(_config(base, experts, tmp_path, proxied, params={"t": 50.0}, scale=0.5))
        wire_new_scale = proxy.bytes_down

    # first run: every tensor of every checkpoint read exactly once, as counted by the merge...
    assert [c["tensor_bytes"] for c in io["per_checkpoint"]] == tensor_bytes
    assert [c["tensor_bytes_needed"] for c in io["per_checkpoint"]] == tensor_bytes
    expected = sum(tensor_bytes) + io["header_bytes"]
    assert io["input_bytes"] == expected
    # ...and as measured on the wire (HTTP framing and listings within 1%)
    assert expected <= wire_first <= 1.01 * expected, (wire_first, expected)

    # only t changed: decompositions reused, no expert tensor read, only the base's 2-D weights
    assert new_t["decompositions_computed"] == 0 and new_t["computed"] == new_t["layers"]
    assert new_t["io"]["per_checkpoint"][1:] and all(c["tensor_bytes"] == 0 for c in new_t["io"]["per_checkpoint"][1:])
    assert 0 < new_t["io"]["per_checkpoint"][0]["tensor_bytes"] < tensor_bytes[0]
    assert new_t["io"]["work_bytes"] > 0  # the stored decompositions
    smallest_expert_weight = min(loc.nbytes for loc in Checkpoint.open(experts[0], options).tensors.values()
                                 if len(loc.shape) == 2 and "encoder" in loc.name)
    assert wire_new_t < tensor_bytes[0] + io["header_bytes"] + smallest_expert_weight, wire_new_t

    # scale changed too: every tensor recomputed from stored decompositions and deltas, still no expert read
    assert new_scale["computed"] == new_scale["layers"] + new_scale["groups"]
    assert all(c["tensor_bytes"] == 0 for c in new_scale["io"]["per_checkpoint"][1:])
    assert wire_new_scale < tensor_bytes[0] + io["header_bytes"] + smallest_expert_weight, wire_new_scale

    report = json.loads((Path(new_scale["url"]) / "merge_report.json").read_text())
    assert report["io"]["per_checkpoint"][0]["role"] == "base"
    assert report["work_folder"]["kinds"]["decompositions"]["files"] == new_scale["layers"]
    assert report["work_folder"]["bytes"] > 0


def _merged_files(work: Path) -> list[Path]:
    return sorted((work / "merged").glob("*.safetensors"))


def test_missing_or_damaged_artefacts_are_recomputed_and_the_output_is_bit_identical(
        prefect_api: str, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), NUM_EXPERTS, SMALL)
    cfg = _config(base, experts, tmp_path, method="swudi_a")
    first = run_merge(cfg)
    work = Path(cfg.resolved_work_dir)
    layer_urls = {r["url"] for r in first["records"] if r["rank"] is not None}
    layer_files = [p for p in _merged_files(work) if str(p) in layer_urls]
    decompositions = sorted((work / "decompositions").glob("*.safetensors"))
    assert len(layer_files) == first["layers"] == len(decompositions)

    layer_files[0].unlink()  # a merged layer deleted
    layer_files[1].write_bytes(layer_files[1].read_bytes()[:-100])  # a merged layer truncated
    damaged_dec = next(p for p in decompositions
                       if str(p) == next(r["decomposition_url"] for r in first["records"]
                                         if r["url"] == str(layer_files[1])))
    damaged_dec.write_bytes(b"\x00" * 16)  # its decomposition overwritten with garbage
    (work / "prefect-results").mkdir()  # a stale folder from older versions is ignored

    again = run_merge(cfg)
    assert again["computed"] == 2, "exactly the two layers whose artefacts are gone or damaged"
    assert again["decompositions_computed"] == 1, "only the damaged decomposition is rebuilt"
    assert again["reused"] == first["layers"] + first["groups"] - 2
    assert again["io"]["per_checkpoint"][1]["tensor_bytes"] > 0

    clean = run_merge(_config(base, experts, tmp_path / "clean", method="swudi_a"))
    assert clean["version"] == again["version"]
    got, want = Path(again["url"]), Path(clean["url"])
    shards = sorted(p.name for p in want.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in got.glob("*.safetensors"))
    for name in shards:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def test_no_pickle_and_no_credentials_reach_prefect_or_the_work_folder(prefect_api: str, s3_bucket) -> None:
    options = dict(s3_bucket.storage_options)
    secret = "do-not-store-this-secret"
    options_with_secret = {**options, "secret": secret}
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", 2, SMALL, storage_options=options)
    # moto accepts any secret: the merge runs with a credential that must not be persisted
    result = run_merge(_config(base, experts, Path("unused"), options_with_secret,
                               output=f"{s3_bucket.url}/out"))
    assert result["url"].startswith("s3://")
    work_files = s3_bucket.fs.find(f"{s3_bucket.name}/out/.swudi-work")
    assert work_files and all(f.endswith(".safetensors") for f in work_files), work_files
    for path in work_files:  # artefacts are safetensors: the header is JSON, never a pickle
        head = s3_bucket.fs.cat_file(path, start=0, end=8)
        n = int.from_bytes(head, "little")
        json.loads(s3_bucket.fs.cat_file(path, start=8, end=8 + n))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def stored() -> tuple[dict, list]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result["flow_run_id"]])))
            blocks = await client.read_block_documents()
            return runs[0].parameters, [b.data for b in blocks]

    import asyncio

    parameters, blocks = asyncio.run(stored())
    assert parameters["config"]["base"] == base  # the run's parameters were stored...
    assert secret not in json.dumps(parameters, default=str)  # ...without the credential
    assert secret not in json.dumps(blocks, default=str)
    latest = read_latest(f"{s3_bucket.url}/out", options)
    assert latest is not None
    assert secret not in json.dumps(json.loads(
        s3_bucket.fs.cat_file(f"{s3_bucket.name}/out/{latest['path']}/merge_report.json")))


@pytest.mark.parametrize("method", ["swudi", "ties"])
def test_report_diagnostics_from_the_decomposition_match_the_task_vectors(
        prefect_api: str, tmp_path: Path, method: str) -> None:
    """The total interference a re-merge takes from the stored decomposition equals the one the first
    run computed from the task vectors in memory (same settings, artefact of the merge deleted)."""
    base, experts = write_synthetic_models(str(tmp_path / "in"), NUM_EXPERTS, SMALL)
    cfg = _config(base, experts, tmp_path, method=method)
    first = run_merge(cfg)
    for path in _merged_files(Path(cfg.resolved_work_dir)):
        path.unlink()
    again = run_merge(cfg)
    before = {r["names"][0]: r for r in first["records"] if r["interference"] is not None}
    after = {r["names"][0]: r for r in again["records"] if r["interference"] is not None}
    assert before and set(before) == set(after)
    for name, record in before.items():
        assert record["task_interference"] is not None and len(record["task_interference"]) == NUM_EXPERTS
        assert after[name]["interference"] == pytest.approx(record["interference"], rel=1e-4, abs=1e-7), name
    assert again["io"]["per_checkpoint"][1]["tensor_bytes"] == 0
    torch.manual_seed(0)


def test_per_task_diagnostics_can_be_skipped(prefect_api: str, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), NUM_EXPERTS, SMALL)
    result = run_merge(_config(base, experts, tmp_path, per_task_diagnostics=False))
    layers = [r for r in result["records"] if r["rank"] is not None]
    assert layers and all(r["task_interference"] is None and r["interference"] is not None for r in layers)
    default = run_merge(_config(base, experts, tmp_path / "default"))
    assert all(r["task_interference"] is not None for r in default["records"] if r["rank"] is not None)
