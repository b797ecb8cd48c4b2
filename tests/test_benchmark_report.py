"""The benchmark report (swudi.reporting.benchmark_report): table statistics, the noise rule, plots, bad input, CLI.

The numbers in the results dicts are made-up inputs; every expected value is computed here
independently (numpy ddof=1, scipy's t quantile when scipy is installed, else the textbook values).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from swudi.cli.app import app
from swudi.reporting.benchmark_report import (
    BenchmarkResultsError,
    load_results,
    paired_comparison,
    t_quantile,
    write_benchmark_report,
)

TASKS = [f"task_{i}" for i in range(8)]
SEEDS = [0, 1, 2]
METHODS = [
    ("mean", 8.0),
    ("task_arithmetic", 9.0),
    ("ties", 15.0),
    ("wudi", 900.0),
    ("pinv", 40.0),
    ("swudi_soft", 60.0),
    ("swudi", 55.0),
    ("swudi_a:participation_sqrt", 50.0),
    ("swudi_a:participation", 50.0),
    ("swudi_a:entropy", 52.0),
    ("swudi_a:stable_rank", 49.0),
    ("swudi_a:gavish_donoho", 51.0),
]


def realistic_results(with_loss: bool = False, seed: int = 0) -> dict[str, Any]:
    """12 methods, 8 tasks, 3 seeds, 2 references and 2 study runs, random but plausible."""
    rng = np.random.default_rng(seed)
    metrics = {
        "normalized_accuracy": {"higher_is_better": True, "label": "normalized accuracy"},
        "accuracy": {"higher_is_better": True, "label": "accuracy"},
    }
    if with_loss:
        metrics["loss"] = {"higher_is_better": False, "label": "held-out loss (nats/token)"}
    expert_acc = {t: 0.6 + 0.3 * rng.random() for t in TASKS}
    seed_shift = {s: rng.normal(0, 0.01) for s in SEEDS}

    def run(label: str, kind: str, level: float, seconds: float | None, s: int, method: str | None) -> dict:
        per_task = {}
        for t in TASKS:
            norm = float(min(1.0, level + rng.normal(0, 0.03) + seed_shift[s]))
            entry = {"normalized_accuracy": norm, "accuracy": norm * expert_acc[t]}
            if with_loss:
                entry["loss"] = float(2.0 + 2.5 * (1 - norm) + rng.normal(0, 0.02))
            per_task[t] = entry
        summary = {m: float(np.mean([per_task[t][m] for t in TASKS])) for m in metrics}
        out: dict[str, Any] = {
            "label": label,
            "kind": kind,
            "seed": s,
            "per_task": per_task,
            "summary": summary,
            "merge_seconds": None if seconds is None else seconds * (1 + rng.normal(0, 0.05)),
        }
        if method:
            out.update(method=method, params={}, config={"scale": 1.0, "include": [], "exclude": []})
        return out

    runs = []
    for s in SEEDS:
        runs.append(run("pretrained", "reference", 0.70, None, s, None))
        runs.append(run("experts", "reference", 1.0, None, s, None))
        for i, (label, seconds) in enumerate(METHODS):
            runs.append(run(label, "method", 0.78 + 0.012 * i, seconds, s, label.split(":")[0]))
        runs.append(run("study:scale=1.25", "study", 0.90, 50.0, s, "swudi_a"))
        runs.append(run("study:include=*embed*", "study", 0.905, 70.0, s, "swudi_a"))
    return {
        "schema": "swudi-benchmark/1",
        "benchmark": "lm" if with_loss else "encoder",
        "title": "Made-up benchmark: 12 methods, 8 tasks, 3 seeds",
        "primary": "normalized_accuracy",
        "metrics": metrics,
        "tasks": TASKS,
        "seeds": SEEDS,
        "runs": runs,
    }


def small_results(values: dict[str, list[float]], kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """One run per (label, seed) with the given primary values and two tasks (task values = primary ± 0.01)."""
    runs = []
    for label, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            runs.append(
                {
                    "label": label,
                    "kind": (kinds or {}).get(label, "method"),
                    "seed": seed,
                    "method": label,
                    "per_task": {
                        "a": {"normalized_accuracy": value + 0.01},
                        "b": {"normalized_accuracy": value - 0.01},
                    },
                    "summary": {"normalized_accuracy": value},
                    "merge_seconds": 1.0 + seed,
                }
            )
    return {
        "schema": "swudi-benchmark/1",
        "benchmark": "encoder",
        "title": "small",
        "primary": "normalized_accuracy",
        "metrics": {"normalized_accuracy": {"higher_is_better": True, "label": "normalized accuracy"}},
        "tasks": ["a", "b"],
        "seeds": [0, 1, 2],
        "runs": runs,
    }


def table(md: str) -> dict[str, dict[str, str]]:
    """{row label: {column: cell}} of the markdown table in results.md."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip().replace("\\*", "*") for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def mean_std(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", cell)
    assert m, cell
    return float(m.group(1)), float(m.group(2))


