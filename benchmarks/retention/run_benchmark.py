"""The discriminative encoder benchmark: merge the experts of every seed with every method through
the pipeline, score the merged encoder with each expert's own head, write the shared results format.

    python -m benchmarks.retention.run_benchmark --build benchmarks/.cache/encoder \\
        --out benchmarks/.cache/encoder-bench [--seeds 0 1 2] [--methods ...] [--study ...] \\
        [--max-examples 400] [--val-examples 200] [--threads 1] [--report-dir docs/results/encoder]

``--build`` is the folder of ``build_experts`` (one complete build per seed in ``seed<k>/``).
Each method row runs the real merge flow (:func:`flows.merge.run_merge`, Prefect) on that seed's
expert checkpoints, in its own work folder so that its merge time includes its own
decompositions, with the benchmark's evaluator (``benchmarks.retention.evaluate:evaluate``) as the
flow's user evaluator: the merged encoder is scored with each expert's head before the version is
published. Study rows (``study:<what>``, the default-configuration grid) reuse the work folder of
the ``swudi_a`` default row where their routing is the same (so their merge time leaves out the
decompositions), and get their own where the routing differs.

Task arithmetic's scale is tuned per seed on the validation split (first ``--val-examples`` of each
task) over :data:`TA_SCALES`, with :func:`swudi.core.state_dict.merge_state_dicts` in this process (the
same merge the flow runs), and the chosen scale then runs through the flow on the test split.

``OUT/results.json`` follows the shared ``swudi-benchmark/1`` format and is written after every run;
a re-run skips the (label, seed) pairs it already holds, so an interrupted benchmark resumes.
Merged weights are deleted once scored (their ``merge_report.json`` stays).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .experts import seed_dir

EVALUATOR = "benchmarks.retention.evaluate:evaluate"
DEFAULT = ("swudi_a", {"rank_rule": "participation_sqrt"})

METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # in the order they run (cheapest evidence first)
    "task_arithmetic": ("task_arithmetic", {}),  # scale tuned on val
    "mean": ("mean", {}),
    "ties": ("ties", {"density": 0.2}),
    "pinv": ("pinv", {}),
    "swudi_soft": ("swudi_soft", {}),
    "swudi": ("swudi", {}),
    "swudi_a:participation_sqrt": DEFAULT,
    "swudi_a:participation": ("swudi_a", {"rank_rule": "participation"}),
    "swudi_a:entropy": ("swudi_a", {"rank_rule": "entropy"}),
    "swudi_a:stable_rank": ("swudi_a", {"rank_rule": "stable_rank"}),
    "swudi_a:gavish_donoho": ("swudi_a", {"rank_rule": "gavish_donoho"}),
    "wudi": ("wudi", {}),
    "optmerge": ("optmerge", {}),
}
DEFAULT_METHODS = list(METHODS)

# BERT tensor names: encoder.layer.N.attention.{self.query,self.key,self.value,output.dense} and the
# MLP encoder.layer.N.intermediate.dense / encoder.layer.N.output.dense.
MLP_PATTERNS = ["*.intermediate.dense.*", "*layer.[0-9].output.dense.*", "*layer.[0-9][0-9].output.dense.*"]
# The default study (shared with the LM benchmark): label -> (method, params, config overrides).
# Note on include: a non-empty include restricts the method to the matching tensors (swudi.core.routing
# rule 4), so "spectral on embeddings too" is include ["*"] (every 2-D tensor), not ["*embed*"].
STUDY: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "study:routing=spectral_embeddings": (*DEFAULT, {"include": ["*"]}),
    "study:routing=attention_only": (*DEFAULT, {"exclude": MLP_PATTERNS}),
    "study:routing=mlp_only": (*DEFAULT, {"exclude": ["*.attention.*"]}),
    "study:scale=0.8": (*DEFAULT, {"scale": 0.8}),
    "study:scale=1.25": (*DEFAULT, {"scale": 1.25}),
    "study:scale=1.5": (*DEFAULT, {"scale": 1.5}),
    "study:scale=0.5": (*DEFAULT, {"scale": 0.5}),  # below the shared grid, as on the LM benchmark
    "study:init=mean": (DEFAULT[0], {**DEFAULT[1], "init": "mean"}, {}),
    "study:init=zero": (DEFAULT[0], {**DEFAULT[1], "init": "zero"}, {}),
}
TA_SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
METRICS = {
    "normalized_accuracy": {"higher_is_better": True, "label": "normalized accuracy (acc / expert acc)"},
    "accuracy": {"higher_is_better": True, "label": "accuracy"},
}


def _slug(label: str) -> str:
    return label.replace(":", "-").replace("=", "-")


def merge_and_evaluate(build: Path, out: Path, label: str, method: str, params: dict[str, Any],
                       config: dict[str, Any], tasks: list[str], split: str, max_examples: int | None,
                       threads: int | None, work: str | None = None) -> dict[str, Any]:
    """Run the merge flow on ``build``'s experts with the benchmark evaluator; return the report."""
    from flows.merge import run_merge
    from swudi.config.merge_config import config_from_mapping
    from swudi.publish.publish_model import read_report

    options: dict[str, Any] = {"heads_dir": str(build / "heads"), "tasks": tasks, "split": split}
    if max_examples:
        options["max_examples"] = max_examples
    if threads:
        options["threads"] = threads
    cfg = config_from_mapping({
        "base": str(build / "base"),
        "experts": [str(build / "experts" / task) for task in tasks],
        # scale 1.0 unless a row sets one: the study's reference row (and the recorded config) is alpha 1,
        # pinned so that a change of the product's default cannot move the reference silently
        "method": method, "params": params, "scale": 1.0, **config,
        "output": str(out / "merged" / _slug(label)),
        "work_dir": str(out / "work" / (work or _slug(label))),
        "device": "cpu", "workers": 2,
        "evaluators": [{"function": EVALUATOR, "options": options}],
    }, label)
    started = time.perf_counter()
    result = run_merge(cfg)
    report = read_report(cfg.output, result["version"])
    report["wall_seconds_this_run"] = time.perf_counter() - started
    for weights in Path(cfg.output).glob("versions/*/*.safetensors"):
        weights.unlink()  # scored; the report stays
    return report


