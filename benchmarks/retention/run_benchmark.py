"""The retention benchmark: merge the experts with every method through the pipeline, evaluate.

    python -m benchmarks.retention.run_benchmark --build benchmarks/.cache/retention \\
        --out benchmarks/.cache/retention-bench [--methods ...] [--max-examples N] [--threads T]

Each method runs the real merge flow (Prefect, embedded server) on the experts' Hugging Face
checkpoints, with its own work folder so that its merge time includes its own decompositions, and
the benchmark's evaluator (``benchmarks.retention.evaluate:evaluate``) as the flow's user
evaluator: the merged encoder is scored with each task's head before the version is published.
Task arithmetic's scale is tuned on the validation split first. Re-running reuses what finished
(published versions keep their reports), so an interrupted benchmark resumes.

Writes ``OUT/results.json`` and ``OUT/results.md`` (the table for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "mean": ("mean", {}),
    "task_arithmetic": ("task_arithmetic", {}),  # scale tuned on val
    "ties": ("ties", {"density": 0.2}),
    "wudi": ("wudi", {}),
    "pinv": ("pinv", {}),
    "swudi_soft": ("swudi_soft", {}),
    "swudi": ("swudi", {}),
    "swudi_a:participation_sqrt": ("swudi_a", {"rank_rule": "participation_sqrt"}),
    "swudi_a:participation": ("swudi_a", {"rank_rule": "participation"}),
    "swudi_a:entropy": ("swudi_a", {"rank_rule": "entropy"}),
    "swudi_a:stable_rank": ("swudi_a", {"rank_rule": "stable_rank"}),
    "swudi_a:gavish_donoho": ("swudi_a", {"rank_rule": "gavish_donoho"}),
}
TA_SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _slug(label: str) -> str:
    return label.replace(":", "-")


def merge_and_evaluate(build: Path, out: Path, label: str, method: str, params: dict[str, Any],
                       tasks: list[str], split: str, max_examples: int | None,
                       threads: int | None) -> dict[str, Any]:
    """Run the merge flow with the benchmark evaluator; return the version's report."""
    from flows.merge import run_merge
    from swudi.config import config_from_mapping
    from swudi.publish_model import read_report

    options: dict[str, Any] = {"heads_dir": str(build / "heads"), "tasks": tasks, "split": split}
    if max_examples:
        options["max_examples"] = max_examples
    if threads:
        options["threads"] = threads
    cfg = config_from_mapping({
        "base": str(build / "base"),
        "experts": [str(build / "experts" / task) for task in tasks],
        "method": method, "params": params,
        "output": str(out / "merged" / _slug(label)),
        "work_dir": str(out / "work" / _slug(label)),
        "device": "cpu", "workers": 2,
        "evaluators": [{"function": "benchmarks.retention.evaluate:evaluate", "options": options}],
    }, label)
    started = time.perf_counter()
    result = run_merge(cfg)
    report = read_report(cfg.output, result["version"])
    report["wall_seconds_this_run"] = time.perf_counter() - started
    return report


def reference_accuracy(build: Path, tasks: list[str], max_examples: int | None
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """(expert, pretrained) test accuracy per task on the same examples the merges are scored on:
    each expert on its own task, the pretrained encoder on every task."""
    from benchmarks.retention.evaluate import evaluate_encoder

    heads = build / "heads"
    expert = {t: evaluate_encoder(build / "experts" / t, heads, [t], "test",
                                  max_examples=max_examples)[t]["accuracy"] for t in tasks}
    base = evaluate_encoder(build / "base", heads, tasks, "test", max_examples=max_examples)
    return expert, {t: base[t]["accuracy"] for t in tasks}


def task_accuracy(report: dict[str, Any]) -> dict[str, float]:
    metrics = report["evaluations"]["benchmarks.retention.evaluate:evaluate"]
    return {task: m["accuracy"] for task, m in metrics.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retention.run_benchmark")
    parser.add_argument("--build", type=Path, default=Path("benchmarks/.cache/retention"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/.cache/retention-bench"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every expert of the build")
    parser.add_argument("--max-examples", type=int, default=None, help="test examples per task")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from swudi.cli import prepare_prefect_environment

    prepare_prefect_environment()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    manifest = json.loads((args.build / "manifest.json").read_text())
    tasks = args.tasks or sorted(manifest["tasks"])
    expert, pretrained = reference_accuracy(args.build, tasks, args.max_examples)
    rows: dict[str, dict[str, Any]] = {
        "pretrained": {"accuracy": pretrained},
        "experts (each on its own task)": {"accuracy": expert},
    }
    tuning: dict[str, float] = {}
    for label in args.methods:
        method, params = METHODS[label]
        if label == "task_arithmetic":
            for scale in TA_SCALES:
                report = merge_and_evaluate(args.build, args.out, f"ta-val-{scale}", method,
                                            {"scale": scale}, tasks, "val", None, args.threads)
                acc = task_accuracy(report)
                tuning[str(scale)] = sum(acc.values()) / len(acc)
                print(f"task arithmetic scale {scale}: mean val accuracy {tuning[str(scale)]:.4f}", flush=True)
            best = max(TA_SCALES, key=lambda s: tuning[str(s)])
            params = {"scale": best}
            label_out = f"task_arithmetic (scale {best}, tuned on val)"
        else:
            label_out = label
        report = merge_and_evaluate(args.build, args.out, label, method, params, tasks, "test",
                                    args.max_examples, args.threads)
        rows[label_out] = {"accuracy": task_accuracy(report),
                           "merge_seconds": report["timings"].get("merge_seconds_computed", 0.0)
                           + report["timings"].get("decompose_seconds_computed", 0.0),
                           "interference": report["diagnostics"].get("mean_interference_vs_sum"),
                           "mean_rank": report["diagnostics"].get("mean_rank")}
        acc = rows[label_out]["accuracy"]
        print(f"{label_out}: mean accuracy {sum(acc.values()) / len(acc):.4f}", flush=True)

    for row in rows.values():
        acc = row["accuracy"]
        row["mean_accuracy"] = sum(acc.values()) / len(acc)
        row["mean_normalized"] = sum(acc[t] / expert[t] for t in tasks) / len(tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"tasks": tasks, "rows": rows,
                                                       "task_arithmetic_val": tuning}, indent=2))
    header = ["method", *tasks, "mean acc", "mean normalized", "merge s (CPU compute)",
              "interference vs sum"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows.items():
        cells = [label, *(f"{row['accuracy'][t]:.3f}" for t in tasks), f"{row['mean_accuracy']:.4f}",
                 f"{row['mean_normalized']:.4f}",
                 f"{row['merge_seconds']:.1f}" if row.get("merge_seconds") is not None else "",
                 f"{row['interference']:.3f}" if row.get("interference") is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