# ------------------------------------------------------------------------------------- statistics
def test_t_quantile_matches_an_independent_computation() -> None:
    try:
        from scipy import stats

        expected = {df: float(stats.t.ppf(0.975, df)) for df in range(1, 31)}
    except ImportError:  # textbook two-sided 5 % values
        expected = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423}
    for df, value in expected.items():
        assert t_quantile(0.975, df) == pytest.approx(value, rel=1e-4), df


def test_table_means_and_stds_equal_numpys(tmp_path: Path) -> None:
    results = realistic_results()
    write_benchmark_report(results, tmp_path, plots=False)
    rows = table((tmp_path / "results.md").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    for label in ["pretrained", "swudi", "study:scale=1.25", "mean"]:
        runs = [r for r in results["runs"] if r["label"] == label]
        values = np.array([r["summary"]["normalized_accuracy"] for r in runs])
        mean, std = mean_std(rows[label]["normalized accuracy (mean ± std)"])
        assert mean == pytest.approx(values.mean(), abs=5e-5) and std == pytest.approx(values.std(ddof=1), abs=5e-5)
        stored = summary["labels"][label]["metrics"]["normalized_accuracy"]
        assert stored["mean"] == pytest.approx(values.mean()) and stored["std"] == pytest.approx(values.std(ddof=1))
        assert stored["n"] == 3
        for task in TASKS:
            per_task = np.array([r["per_task"][task]["normalized_accuracy"] for r in runs])
            mean, std = mean_std(rows[label][task])
            assert mean == pytest.approx(per_task.mean(), abs=5e-4)
            assert std == pytest.approx(per_task.std(ddof=1), abs=5e-4)
        seconds = [r["merge_seconds"] for r in runs if r["merge_seconds"] is not None]
        assert rows[label]["merge s (mean)"] == (f"{np.mean(seconds):.1f}" if seconds else "")
    order = list(rows)
    assert order[:2] == ["pretrained", "experts"]  # references first, then methods, then study runs
    assert all(rows[label]["kind"] == "method" for label in order[2:14])
    assert all(rows[label]["kind"] == "study" for label in order[14:])
    method_means = [mean_std(rows[label]["normalized accuracy (mean ± std)"])[0] for label in order[2:14]]
    assert method_means == sorted(method_means, reverse=True)


def test_beyond_noise_follows_the_paired_rule(tmp_path: Path) -> None:
    # best: 0.90, 0.92, 0.94. clearly: always 0.05 lower with tiny jitter (paired SE small) -> beyond.
    # noisy: differences +0.03, -0.05, +0.01 -> mean -0.0033, SE 0.0233 -> t*SE = 0.100 -> within.
    # one_seed: a single seed -> n/a.
    values = {
        "best": [0.90, 0.92, 0.94],
        "clearly": [0.85, 0.871, 0.889],
        "noisy": [0.93, 0.87, 0.95],
        "one_seed": [0.80],
    }
    write_benchmark_report(small_results(values), tmp_path, plots=False)
    md = (tmp_path / "results.md").read_text()
    rows = table(md)
    assert rows["best"]["beyond noise"] == "best"
    assert rows["clearly"]["beyond noise"] == "**yes, worse**"
    assert rows["noisy"]["beyond noise"] == "no"
    assert rows["one_seed"]["beyond noise"].startswith("n/a")
    for label in ("clearly", "noisy"):
        d = np.array(values[label]) - np.array(values["best"])
        se = d.std(ddof=1) / math.sqrt(len(d))
        expected_beyond = abs(d.mean()) > t_quantile(0.975, len(d) - 1) * se
        assert (rows[label]["beyond noise"] == "**yes, worse**") == expected_beyond
        assert rows[label]["Δ vs best (paired ± SE)"] == f"{d.mean():+.4f} ± {se:.4f}"
        comparison = paired_comparison(dict(enumerate(values[label])), dict(enumerate(values["best"])))
        assert comparison.beyond_noise == expected_beyond and comparison.se == pytest.approx(se)
    assert "Best: best" in md and "Within noise of the best: noisy" in md
    assert "4.30" in md  # the t value of 3 seeds is stated under the table


def test_lower_is_better_primary_picks_the_lowest(tmp_path: Path) -> None:
    results = small_results({"low": [1.0, 1.1, 1.2], "high": [2.0, 2.1, 2.2]})
    results["metrics"]["normalized_accuracy"]["higher_is_better"] = False
    write_benchmark_report(results, tmp_path, plots=False)
    rows = table((tmp_path / "results.md").read_text())
    assert rows["low"]["beyond noise"] == "best" and rows["high"]["beyond noise"] == "**yes, worse**"


# ------------------------------------------------------------------------------------------ plots
@pytest.mark.parametrize("with_loss", [False, True])
def test_files_exist_and_pngs_open(tmp_path: Path, with_loss: bool) -> None:
    written = write_benchmark_report(realistic_results(with_loss=with_loss), tmp_path)
    names = {p.name for p in written}
    expected = {"results.md", "summary.json", "primary.png", "per_task.png", "time_vs_primary.png"}
    assert names == expected | ({"per_task_loss.png"} if with_loss else set())
    for path in written:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_results_path_and_dict_give_the_same_report(tmp_path: Path) -> None:
    results = realistic_results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    write_benchmark_report(tmp_path / "results.json", tmp_path / "from_path", plots=False)
    write_benchmark_report(results, tmp_path / "from_dict", plots=False)
    assert (tmp_path / "from_path" / "results.md").read_text() == (tmp_path / "from_dict" / "results.md").read_text()


# -------------------------------------------------------------------------------------- bad input
def _bad(mutate) -> dict[str, Any]:
    results = copy.deepcopy(small_results({"x": [0.9, 0.91, 0.92], "y": [0.8, 0.81, 0.82]}))
    mutate(results)
    return results


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(schema="swudi-benchmark/0"), "unknown schema 'swudi-benchmark/0'"),
        (lambda r: r.pop("schema"), "missing key 'schema'"),
        (lambda r: r.update(primary="retention"), "primary metric 'retention'"),
        (lambda r: r["runs"][4]["summary"].pop("normalized_accuracy"), "run 'y' seed 1 summary: missing key"),
        (lambda r: r["runs"][5]["per_task"].pop("b"), "label 'y': runs for different task sets"),
        (lambda r: r["runs"][1].update(seed=0), "run 'x' seed 0: two runs with the same label and seed"),
        (lambda r: r["runs"][0].update(kind="baseline"), "run 'x': unknown kind 'baseline'"),
        (lambda r: r["runs"][2].update(kind="study"), "label 'x': runs of different kinds ('method' and 'study')"),
        (lambda r: r["runs"][0]["summary"].update(normalized_accuracy=float("nan")), "finite number"),
    ],
)
def test_bad_input_names_the_key_or_label(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(BenchmarkResultsError, match=re.escape(message)):
        write_benchmark_report(_bad(mutate), tmp_path)
    assert not (tmp_path / "results.md").exists()


def test_invalid_json_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(BenchmarkResultsError, match=r"results\.json: not valid JSON"):
        load_results(tmp_path / "results.json")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_report_of_a_results_file_and_of_its_folder(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps(realistic_results(with_loss=True)))
    for target, out in ((bench / "results.json", tmp_path / "a"), (bench, tmp_path / "b")):
        result = CliRunner().invoke(app, ["report", str(target), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert {p.name for p in out.iterdir()} == {
            "results.md",
            "summary.json",
            "primary.png",
            "per_task.png",
            "time_vs_primary.png",
            "per_task_loss.png",
        }
        assert str(out / "primary.png") in result.output
    assert (tmp_path / "a" / "results.md").read_text() == (tmp_path / "b" / "results.md").read_text()


def test_cli_report_of_bad_results_fails_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_bad(lambda r: r.update(schema="other/2"))))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "unknown schema 'other/2'" in result.output


def test_without_matplotlib_the_table_and_summary_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the extra does
    written = write_benchmark_report(small_results({"x": [0.9, 0.91, 0.92]}), tmp_path)
    assert [p.name for p in written] == ["results.md", "summary.json"]
    assert not list(tmp_path.glob("*.png"))
