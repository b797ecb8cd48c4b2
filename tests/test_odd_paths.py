"""Paths are never glob patterns, and S3 folder markers are not files (issue 24).

A merge, ``swudi plan``, ``swudi gc`` and version pruning run on a local folder and on an S3 prefix
(moto's server) whose names hold ``[ ] * ? #``, spaces and non-ASCII; the S3 run also has zero-byte
``prefix/`` marker objects (as the S3 console's "Create folder" makes) in the input folders, the
versions folder and the work folder. Before the fix gc used the output path as a glob pattern and
deleted a kept version's artefacts; a marker was opened as a file.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.merge import run_merge
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.pipeline.records import MERGED
from swudi.pipeline.workdir import collect_garbage, list_artefacts
from swudi.publish.versions import list_versions, read_latest
from swudi.storage.filesystem import join_url, resolve

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)
ODD = "run [v1] *?# ü x"


def _marker(store, *parts: str) -> None:
    fs, path = resolve(store.url(*parts), store.storage_options)
    fs.pipe_file(path.rstrip("/") + "/", b"")  # S3: the key "prefix/" itself, zero bytes


@pytest.mark.slow
def test_merge_plan_gc_and_prune_with_glob_characters_and_folder_markers(store, prefect_api: str, tmp_path) -> None:
    base, experts = write_synthetic_models(store.url(ODD, "in"), 2, MODEL, storage_options=store.storage_options)
    output = store.url(ODD, "out")
    if store.kind == "s3":
        for parts in [(ODD, "in"), (ODD, "in", "base"), (ODD, "in", "expert-0")]:
            _marker(store, *parts)
    data = {
        "base": base,
        "experts": experts,
        "output": output,
        "method": "task_arithmetic",
        "device": "cpu",
        "workers": 1,
        "keep_versions": 5,
        "storage_options": store.storage_options or {},
    }
    first_cfg = config_from_mapping({**data, "scale": 0.5})
    assert Checkpoint.open(base, store.storage_options).extra_files == ("config.json",)
    first = run_merge(first_cfg)
    if store.kind == "s3":
        for parts in [
            (ODD, "out", "versions"),
            (ODD, "out", ".swudi-work", MERGED),
            (ODD, "out", ".swudi-work", "runs"),
        ]:
            _marker(store, *parts)
    assert [v["version"] for v in list_versions(output, store.storage_options)] == [first["version"]]
    kept = set(list_artefacts(first_cfg, MERGED))
    assert kept

    other = config_from_mapping({**data, "scale": 0.7})  # shares no merged artefact with the first
    result = collect_garbage(other, min_age_s=0)
    assert result.removed == [] and set(list_artefacts(first_cfg, MERGED)) == kept  # the kept version protects

    path = tmp_path / "merge.yaml"
    path.write_text(json.dumps(data))
    planned = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert planned.exit_code == 0, planned.output

    second = run_merge(config_from_mapping({**data, "scale": 0.7, "keep_versions": 1}))  # prunes the first
    assert [v["version"] for v in list_versions(output, store.storage_options)] == [second["version"]]
    assert read_latest(output, store.storage_options)["version"] == second["version"]
    fs, vpath = resolve(join_url(output, "versions", first["version"]), store.storage_options)
    assert not fs.exists(vpath)
    assert sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls(resolve(second["url"], store.storage_options)[1]) if not p.endswith("/")
    ) == ["README.md", "config.json", "merge_report.json", "model.safetensors", "swudi_version.json"]
