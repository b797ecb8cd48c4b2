"""Does `swudi tune` pick a good scale? The measurement of issue 21 (part 4), on either benchmark
(``--benchmark lm`` or ``encoder``: ``benchmarks/study_benchmarks.py``).

Per seed (LM: one build per seed, `python -m benchmarks.lm.build --reuse-base`, or one build holding
every seed; encoder: `OUT/seed<k>` of `python -m benchmarks.retention.build_experts --eval-val`):

1. **default**: `swudi_a` at scale 1 (a cold merge: it reads the experts and stores the decompositions);
2. **tuned**: `flows.tune.run_tune` on the *validation* split's metric
   (the benchmark's evaluator with `aggregate: true`, task `all`), grid + golden-section refine;
   the published winner is then scored on the *test* split;
3. **oracle**: every grid point merged (from the stored decompositions) and scored on *test*; the best
   one is the oracle. Tuning should land within noise of it (paired t-test over seeds, 95 %).

Cost: each warm grid-point merge (no evaluator) against the cold first merge, as process CPU seconds
(orchestration included) and as the merge report's compute seconds (decompose + merge tasks), and the
expert bytes each warm merge read (must be 0).

    python -m benchmarks.tune_study --builds B0 B1 B2 --out benchmarks/.cache/tune-study \
        --grid scale=0.1,0.2,0.3,0.5,0.8,1.0 --refine 4
    python -m benchmarks.tune_study --benchmark encoder --builds E/seed0 E/seed1 E/seed2 \
        --out benchmarks/.cache/tune-study-encoder --grid scale=0.25,0.5,1,1.5,2,3 --refine 4

Writes OUT/results.json and OUT/results.md (copied to docs/results/tune.md by hand with the command).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import proc_status_mib, reset_peak_rss
from benchmarks.study_benchmarks import BENCHMARKS, StudyBenchmark, read_rows, save_rows, write_report


def _config(
    bench: StudyBenchmark,
    build: Path,
    seed: int,
    out: Path,
    label: str,
    scale: float,
    evaluate_on: str | None,
    threads: int,
    method: str = "swudi_a",
    params: dict[str, Any] | None = None,
) -> Any:
    from swudi.config.merge_config import config_from_mapping

    method, _, post = method.partition("+")  # "swudi_a+svc": the method, then the post-filter svc
    mapping: dict[str, Any] = {
        "base": bench.base(build),
        "experts": bench.experts(build, seed),
        "method": method,
        **({"post": post} if post else {}),
        "params": params or {},
        "scale": scale,
        "output": str(out / f"seed{seed}" / "merged" / label),
        "work_dir": str(out / f"seed{seed}" / "work"),  # shared: decompositions computed once per seed
        "device": "cpu",
        "workers": 1,
        "torch_threads": threads,
    }
    if evaluate_on:
        mapping["evaluators"] = [
            {"function": bench.evaluator, "options": bench.evaluator_options(build, seed, evaluate_on, threads)}
        ]
    return config_from_mapping(mapping, label)


def _peak_rss_mb() -> float:
    """This process's peak RSS since the last reset (VmHWM), in MB; the lifetime peak elsewhere."""
    peak = proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _merge(cfg: Any) -> dict[str, Any]:
    """Run one merge; its process CPU and wall seconds, compute seconds (decompose + merge tasks, from
    the report: task wall time, which includes waiting for a core on a loaded machine), expert bytes
    read, the process's peak RSS during it and its RSS just before."""
    from flows.merge import run_merge
    from swudi.publish.publish_model import read_report

    reset_peak_rss()
    rss_before = proc_status_mib("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    result = run_merge(cfg)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    report = read_report(cfg.output, result["version"])
    timings = report.get("timings", {})
    compute = float(timings.get("decompose_seconds_computed", 0.0)) + float(timings.get("merge_seconds_computed", 0.0))
    experts_read = sum(int(c["tensor_bytes"]) for c in result["io"]["per_checkpoint"] if c["role"] != "base")
    return {
        "url": result["url"],
        "cpu_s": cpu,
        "wall_s": wall,
        "compute_s": compute,
        "expert_bytes_read": experts_read,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_before,
    }


def run_seed(
    bench: StudyBenchmark, build: Path, seed: int, out: Path, grid: list[float], refine: int, threads: int
) -> dict[str, Any]:
    from flows.tune import run_tune

    row: dict[str, Any] = {"seed": seed, "build": str(build)}
    first = _merge(_config(bench, build, seed, out, "default", 1.0, None, threads))
    row["default"] = {**first, "test": bench.score(first["url"], build, seed, "test", threads)}
    row["grid"] = []
    for scale in grid:
        point = _merge(_config(bench, build, seed, out, f"scale-{scale:g}", scale, None, threads))
        point["test"] = bench.score(point["url"], build, seed, "test", threads)
        row["grid"].append({"scale": scale, **point})
    oracle = max(row["grid"], key=lambda p: p["test"])
    row["oracle"] = {"scale": oracle["scale"], "test": oracle["test"]}
    started = time.perf_counter()
    tuned = run_tune(
        _config(bench, build, seed, out, "tuned", 1.0, "val", threads),
        bench.objective,
        [f"scale={','.join(f'{s:g}' for s in grid)}"],
        refine=refine,
    )
    winner = tuned["winner"]
    row["tuned"] = {
        "scale": winner["scale"],
        "val": winner["score"],
        "wall_s": time.perf_counter() - started,
        "candidates": tuned["candidates"],
        "test": bench.score(tuned["published"]["url"], build, seed, "test", threads),
    }
    return row


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(bench: StudyBenchmark, rows: list[dict[str, Any]], command: str) -> str:
    from swudi.reporting.benchmark_report import paired_comparison

    seeds = [r["seed"] for r in rows]
    default = {r["seed"]: r["default"]["test"] for r in rows}
    tuned = {r["seed"]: r["tuned"]["test"] for r in rows}
    oracle = {r["seed"]: r["oracle"]["test"] for r in rows}
    tuned_scales = ", ".join(f"{r['tuned']['scale']:.3g}" for r in rows)
    oracle_scales = ", ".join(f"{r['oracle']['scale']:g}" for r in rows)
    lines = [
        f"# `swudi tune` on the {bench.name} benchmark (issue 21): tuned on val, reported on test",
        "",
        f"Command: `{command}`",
        "",
        f"Metric on the test split: {bench.metric_text}.",
        "",
        f"| row | seeds | test {bench.metric} | scales |",
        "|---|---|---|---|",
        f"| swudi_a, scale 1 (default) | {len(seeds)} | {_mean_sd(list(default.values()))} | 1 |",
        f"| swudi_a, tuned on val | {len(seeds)} | {_mean_sd(list(tuned.values()))} | {tuned_scales} |",
        f"| swudi_a, oracle grid point (best on test) | {len(seeds)} | {_mean_sd(list(oracle.values()))} | "
        f"{oracle_scales} |",
        "",
    ]
    if len(seeds) >= 2:
        vs_oracle, vs_default = paired_comparison(tuned, oracle), paired_comparison(tuned, default)
        lines += [
            f"Tuned - oracle (paired over seeds): {vs_oracle.mean_diff:+.4f} ± {vs_oracle.se or 0:.4f} SE, "
            f"{'beyond' if vs_oracle.beyond_noise else 'within'} noise.",
            f"Tuned - default: {vs_default.mean_diff:+.4f} ± {vs_default.se or 0:.4f} SE, "
            f"{'beyond' if vs_default.beyond_noise else 'within'} noise.",
            "",
        ]
    lines += [
        "## Cost of a tune candidate (no evaluator) against the first merge",
        "",
        "| seed | first merge: CPU s / compute s | candidate (median): CPU s / compute s | CPU share | "
        "compute share | expert bytes read by candidates |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = statistics.median(p["cpu_s"] for p in r["grid"])
        comp = statistics.median(p["compute_s"] for p in r["grid"])
        read = max(p["expert_bytes_read"] for p in r["grid"])
        d = r["default"]
        lines.append(
            f"| {r['seed']} | {d['cpu_s']:.1f} / {d['compute_s']:.1f} | {cpu:.1f} / {comp:.1f} | "
            f"{cpu / d['cpu_s']:.0%} | {comp / max(d['compute_s'], 1e-9):.0%} | {read} |"
        )
    lines += ["", "## Per seed", "", "| seed | grid scale | test |", "|---|---|---|"]
    for r in rows:
        for p in r["grid"]:
            lines.append(f"| {r['seed']} | {p['scale']:g} | {p['test']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tune_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="lm")
    p.add_argument("--builds", type=Path, nargs="+", required=True, help="builds, one per seed (in --seeds order)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0, 1, ...")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", default="scale=0.1,0.2,0.3,0.5,0.8,1.0")
    p.add_argument("--refine", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    grid = [float(v) for v in args.grid.split("=", 1)[1].split(",")]
    seeds = args.seeds or list(range(len(args.builds)))
    rows = read_rows(args.out)
    done = {r["seed"] for r in rows}
    for build, seed in zip(args.builds, seeds, strict=True):
        if seed in done:
            continue
        rows.append(run_seed(bench, build, seed, args.out, grid, args.refine, args.threads))
        save_rows(args.out, rows)
        print(
            f"seed {seed}: default {rows[-1]['default']['test']:.4f}, tuned {rows[-1]['tuned']['test']:.4f} "
            f"(scale {rows[-1]['tuned']['scale']:.3g}), oracle {rows[-1]['oracle']['test']:.4f}",
            flush=True,
        )
    write_report(args.out, "benchmarks.tune_study", argv, lambda command: markdown(bench, rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
