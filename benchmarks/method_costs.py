"""What each merging method costs on its own: one cold merge per method, each in a fresh work folder.

For every method: a merge at scale 1 through the real flow (``flows.merge.run_merge``, threads runner,
one worker, CPU) from a work folder of its own, so the figures include everything the method needs
the first time (decompositions, per-task SVDs, deltas), as a user's first merge would. Reported per
method: process CPU and wall seconds, the merge report's task seconds (decompose + merge tasks), the
process's peak RSS during the merge (the window is reset before each merge: Linux
``/proc/self/clear_refs``) and its RSS just before, and the bytes the merge stored in its work folder.
No evaluation.

    python -m benchmarks.method_costs --benchmark lm --build B --seed 0 --out DIR \\
        --methods swudi_a,iso_c,iso_cts,tsv_m,cart,ace,task_arithmetic,ties

A first warm-up merge (not reported) starts Prefect and imports everything, so the first method is not
charged for them. Writes OUT/costs.json and OUT/costs.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from benchmarks.study_benchmarks import BENCHMARKS, StudyBenchmark, save_rows, write_report
from benchmarks.tune_study import _config, _merge


def _stored_bytes(work: Path) -> int:
    return sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.exists() else 0


def cost_of(bench: StudyBenchmark, build: Path, seed: int, out: Path, method: str, threads: int) -> dict[str, Any]:
    """One cold merge of ``method`` in ``out/<method>``; its cost figures."""
    folder = out / method
    shutil.rmtree(folder, ignore_errors=True)
    merged = _merge(_config(bench, build, seed, folder, "costs", 1.0, None, threads, method))
    return {"method": method, **merged, "stored_bytes": _stored_bytes(folder / f"seed{seed}" / "work")}


def markdown(bench: StudyBenchmark, rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"# Cost of one cold merge per method on the {bench.name} benchmark (issue 22)",
        "",
        f"Command: `{command}`",
        "",
        "| method | process CPU s | wall s | task s | peak RSS MB | RSS before MB | stored MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = r.get("rss_before_mb")
        lines.append(
            f"| `{r['method']}` | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['compute_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {'n/a' if before is None else f'{before:.0f}'} | "
            f"{r['stored_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        "process CPU s: CPU seconds of the merging process during the merge (every thread: orchestration,",
        "reads, decompositions, writes). task s: the report's decompose + merge task seconds (wall time",
        "inside the tasks: on a loaded machine it includes waiting for a core). peak RSS: the process's",
        "peak during the merge; RSS before: the process (Python, torch, Prefect client) just before it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.method_costs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="lm")
    p.add_argument("--build", type=Path, required=True, help="one seed's build (see benchmarks/study_benchmarks.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="swudi_a,iso_c,iso_cts,tsv_m,cart,ace,task_arithmetic,ties")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    methods = args.methods.split(",")
    cost_of(bench, args.build, args.seed, args.out / "warm-up", methods[0], args.threads)
    rows = []
    for method in methods:
        rows.append(cost_of(bench, args.build, args.seed, args.out, method, args.threads))
        r = rows[-1]
        print(
            f"{method}: CPU {r['cpu_s']:.1f} s, task {r['compute_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"stored {r['stored_bytes'] / 1e6:.1f} MB",
            flush=True,
        )
    save_rows(args.out, rows, "costs")
    write_report(args.out, "benchmarks.method_costs", argv, lambda command: markdown(bench, rows, command), "costs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
