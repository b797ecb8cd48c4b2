"""CPU cost of eigh under the thread budget vs a bare single-threaded eigh.

Cases, each at every ``--dims`` size (symmetric PSD float32 matrices ``X^T X / d``, X ~ N(0, 1)):

- ``bare``: one caller, 1 torch thread -- the reference cost of one decomposition.
- ``chosen``: ``--callers`` callers (2, like ``workers: 2``) in a thread pool, each calling
  ``apply_torch_threads(torch_threads_for(callers, None))`` first, as a layer task does.
- ``oversubscribed``: the same callers with ``--oversubscribed-threads`` (2) torch threads each,
  i.e. torch's default on a 2-core machine.
- ``bare_threaded``: one caller with ``--oversubscribed-threads`` torch threads (the issue's
  "single caller with 2 threads" measurement; informative, no budget involved).

Each (case, size) runs in its own subprocess (fresh OpenMP/MKL pools). Every caller warms up on a
small eigh, then all callers start together and run ``--repeat`` decompositions each. Reported: the
process CPU time per decomposition (``time.process_time`` of the whole process / decompositions --
the steady measure on a shared machine), the wall of the timed part, wall per decomposition
(throughput) and the CPU ratio to ``bare``. The issue's target: ``chosen`` within 1.3x of ``bare``.

Usage::

    python benchmarks/threads.py                       # d = 1376 and 3072, 3 per caller
    python benchmarks/threads.py --dims 1376 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ("bare", "chosen", "oversubscribed", "bare_threaded")


def _matrix(dim: int, seed: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, dim, generator=generator, dtype=torch.float32)
    return (x.T @ x) / dim


def run_case(case: str, dim: int, repeat: int, callers: int, oversubscribed_threads: int) -> dict[str, Any]:
    """Run one case in this process and return its measurements."""
    import torch

    from swudi.core.threads import apply_torch_threads, available_cores, torch_threads_for

    if case == "bare":
        callers, threads = 1, 1
    elif case == "bare_threaded":
        callers, threads = 1, oversubscribed_threads
    elif case == "chosen":
        threads = torch_threads_for(callers, None)
    else:
        threads = oversubscribed_threads
    matrices = [_matrix(dim, seed) for seed in range(callers)]
    small = _matrix(128, 99)
    start = threading.Barrier(callers + 1)
    per_call: list[float] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        apply_torch_threads(threads)  # what each task body does first
        torch.linalg.eigh(small)  # warm-up: start this thread's OpenMP/MKL pools
        start.wait()
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.linalg.eigh(matrices[index])
            with lock:
                per_call.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=callers) as pool:
        futures = [pool.submit(caller, index) for index in range(callers)]
        start.wait()  # every caller has warmed up
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for future in futures:
            future.result()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    count = callers * repeat
    return {
        "case": case,
        "dim": dim,
        "callers": callers,
        "torch_threads": threads,
        "cores": available_cores(),
        "decompositions": count,
        "cpu_per_decomposition": cpu / count,
        "wall": wall,
        "wall_per_decomposition": wall / count,
        "wall_per_call": sum(per_call) / len(per_call),
        "loadavg": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def _in_subprocess(case: str, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--dims",
        str(dim),
        "--repeat",
        str(args.repeat),
        "--callers",
        str(args.callers),
        "--oversubscribed-threads",
        str(args.oversubscribed_threads),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (CPU ratio against ``bare`` of the same size)."""
    bare = {row["dim"]: row["cpu_per_decomposition"] for row in rows if row["case"] == "bare"}
    lines = [
        "| d | case | callers x torch threads | decompositions | CPU s / decomposition | CPU vs bare "
        "| wall s (timed part) | wall s / decomposition | wall s / call |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["cpu_per_decomposition"] / bare[row["dim"]] if row["dim"] in bare else float("nan")
        lines.append(
            f"| {row['dim']} | {row['case']} | {row['callers']} x {row['torch_threads']} | {row['decompositions']} "
            f"| {row['cpu_per_decomposition']:.3f} | {ratio:.2f}x | {row['wall']:.2f} "
            f"| {row['wall_per_decomposition']:.3f} | {row['wall_per_call']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1376, 3072])
    parser.add_argument("--repeat", type=int, default=3, help="decompositions per caller")
    parser.add_argument("--callers", type=int, default=2, help="parallel callers, like workers")
    parser.add_argument("--oversubscribed-threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    if args.case:
        row = run_case(args.case, args.dims[0], args.repeat, args.callers, args.oversubscribed_threads)
        print(json.dumps(row))
        return

    rows = []
    for dim in args.dims:
        for case in args.cases:
            row = _in_subprocess(case, dim, args)
            print(
                f"d={dim} {case}: {row['callers']} x {row['torch_threads']} threads, "
                f"{row['cpu_per_decomposition']:.3f} CPU s / decomposition, wall {row['wall']:.2f} s, "
                f"load {row['loadavg']:.1f}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
