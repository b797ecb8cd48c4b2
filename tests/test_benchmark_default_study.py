"""benchmarks/default_study.py: every row against the default, paired over seeds, on each benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.default_study import compare_with_default, main


def _results(name: str, values: dict[str, list[float]], higher: bool = True) -> dict[str, Any]:
    runs = [
        {
            "label": label,
            "kind": "method" if not label.startswith("study:") else "study",
            "seed": seed,
            "per_task": {"a": {"score": v}},
            "summary": {"score": v},
            "merge_seconds": 1.0,
        }
        for label, seq in values.items()
        for seed, v in enumerate(seq)
    ]
    return {
        "schema": "swudi-benchmark/1",
        "benchmark": name,
        "title": name,
        "primary": "score",
        "metrics": {"score": {"higher_is_better": higher}},
        "tasks": ["a"],
        "seeds": [0, 1, 2],
        "runs": runs,
    }


def _t_verdict(row: list[float], default: list[float]) -> tuple[float, bool]:
    d = np.array(row) - np.array(default)
    se = d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), bool(abs(d.mean()) > 4.302652729911275 * se)  # t(0.975, 2)


def test_verdicts_follow_the_paired_t_rule_and_the_direction_of_the_metric() -> None:
    default = [0.80, 0.82, 0.84]
    values = {
        "swudi_a:participation_sqrt": default,
        "study:scale=1.25": [0.83, 0.851, 0.869],
        "study:init=mean": [0.82, 0.80, 0.85],
        "mean": [0.70, 0.715, 0.731],
    }
    table = compare_with_default(_results("enc", values), "swudi_a:participation_sqrt")
    assert table["swudi_a:participation_sqrt"]["verdict"] == "default"
    for label, expected in (("study:scale=1.25", "better"), ("study:init=mean", "within noise"), ("mean", "worse")):
        delta, beyond = _t_verdict(values[label], default)
        assert abs(table[label]["delta"] - delta) < 1e-12
        assert table[label]["verdict"] == expected and (expected != "within noise") == beyond
    lower = compare_with_default(_results("lm", values, higher=False), "swudi_a:participation_sqrt")
    assert lower["study:scale=1.25"]["verdict"] == "worse" and lower["mean"]["verdict"] == "better"


def test_a_change_wins_only_when_better_on_every_benchmark(tmp_path: Path) -> None:
    default = [0.80, 0.82, 0.84]
    enc = _results(
        "enc",
        {
            "swudi_a:participation_sqrt": default,
            "study:scale=1.25": [0.83, 0.851, 0.869],
            "study:routing=spectral_embeddings": [0.83, 0.851, 0.869],
        },
    )
    lm = _results(
        "lm",
        {
            "swudi_a:participation_sqrt": default,
            "study:scale=1.25": [0.83, 0.851, 0.869],
            "study:spectral+embed+lm_head": [0.80, 0.83, 0.83],
        },
    )
    paths = []
    for name, results in (("enc", enc), ("lm", lm)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(results))
        paths.append(f"{name}={path}")
    out = tmp_path / "study.md"
    assert main([*paths, "--out", str(out)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines()[2:]}
    assert rows["study:scale=1.25"].endswith("| **yes** |")
    # the same change under each benchmark's own label is one row; it wins on one benchmark only
    embed = next(line for key, line in rows.items() if "every 2-D tensor" in key)
    assert "better" in embed and "within noise" in embed and embed.endswith("| no |")
    assert json.loads(out.with_suffix(".json").read_text())["enc"]["study:scale=1.25"]["verdict"] == "better"
