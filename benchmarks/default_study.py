"""The default-configuration study across benchmarks: every method and study row against the default.

    python -m benchmarks.default_study encoder=docs/results/encoder/results.json lm=docs/results/lm/results.json \\
        [--default swudi_a:participation_sqrt] [--out docs/results/default-study-table.md]

Each results file is a benchmark's ``results.json`` (schema ``swudi-benchmark/1``). For every label of
kind ``method`` or ``study`` the primary metric is compared with the default's, seed by seed (the same
seed's experts): d_s = row_s - default_s, mean d and its standard error, "beyond noise" when
|mean d| > t(0.975, n-1) * SE (:func:`swudi.reporting.benchmark_report.paired_comparison`, the rule of the
benchmark reports). A change qualifies as a new default only if it is better beyond noise on every
benchmark (issue 12: "the default only if it wins on both"). Rows are matched across benchmarks by
label, with :data:`SAME_CHANGE` naming the study labels that mean the same change on different
architectures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swudi.reporting.benchmark_report import load_results, paired_comparison

# Study labels of different benchmarks that are the same change (tensor names differ by architecture).
SAME_CHANGE: dict[str, str] = {
    "study:routing=spectral_embeddings": "study: spectral on every 2-D tensor (embeddings, lm_head too)",
    "study:spectral+embed+lm_head": "study: spectral on every 2-D tensor (embeddings, lm_head too)",
    "study:routing=attention_only": "study: spectral on attention only (MLP: mean)",
    "study:attention-only": "study: spectral on attention only (MLP: mean)",
    "study:routing=mlp_only": "study: spectral on MLP only (attention: mean)",
    "study:mlp-only": "study: spectral on MLP only (attention: mean)",
}


def _by_seed(results: Mapping[str, Any], label: str) -> dict[int, float]:
    primary = results["primary"]
    return {run["seed"]: float(run["summary"][primary]) for run in results["runs"] if run["label"] == label}


def compare_with_default(results: Mapping[str, Any], default: str) -> dict[str, dict[str, Any]]:
    """{change: {"label", "mean", "delta", "se", "n", "verdict"}} for every method and study label of one
    benchmark, against ``default`` (verdict: "better", "worse", "within noise", "n/a (1 seed)", "default")."""
    higher = bool(results["metrics"][results["primary"]].get("higher_is_better", True))
    base = _by_seed(results, default)
    if not base:
        raise ValueError(f"{results.get('benchmark')}: no runs labelled {default!r} (the default)")
    labels = list(dict.fromkeys(r["label"] for r in results["runs"] if r.get("kind") in ("method", "study")))
    table: dict[str, dict[str, Any]] = {}
    for label in labels:
        row = _by_seed(results, label)
        mean = sum(row.values()) / len(row)
        if label == default:
            table[label] = {"label": label, "mean": mean, "delta": 0.0, "se": None, "n": len(row), "verdict": "default"}
            continue
        comparison = paired_comparison(row, base)
        if comparison.beyond_noise is None:
            verdict = f"n/a ({comparison.n} seed)"
        elif not comparison.beyond_noise:
            verdict = "within noise"
        else:
            verdict = "better" if (comparison.mean_diff > 0) == higher else "worse"
        table[SAME_CHANGE.get(label, label)] = {
            "label": label,
            "mean": mean,
            "delta": comparison.mean_diff,
            "se": comparison.se,
            "n": comparison.n,
            "verdict": verdict,
        }
    return table


def study_markdown(tables: Mapping[str, Mapping[str, dict[str, Any]]], primaries: Mapping[str, str]) -> str:
    """One row per change (in the union of the benchmarks' rows), per benchmark: mean, delta vs the default
    (paired mean ± SE), verdict; last column: whether the change wins beyond noise on every benchmark."""
    names = list(tables)
    changes = list(dict.fromkeys(change for table in tables.values() for change in table))
    head = ["change"] + [f"{name}: {primaries[name]} (mean)" for name in names]
    head += [f"{name}: Δ vs default (paired ± SE), verdict" for name in names] + ["wins on every benchmark"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for change in changes:
        cells = [change.replace("*", "\\*")]
        rows = [tables[name].get(change) for name in names]
        cells += [f"{row['mean']:.4f}" if row else "not run" for row in rows]
        for row in rows:
            if row is None:
                cells.append("not run")
            elif row["verdict"] == "default":
                cells.append("(the default)")
            else:
                se = f" ± {row['se']:.4f}" if row["se"] is not None else ""
                cells.append(f"{row['delta']:+.4f}{se}, {row['verdict']}")
        wins = all(row is not None and row["verdict"] == "better" for row in rows)
        cells.append("**yes**" if wins else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.default_study")
    parser.add_argument("results", nargs="+", help="NAME=path/to/results.json, one per benchmark")
    parser.add_argument("--default", default="swudi_a:participation_sqrt", help="the label of the current default")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    primaries: dict[str, str] = {}
    for item in args.results:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"{item!r}: expected NAME=path/to/results.json")
        results = load_results(Path(path))
        tables[name] = compare_with_default(results, args.default)
        primaries[name] = results["primary"]
    text = study_markdown(tables, primaries)
    print(text)
    if args.out:
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(tables, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
