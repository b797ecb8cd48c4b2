"""The work folder's lifecycle: size in plan and report, `swudi gc`, leases of running merges."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.merge import run_merge
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping, load_config
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.pipeline.records import DECOMPOSITIONS, DELTAS, MERGED, TASK_SVDS
from swudi.pipeline.workdir import LEASE_TTL_S, collect_garbage, list_artefacts, usage, write_lease
from swudi.publish.versions import read_latest

MODEL = SyntheticModel(layers=2, hidden=24, intermediate=48, vocab=32, positions=8)


def _files(work: Path, kind: str) -> set[str]:
    return {p.stem for p in (work / kind).glob("*.safetensors")}


@pytest.fixture
def setup(tmp_path: Path):
    base, experts = write_synthetic_models(str(tmp_path / "in"), 3, MODEL)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": base, "experts": experts, "output": str(tmp_path / "out"),
                                    "method": "swudi", "device": "cpu", "workers": 2, "keep_versions": 1}))
    return path


@pytest.mark.slow
def test_gc_keeps_the_current_setting_and_kept_versions_and_frees_the_rest(prefect_api: str, setup: Path) -> None:
    cfg_a = load_config(setup, ["params.t=100"])
    cfg_b = load_config(setup, ["params.t=900"])
    first = run_merge(cfg_a)
    work = Path(cfg_a.resolved_work_dir)
    merged_a = _files(work, MERGED)
    second = run_merge(cfg_b)  # keep_versions=1 prunes version A; its merged layers are now garbage
    report_b = json.loads((Path(second["url"]) / "merge_report.json").read_text())
    needed_b = set(report_b["artefacts"][MERGED])
    only_a = merged_a - needed_b
    assert len(only_a) == first["layers"]  # groups (mean) are shared between the two settings

    young = collect_garbage(cfg_b, min_age_s=3600)  # everything is younger than an hour: nothing goes
    assert young.removed == [] and young.young_files == first["layers"]

    dry = collect_garbage(cfg_b, min_age_s=0, dry_run=True)
    assert sorted(dry.removed) == sorted(f"merged/{k}.safetensors" for k in only_a)
    assert _files(work, MERGED) == merged_a | needed_b  # a dry run deletes nothing
    before = usage(cfg_b)["bytes"]
    result = collect_garbage(cfg_b, min_age_s=0)
    assert sorted(result.removed) == sorted(dry.removed)
    assert _files(work, MERGED) == needed_b
    assert usage(cfg_b)["bytes"] == before - result.freed_bytes and result.freed_bytes > 0
    assert len(_files(work, DECOMPOSITIONS)) == first["layers"]  # the current setting needs them

    again = run_merge(cfg_b)  # nothing the current setting needs was removed
    assert again["computed"] == 0
    back = run_merge(cfg_a)  # the removed setting: merges recomputed from the kept decompositions
    assert back["computed"] == first["layers"] and back["decompositions_computed"] == 0


def test_gc_keeps_artefacts_of_a_kept_version_and_of_live_leases_only(prefect_api: str, setup: Path) -> None:
    cfg = load_config(setup, ["keep_versions=5", "params.t=100"])
    run_merge(cfg)
    work = Path(cfg.resolved_work_dir)
    stored = {kind: _files(work, kind) for kind in (MERGED, DECOMPOSITIONS, DELTAS, TASK_SVDS)}
    other = load_config(setup, ["keep_versions=5", "method=ties"])  # a setting that shares nothing
    result = collect_garbage(other, min_age_s=0)
    assert result.removed == []  # version t=100 is kept, and its report names every artefact
    latest = read_latest(cfg.output)
    report = json.loads((Path(latest["url"]) / "merge_report.json").read_text())
    assert {k: set(v) for k, v in report["artefacts"].items()} == stored

    # without the version, only a lease protects the artefacts; an expired lease does not
    import shutil

    shutil.rmtree(Path(cfg.output) / "versions")
    (Path(cfg.output) / "latest.json").unlink()
    write_lease(other, "running-merge", {MERGED: stored[MERGED]})
    kept = collect_garbage(other, min_age_s=0)
    assert _files(work, MERGED) == stored[MERGED] and _files(work, DECOMPOSITIONS) == set()
    assert len(kept.removed) == len(stored[DECOMPOSITIONS]) + len(stored[DELTAS] - _files(work, DELTAS))
    lease = work / "runs" / "running-merge.json"
    body = json.loads(lease.read_text())
    body["created"] = time.time() - LEASE_TTL_S - 1
    lease.write_text(json.dumps(body))
    collect_garbage(other, min_age_s=0)
    assert _files(work, MERGED) == set()


def test_gc_during_a_running_merge_never_breaks_it(prefect_api: str, setup: Path, tmp_path: Path) -> None:
    cfg = load_config(setup, ["params.t=300"])
    other = load_config(setup, ["method=ties"])  # gc on behalf of a different setting
    stop = threading.Event()
    removed: list[str] = []

    def collect() -> None:
        while not stop.is_set():
            removed.extend(collect_garbage(other, min_age_s=0).removed)
            time.sleep(0.05)

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        result = run_merge(cfg)
    finally:
        stop.set()
        collector.join()
    assert result["computed"] == result["layers"] + result["groups"]
    fresh = run_merge(config_from_mapping({**cfg.model_dump(), "output": str(tmp_path / "fresh"),
                                           "work_dir": str(tmp_path / "fresh-work")}))
    got = Checkpoint.open(result["url"]).state_dict()
    want = Checkpoint.open(fresh["url"]).state_dict()
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in want)
    assert not list((Path(cfg.resolved_work_dir) / "runs").glob("*.json"))  # the lease is gone


def test_plan_and_gc_commands_show_the_work_folder(prefect_api: str, setup: Path) -> None:
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", str(setup), "--json"])
    assert planned.exit_code == 0, planned.output
    state = json.loads(planned.stdout)["work_folder"]
    assert state["files"] == 0 and state["stored"][MERGED] == 0 and state["needed"][MERGED] > 0
    run_merge(load_config(setup))
    planned = runner.invoke(app, ["plan", str(setup), "--json"])
    state = json.loads(planned.stdout)["work_folder"]
    assert state["stored"] == state["needed"] and state["bytes"] > 0
    cfg = load_config(setup)
    assert state["bytes"] == sum(v["size"] for kind in (MERGED, DECOMPOSITIONS, DELTAS)
                                 for v in list_artefacts(cfg, kind).values())
    collected = runner.invoke(app, ["gc", str(setup), "--min-age", "0"])
    assert collected.exit_code == 0, collected.output
    assert "removed 0 artefacts" in collected.output