def merge_seconds(report: dict[str, Any]) -> float:
    """Summed compute time of the decomposition and merge tasks of the run (from its report)."""
    t = report["timings"]
    return float(t.get("merge_seconds_computed", 0.0) + t.get("decompose_seconds_computed", 0.0))


def tune_task_arithmetic(build: Path, tasks: list[str], val_examples: int | None,
                         log=print) -> tuple[float, dict[str, float]]:
    """Best task-arithmetic scale on the validation split: ``{scale: mean val accuracy}`` and the argmax."""
    from safetensors.torch import load_file, save_file

    from benchmarks.retention.evaluate import evaluate_encoder
    from swudi.core.state_dict import merge_state_dicts

    base = load_file(str(build / "base" / "model.safetensors"))
    experts = [load_file(str(build / "experts" / t / "model.safetensors")) for t in tasks]
    curve: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="swudi-ta-") as tmp:
        shutil.copy(build / "base" / "config.json", Path(tmp) / "config.json")
        for scale in TA_SCALES:
            merged = merge_state_dicts(base, experts, "task_arithmetic", device="cpu",
                                       method_params={"scale": scale})
            save_file({k: v.contiguous() for k, v in merged.items()}, str(Path(tmp) / "model.safetensors"))
            acc = evaluate_encoder(tmp, build / "heads", tasks, "val", max_examples=val_examples)
            curve[str(scale)] = sum(a["accuracy"] for a in acc.values()) / len(acc)
            log(f"  task arithmetic scale {scale}: mean val accuracy {curve[str(scale)]:.4f}")
    best = max(TA_SCALES, key=lambda s: curve[str(s)])
    return best, curve


def references(build: Path, tasks: list[str],
               max_examples: int | None) -> tuple[dict[str, float], dict[str, float]]:
    """(expert, pretrained) test accuracy per task, each with the expert's own head: from the build's
    manifest when it measured the same first examples, else evaluated now."""
    from benchmarks.retention.evaluate import evaluate_encoder

    manifest = json.loads((build / "manifest.json").read_text())["tasks"]
    expert: dict[str, float] = {}
    pretrained: dict[str, float] = {}
    heads = build / "heads"
    for t in tasks:
        entry = manifest[t]
        n_test = entry["n_eval"]["test"]
        full = entry["data"]["n_test"]
        if n_test == (full if max_examples is None else min(max_examples, full)):
            expert[t] = entry["metrics"]["expert_test"]
            pretrained[t] = entry["metrics"]["pretrained_test"]
        else:
            expert[t] = evaluate_encoder(build / "experts" / t, heads, [t], "test",
                                         max_examples=max_examples)[t]["accuracy"]
            pretrained[t] = evaluate_encoder(build / "base", heads, [t], "test",
                                             max_examples=max_examples)[t]["accuracy"]
    return expert, pretrained


