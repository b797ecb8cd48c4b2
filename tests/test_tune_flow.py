"""`swudi tune` end to end on real Prefect: candidates merged from the stored deltas, staged in the
work folder and deleted, scores cached (a second tune evaluates nothing), only the winner published
with the tuning table; clear errors before any merge; the same on S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.tune import run_tune
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping
from swudi.errors import InputError
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import list_versions, read_latest
from swudi.storage.filesystem import join_url, resolve
from tests.helpers.builders import write_reference_checkpoint

MODEL = SyntheticModel(layers=1, hidden=32, intermediate=64, vocab=16, positions=8)
NAMES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.query.bias",
    "encoder.layer.0.intermediate.dense.weight",
]
EVALUATOR = "tests.helpers.evaluators:distance_to_target"
OBJECTIVE = f"{EVALUATOR}:all.distance"
TARGET_SCALE = 0.5


def _tensors(url: str, options=None) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(url, options)
    return {name: checkpoint.read(name).double() for name in NAMES}


def _setup(root: str, options=None) -> tuple[str, list[str], str, torch.Tensor]:
    """Base, 3 experts and a target W0 + 0.5 * sum_i tau_i (float64, written as float32): task
    arithmetic at scale s is at distance |s - 0.5| * ||sum_i tau_i|| from it. Returns the norm too."""
    base, experts = write_synthetic_models(root + "/in", 3, MODEL, storage_options=options)
    w0 = _tensors(base, options)
    taus = [_tensors(e, options) for e in experts]
    summed = {n: torch.stack([t[n] - w0[n] for t in taus]).sum(dim=0) for n in NAMES}
    target = {n: (w0[n] + TARGET_SCALE * summed[n]).float() for n in NAMES}
    write_reference_checkpoint(join_url(root, "target"), target, storage_options=options)
    norm = torch.sqrt(torch.stack([summed[n].pow(2).sum() for n in NAMES]).sum())
    return base, experts, join_url(root, "target"), norm


def _config(base, experts, target, output, log=None, options=None, evaluator_options=None):
    return config_from_mapping(
        {
            "base": base,
            "experts": experts,
            "output": output,
            "method": "task_arithmetic",
            "params": {"scale": 1.0},
            "device": "cpu",
            "workers": 1,
            "storage_options": options or {},
            "evaluators": [
                {
                    "function": EVALUATOR,
                    "options": {"target": target, "names": NAMES, "log": log, **(evaluator_options or {})},
                }
            ],
        }
    )


def test_tune_scores_candidates_from_stored_deltas_and_publishes_only_the_winner(prefect_api, tmp_path: Path):
    base, experts, target, norm = _setup(str(tmp_path))
    log = tmp_path / "calls.log"
    cfg = _config(base, experts, target, str(tmp_path / "out"), str(log))
    result = run_tune(cfg, OBJECTIVE, ["scale=0.25,1"], refine=2, minimize=True)

    rows = result["rows"]
    assert [r["stage"] for r in rows] == ["grid"] * 2 + ["refine"] * 2
    for row in rows:  # each score is the distance of W0 + s * sum tau to the target (independent formula)
        assert row["score"] == pytest.approx(abs(row["scale"] - TARGET_SCALE) * float(norm), rel=1e-4, abs=1e-5)
    # the first candidate read the experts; every later one the stored deltas only
    assert rows[0]["expert_bytes_read"] > 0
    assert [r["expert_bytes_read"] for r in rows[1:]] == [0] * 3
    assert all(r["merge_cpu_seconds"] > 0 and r["time_split"]["wall"] > 0 for r in rows)
    winner = min(rows, key=lambda r: r["score"])
    assert result["winner"]["label"] == winner["label"]
    assert abs(winner["scale"] - TARGET_SCALE) < 0.25 / 4  # the refinement beat the best grid point (0.25)
    assert result["base_score"] == pytest.approx(TARGET_SCALE * float(norm), rel=1e-4)

    # only the winner is published, as latest, and its weights are W0 + s * sum tau
    versions = list_versions(cfg.output)
    latest = read_latest(cfg.output)
    assert [v["version"] for v in versions] == [latest["version"]] == [result["published"]["version"]]
    w0, published = _tensors(base), _tensors(latest["url"])
    taus = [_tensors(e) for e in experts]
    for name in NAMES:
        expected = w0[name] + winner["scale"] * sum(t[name] - w0[name] for t in taus)
        torch.testing.assert_close(published[name], expected, rtol=0, atol=1e-5)
    report = json.loads((Path(latest["url"]) / "merge_report.json").read_text())
    assert [c["label"] for c in report["tuning"]["candidates"]] == [r["label"] for r in rows]
    assert report["tuning"]["winner"]["label"] == winner["label"] and report["scale"] == winner["scale"]
    card = (Path(latest["url"]) / "README.md").read_text()
    assert "## Tuning" in card and card.count("**winner**") == 1 and f"| {winner['label']} |" in card

    # beside the tune: results and the plot; the staging folder is gone; losers' merged artefacts too
    tune_dir = Path(cfg.resolved_work_dir) / "tune" / result["tune_id"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(result["results"]).read_text())["winner"]["label"] == winner["label"]
    assert not (tune_dir / "staged").exists()
    merged_files = list((Path(cfg.resolved_work_dir) / "merged").iterdir())
    assert len(merged_files) <= 2 * len(report["artefacts"]["merged"])  # the winner's + the config's own (scale 1)
    assert not list((Path(cfg.resolved_work_dir) / "runs").glob("tune-*.json"))  # lease released
    calls = log.read_text().splitlines()
    assert len(calls) == 1 + 4 + 1  # the base, each candidate once, the published winner's evaluation

    # run again (as after a kill): every score is read from the cache, nothing is evaluated
    again = run_tune(cfg, OBJECTIVE, ["scale=0.25,1"], refine=2, minimize=True)
    assert log.read_text().splitlines() == calls
    assert all(r["cached"] for r in again["rows"]) and [r["label"] for r in again["rows"]] == [r["label"] for r in rows]
    assert again["published"]["version"] == latest["version"] and len(list_versions(cfg.output)) == 1


def test_bad_objectives_fail_before_any_merge_and_a_non_number_after_one_releases_the_lease(prefect_api, tmp_path):
    base, experts, target, _ = _setup(str(tmp_path))
    cfg = _config(base, experts, target, str(tmp_path / "out"))
    work = Path(cfg.resolved_work_dir)
    with pytest.raises(InputError, match=r"returned no 'all.nope' .* \(it returned all.closeness, all.distance\)"):
        run_tune(cfg, f"{EVALUATOR}:all.nope", ["scale=0.5,1"], minimize=True)
    assert not (work / "merged").exists() and not (work / "deltas").exists()  # no merge started
    assert not list((work / "runs").glob("*.json"))

    # an evaluator that gives NaN on a merged model: exit 2 naming it, lease released, nothing published
    nan = "tests.helpers.evaluators:nan_unless"
    path = tmp_path / "merge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "experts": experts,
                "output": str(tmp_path / "out"),
                "method": "task_arithmetic",
                "device": "cpu",
                "workers": 1,
                "evaluators": [{"function": nan, "options": {"base": base}}],
            }
        )
    )
    run = CliRunner().invoke(app, ["tune", str(path), "--objective", f"{nan}:all.distance", "--grid", "scale=0.5,1"])
    assert run.exit_code == 2, run.output
    assert f"evaluator '{nan}' returned nan" in " ".join(run.output.split())
    assert (work / "deltas").exists()  # the first candidate was merged...
    assert not list((work / "runs").glob("*.json")) and not list((work / "tune").glob("*/staged"))
    assert read_latest(str(tmp_path / "out")) is None and not list_versions(str(tmp_path / "out"))


def test_cli_dry_run_and_empty_grid(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(tmp_path / "b"),
                "experts": [str(tmp_path / "e0"), str(tmp_path / "e1")],
                "output": str(tmp_path / "out"),
                "evaluators": [{"function": EVALUATOR, "options": {"target": "t"}}],
            }
        )
    )
    run = CliRunner().invoke(
        app,
        [
            "tune",
            str(path),
            "--objective",
            OBJECTIVE,
            "--grid",
            "scale=0.5,1",
            "--grid",
            "method=swudi_a,task_arithmetic",
            "--refine",
            "2",
            "--dry-run",
        ],
    )
    assert run.exit_code == 0, run.output
    for label in ("scale-0.5_method-swudi_a", "scale-1_method-task_arithmetic"):
        assert label in run.output
    assert "up to 2 more scales" in run.output and not (tmp_path / "out").exists()
    empty = CliRunner().invoke(app, ["tune", str(path), "--objective", OBJECTIVE])
    assert empty.exit_code == 2 and "at least one --grid" in empty.output
    unknown = CliRunner().invoke(
        app, ["tune", str(path), "--objective", "mypkg.eval:evaluate:all.acc", "--grid", "scale=1"]
    )
    assert unknown.exit_code == 2 and "is not one of the config's evaluators" in " ".join(unknown.output.split())


def test_tune_on_s3(prefect_api, s3_bucket) -> None:
    options = dict(s3_bucket.storage_options)
    root = f"{s3_bucket.url}/t"
    base, experts, target, norm = _setup(root, options)
    cfg = _config(
        base,
        experts,
        target,
        f"{root}/out",
        options=options,
        evaluator_options={"storage_options": {"endpoint_url": s3_bucket.endpoint_url}},
    )
    result = run_tune(cfg, OBJECTIVE, ["scale=0.5,1"], minimize=True)
    rows = result["rows"]
    assert [r["scale"] for r in rows] == [0.5, 1.0] and result["winner"]["scale"] == 0.5
    assert rows[0]["expert_bytes_read"] > 0 and rows[1]["expert_bytes_read"] == 0
    assert rows[1]["score"] == pytest.approx(0.5 * float(norm), rel=1e-4)
    latest = read_latest(cfg.output, options)
    assert latest["version"] == result["published"]["version"]
    fs, _ = resolve(root, options)
    assert not fs.exists(resolve(join_url(cfg.resolved_work_dir, "tune", result["tune_id"], "staged"), options)[1])
    for url in (
        result["results"],
        join_url(cfg.resolved_work_dir, "scores.json"),
        join_url(latest["url"], "merge_report.json"),
    ):
        text = fs.cat_file(resolve(url, options)[1]).decode()
        assert "testing" not in text  # no credential is written (the key and secret are "testing")
    assert fs.cat_file(resolve(result["plot"], options)[1])[:4] == b"\x89PNG"
