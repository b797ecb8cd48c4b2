"""Every closed-form method at its default scale and at its tuned scale (issue 22), on either benchmark
(``--benchmark lm`` or ``encoder``: ``benchmarks/study_benchmarks.py``).

Per seed and method (one shared work folder per seed, so decompositions and per-task SVDs are made
once and shared, as a user's would be): a merge at scale 1 (the first merge of its kind reads the
experts), scored on *test*; then `flows.tune.run_tune` on the *validation* split's metric over the
scale grid, the winner scored on *test*. Per method: the first merge's task
seconds (decompose + merge tasks, from its report) and process CPU seconds, the process's peak RSS
during it (the window reset before the merge), and the bytes it added to the work folder (its
decompositions, deltas, per-task SVDs).

    python -m benchmarks.methods_study --builds B0 [B1 B2] --out benchmarks/.cache/methods-study \\
        --methods swudi_a,iso_c,iso_cts,tsv_m,cart,ace,swudi_a+svc --grid scale=0.1,0.3,0.5,1,2

A method written ``M+svc`` is method M followed by the post-filter ``svc`` (``post: svc``).

Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.study_benchmarks import BENCHMARKS, StudyBenchmark, read_rows, save_rows, write_report
from benchmarks.tune_study import _config, _mean_sd, _merge


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.exists() else 0


def run_method(
    bench: StudyBenchmark, build: Path, seed: int, out: Path, method: str, grid: str, threads: int
) -> dict[str, Any]:
    from flows.tune import run_tune

    work = out / f"seed{seed}" / "work"
    before = _folder_bytes(work)
    first = _merge(_config(bench, build, seed, out, f"{method}-default", 1.0, None, threads, method))
    row: dict[str, Any] = {
        "seed": seed,
        "method": method,
        "stored_bytes": _folder_bytes(work) - before,
        "default": {**first, "test": bench.score(first["url"], build, seed, "test", threads)},
    }
    started = time.perf_counter()
    tuned = run_tune(
        _config(bench, build, seed, out, f"{method}-tuned", 1.0, "val", threads, method), bench.objective, [grid]
    )
    row["tuned"] = {
        "scale": tuned["winner"]["scale"],
        "val": tuned["winner"]["score"],
        "wall_s": time.perf_counter() - started,
        "test": bench.score(tuned["published"]["url"], build, seed, "test", threads),
    }
    return row


def markdown(bench: StudyBenchmark, rows: list[dict[str, Any]], command: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# Closed-form methods on the {bench.name} benchmark (issue 22): default scale and scale tuned on val, "
        "test scores",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds: {seeds}. Metric on test: {bench.metric_text}.",
        "",
        "| method | seeds | test, scale 1 | test, tuned on val | tuned scales | first merge task s | "
        "first merge CPU s | first merge peak RSS MB | stored MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        scales = ", ".join(f"{r['tuned']['scale']:.3g}" for r in mine)
        default = _mean_sd([r["default"]["test"] for r in mine])
        tuned = _mean_sd([r["tuned"]["test"] for r in mine])
        rss = [r["default"]["peak_rss_mb"] for r in mine if "peak_rss_mb" in r["default"]]
        lines.append(
            f"| `{m}` | {len(mine)} | {default} | {tuned} | {scales} | "
            f"{statistics.fmean(r['default']['compute_s'] for r in mine):.1f} | "
            f"{statistics.fmean(r['default']['cpu_s'] for r in mine):.1f} | "
            f"{f'{max(rss):.0f}' if rss else 'n/a'} | "
            f"{statistics.fmean(r['stored_bytes'] for r in mine) / 1e6:.1f} |"
        )
    return "\n".join(lines + _paired_table(rows, methods)) + "\n"


def _paired_table(rows: list[dict[str, Any]], methods: list[str], default: str = "swudi_a") -> list[str]:
    """Each method tuned against the default tuned, paired over seeds (t-test, 95 %)."""
    from swudi.reporting.benchmark_report import paired_comparison

    ref = {r["seed"]: r["tuned"]["test"] for r in rows if r["method"] == default}
    others = [m for m in methods if m != default]
    if len(ref) < 2 or not others:
        return []
    lines = [
        "",
        f"Paired over seeds against `{default}` (the default), both tuned on val, scored on test (95 %):",
        "",
        f"| method | seeds | tuned - {default} tuned | beyond noise |",
        "|---|---|---|---|",
    ]
    for m in others:
        mine = {r["seed"]: r["tuned"]["test"] for r in rows if r["method"] == m}
        if not set(mine) & set(ref):
            continue
        c = paired_comparison(mine, ref)
        noise = "n/a" if c.beyond_noise is None else ("yes" if c.beyond_noise else "no")
        lines.append(f"| `{m}` | {c.n} | {c.mean_diff:+.4f} ± {c.se or 0:.4f} SE | {noise} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.methods_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="lm")
    p.add_argument("--builds", type=Path, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="swudi_a,iso_c,iso_cts,tsv_m,cart,ace")
    p.add_argument("--grid", default="scale=0.1,0.3,0.5,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report-only", action="store_true", help="write OUT/results.md from OUT/results.json and run nothing"
    )
    args = p.parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    seeds = args.seeds or list(range(len(args.builds)))
    rows = read_rows(args.out)
    done = {(r["seed"], r["method"]) for r in rows}
    todo = [] if args.report_only else list(zip(args.builds, seeds, strict=True))
    for build, seed in todo:
        for method in args.methods.split(","):
            if (seed, method) in done:
                continue
            rows.append(run_method(bench, build, seed, args.out, method, args.grid, args.threads))
            save_rows(args.out, rows)
            r = rows[-1]
            print(
                f"seed {seed} {method}: scale 1 {r['default']['test']:.4f}, tuned {r['tuned']['test']:.4f} "
                f"(scale {r['tuned']['scale']:.3g})",
                flush=True,
            )
    write_report(args.out, "benchmarks.methods_study", argv, lambda command: markdown(bench, rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