def scored(accuracy: dict[str, float],
           expert: dict[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(per_task, summary) with accuracy and normalized accuracy = accuracy / expert accuracy."""
    per_task = {t: {"accuracy": a, "normalized_accuracy": a / expert[t]} for t, a in accuracy.items()}
    summary = {k: sum(v[k] for v in per_task.values()) / len(per_task) for k in METRICS}
    return per_task, summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_difference(results: dict[str, Any], label: str, reference: str,
                      metric: str = "normalized_accuracy") -> tuple[float, float, bool] | None:
    """Mean and std over seeds of ``label - reference`` (paired by seed) and whether it exceeds the
    noise: |mean| > t_0.975(n-1) * std / sqrt(n) (a paired t-test at 95 %,
    :func:`swudi.reporting.benchmark_report.paired_comparison`). None below 2 common seeds."""
    from swudi.reporting.benchmark_report import paired_comparison

    by: dict[str, dict[int, float]] = {}
    for r in results["runs"]:
        by.setdefault(r["label"], {})[r["seed"]] = r["summary"][metric]
    if not set(by.get(label, {})) & set(by.get(reference, {})):
        return None
    c = paired_comparison(by[label], by[reference])
    if c.beyond_noise is None or c.se is None:
        return None
    return c.mean_diff, c.se * math.sqrt(c.n), c.beyond_noise


def summary_table(results: dict[str, Any], reference: str = "swudi_a:participation_sqrt") -> str:
    """Markdown: per label, mean ± std over seeds of normalized accuracy and accuracy, merge seconds,
    and the paired difference to ``reference`` (the current default) with whether it exceeds the noise."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"]:
        by_label.setdefault(run["label"], []).append(run)

    def cell(values: list[float], digits: int = 4) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = [f"| row | kind | seeds | normalized accuracy | accuracy | merge s | vs {reference} (paired) |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in by_label.items():
        secs = [r["merge_seconds"] for r in runs if r.get("merge_seconds") is not None]
        diff = paired_difference(results, label, reference) if label != reference else None
        vs = "" if diff is None else f"{diff[0]:+.4f} ± {diff[1]:.4f}" + (" **beyond noise**" if diff[2] else "")
        lines.append(f"| {label} | {runs[0]['kind']} | {len(runs)} "
                     f"| {cell([r['summary']['normalized_accuracy'] for r in runs])} "
                     f"| {cell([r['summary']['accuracy'] for r in runs])} "
                     f"| {cell(secs, 1) if secs else ''} | {vs} |")
    return "\n".join(lines) + "\n"


def per_task_table(results: dict[str, Any], labels: list[str]) -> str:
    """Markdown: per task, mean over seeds of the accuracy of each row in ``labels`` (those present)."""
    tasks = results["tasks"]
    acc: dict[str, dict[str, list[float]]] = {}
    for run in results["runs"]:
        if run["label"] in labels:
            for t in tasks:
                acc.setdefault(run["label"], {}).setdefault(t, []).append(run["per_task"][t]["accuracy"])
    present = [lab for lab in labels if lab in acc]
    lines = ["| task | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{statistics.fmean(acc[lab][t]):.3f}" for lab in present) + " |")
    return "\n".join(lines) + "\n"


def _save(path: Path, results: dict[str, Any] | list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retention.run_benchmark")
    parser.add_argument("--build", type=Path, default=Path("benchmarks/.cache/encoder"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/.cache/encoder-bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--study", nargs="*", default=list(STUDY), choices=list(STUDY))
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every expert of the build")
    parser.add_argument("--max-examples", type=int, default=400, help="test examples per task")
    parser.add_argument("--val-examples", type=int, default=200, help="val examples per task (TA tuning)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="also write the report (swudi.reporting.benchmark_report) and results.json here")
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.commands import prepare_prefect_environment

    prepare_prefect_environment()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = args.out / "results.json"
    first = seed_dir(args.build, args.seeds[0])
    tasks = args.tasks or sorted(json.loads((first / "manifest.json").read_text())["tasks"])
    header = {
        "schema": "swudi-benchmark/1", "benchmark": "encoder",
        "title": f"Discriminative encoder benchmark: all-MiniLM-L6-v2, {len(tasks)} tasks",
        "primary": "normalized_accuracy", "metrics": METRICS, "tasks": tasks,
        "merge_seconds": "summed compute time of the decomposition and merge tasks of the run "
                         "(its merge_report.json timings); study rows that reuse the swudi_a work "
                         "folder do not count the decompositions",
        "protocol": {"test_examples_per_task": args.max_examples, "val_examples_per_task": args.val_examples,
                     "ta_scales": list(TA_SCALES)},
    }

    def seed_runs_path(seed: int) -> Path:
        return args.out / f"seed{seed}" / "runs.json"

    def assemble() -> dict[str, Any]:
        """results.json from every ``OUT/seed<k>/runs.json`` (seeds may run as parallel processes)."""
        runs = []
        for f in sorted(args.out.glob("seed*/runs.json"), key=lambda q: int(q.parent.name[4:])):
            runs += json.loads(f.read_text())
        seeds = sorted({r["seed"] for r in runs})
        results = {**header, "title": f"{header['title']}, {len(seeds)} seeds", "seeds": seeds, "runs": runs}
        _save(path, results)
        return results

    for seed in args.seeds:
        build = seed_dir(args.build, seed)
        out = args.out / f"seed{seed}"
        runs_file = seed_runs_path(seed)
        seed_results: list[dict[str, Any]] = json.loads(runs_file.read_text()) if runs_file.exists() else []
        if seed_results and seed_results[0].get("tasks", tasks) != tasks:
            raise SystemExit(f"{runs_file} holds other tasks; use another --out")
        done = {r["label"] for r in seed_results}

        def record(run: dict[str, Any], seed_results: list = seed_results, done: set = done,
                   runs_file: Path = runs_file) -> None:
            seed_results.append({**run, "tasks": tasks})
            done.add(run["label"])
            _save(runs_file, seed_results)
            assemble()
            print(f"[seed {run['seed']}] {run['label']}: normalized {run['summary']['normalized_accuracy']:.4f} "
                  f"accuracy {run['summary']['accuracy']:.4f}"
                  + (f" ({run['merge_seconds']:.1f} s)" if run.get("merge_seconds") is not None else ""),
                  flush=True)

        expert, pretrained = references(build, tasks, args.max_examples)
        for label, acc in (("pretrained", pretrained), ("experts", expert)):
            if label not in done:
                per_task, summary = scored(acc, expert)
                record({"label": label, "kind": "reference", "seed": seed, "per_task": per_task,
                        "summary": summary, "merge_seconds": None})
        rows: list[tuple[Any, ...]] = [(label, "method", *METHODS[label], {}) for label in args.methods]
        rows += [(label, "study", *STUDY[label]) for label in args.study]
        for label, kind, method, params, config in rows:
            if label in done:
                continue
            extra: dict[str, Any] = {}
            work = None
            if label == "task_arithmetic":
                best, curve = tune_task_arithmetic(build, tasks, args.val_examples)
                params = {"scale": best}
                extra["tuning"] = {"split": "val", "mean_accuracy_by_scale": curve, "chosen": best}
            if kind == "study" and not ({"include", "exclude"} & set(config)):
                work = _slug("swudi_a:participation_sqrt")  # same routing: reuse its decompositions
            started = time.perf_counter()
            report = merge_and_evaluate(build, out, label, method, params, config, tasks, "test",
                                        args.max_examples, args.threads, work)
            acc = {t: m["accuracy"] for t, m in report["evaluations"][EVALUATOR].items()}
            per_task, summary = scored(acc, expert)
            record({"label": label, "kind": kind, "method": method, "params": params,
                    "config": {"scale": 1.0, "include": [], "exclude": [], **config}, "seed": seed,
                    "per_task": per_task, "summary": summary, "merge_seconds": merge_seconds(report),
                    "wall_seconds": round(time.perf_counter() - started, 1),
                    "diagnostics": {k: report["diagnostics"].get(k)
                                    for k in ("mean_interference_vs_sum", "mean_rank")},
                    **extra})
    results = assemble()
    table = summary_table(results) + "\n" + per_task_table(
        results, ["pretrained", "experts", "mean", "task_arithmetic", "ties", "wudi", "pinv", "swudi",
                  "swudi_a:participation_sqrt"])
    (args.out / "summary.md").write_text(table)
    print(table)
    if args.report_dir is not None:
        _save(args.report_dir / "results.json", results)
        try:
            from swudi.reporting.benchmark_report import write_benchmark_report
        except ImportError:
            print("swudi.reporting.benchmark_report is not available yet: wrote results.json only")
        else:
            for p in write_benchmark_report(results, args.report_dir):
                print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
