"""Per-layer merge speed and peak memory: SWUDI, SWUDI-A, iterative WUDI and a naive SWUDI.

Every (shape, method) case runs in its own subprocess so that peak memory can be read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the high-water mark of that process; tracemalloc
does not see torch allocations). Reported "peak MB" is the growth of that high-water mark during
the merge, i.e. the extra memory the method needed on top of its inputs. On CUDA the peak is
``torch.cuda.max_memory_allocated`` instead.

Iterative WUDI costs the same every step; by default it runs ``--wudi-iterations`` steps (10) once
and the time is scaled to 300 steps (the label says so); ``--wudi-iterations 300`` runs it in full.
The closed-form methods run ``--repeat`` times (3) and the fastest run is reported (the machine is
shared; the spread is printed on stderr). Wall time and process CPU time are both reported: on a
shared machine with ``--threads 1`` the CPU time is the steadier measure of the work done.

Usage::

    python benchmarks/layer_speed.py                      # 768x768, 3072x768, 768x3072, N = 8
    python benchmarks/layer_speed.py --large              # adds 4096x4096
    python benchmarks/layer_speed.py --shapes 768x768 --wudi-iterations 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

WUDI_ITERATIONS = 300
DEFAULT_SHAPES = ("768x768", "3072x768", "768x3072")
METHODS = ("swudi", "swudi_a", "naive_swudi", "wudi")


def naive_swudi(tv, t: float = 1300.0, rank_ratio: float = 0.65):
    """SWUDI written the straightforward way: each tau_i^T tau_i formed separately ([N, d, d]),
    D formed in full, a full eigendecomposition, full-width products."""
    import torch

    n, _m, d = tv.shape
    w = 1.0 / tv.reshape(n, -1).square().sum(dim=1)
    grams = torch.einsum("nab,nac->nbc", tv, tv)  # N x d x d
    c = torch.einsum("n,nbc->bc", w, grams)
    dm = torch.einsum("n,nac->ac", w, torch.einsum("nab,nbc->nac", tv, grams))
    del grams
    lam, v = torch.linalg.eigh(c)  # ascending
    lam = lam.clamp(min=1e-8)
    f = 1.0 - torch.exp(-t * lam)
    k = math.ceil(rank_ratio * d - 1e-9)
    f[: d - k] = 0.0
    theta0 = tv.sum(dim=0)
    return theta0 - (theta0 @ v * f) @ v.T + (dm @ v * (f / lam)) @ v.T


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(
    method: str, shape: str, experts: int, wudi_iterations: int, threads: int | None, seed: int, repeat: int
) -> dict:
    import torch

    import swudi

    if threads:
        torch.set_num_threads(threads)
    m, d = (int(s) for s in shape.split("x"))
    device = swudi.resolve_device("auto")

    def run(tv):
        if method == "naive_swudi":
            return naive_swudi(tv.to(device))
        if method == "wudi":
            return swudi.merge_matrix(tv, "wudi", iterations=wudi_iterations, device=device)
        return swudi.merge_matrix(tv, method, device=device)

    g = torch.Generator().manual_seed(seed)
    run(torch.randn(experts, 48, 32, generator=g).mul_(1e-3))  # warm-up: library init, kernels
    tv = torch.randn(experts, m, d, generator=g).mul_(1e-3)  # in place: no temporary copy
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss_before = _maxrss_mb()
    times, cpu_times = [], []
    for _ in range(1 if method == "wudi" else max(1, repeat)):
        start, cpu_start = time.perf_counter(), time.process_time()
        theta = run(tv)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds, cpu_seconds = min(times), min(cpu_times)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak = _maxrss_mb() - rss_before
    out = {
        "method": method,
        "shape": shape,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "all_seconds": times,
        "peak_mb": peak,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
    }
    if method == "wudi":
        out["iterations_run"] = wudi_iterations
        out["seconds_300"] = seconds * WUDI_ITERATIONS / max(wudi_iterations, 1)
        out["cpu_seconds_300"] = cpu_seconds * WUDI_ITERATIONS / max(wudi_iterations, 1)
    if method == "naive_swudi":  # sanity: the naive and the library SWUDI agree
        ref = swudi.merge_matrix(tv, "swudi", device=device).double()
        out["rel_diff_vs_swudi"] = float((theta.cpu().double() - ref).norm() / ref.norm())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated OUTxIN shapes")
    parser.add_argument("--large", action="store_true", help="add 4096x4096")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--wudi-iterations", type=int, default=10, help="WUDI steps actually run (time scaled to 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each closed-form method; the fastest is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        method, shape = args.worker
        print(
            json.dumps(worker(method, shape, args.experts, args.wudi_iterations, args.threads, args.seed, args.repeat))
        )
        return

    shapes = [s for s in args.shapes.split(",") if s]
    if args.large and "4096x4096" not in shapes:
        shapes.append("4096x4096")
    methods = [m for m in args.methods.split(",") if m]
    results: dict[tuple[str, str], dict] = {}
    for shape in shapes:
        for method in methods:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                method,
                shape,
                "--experts",
                str(args.experts),
                "--wudi-iterations",
                str(args.wudi_iterations),
                "--seed",
                str(args.seed),
                "--repeat",
                str(args.repeat),
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{shape} {method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(shape, method)] = res
            runs = ", ".join(f"{t:.2f}" for t in res["all_seconds"])
            print(
                f"# {shape:>9} {method:<12} wall runs [{runs}] s, best CPU {res['cpu_seconds']:.2f} s, "
                f"peak +{res['peak_mb']:.0f} MB",
                file=sys.stderr,
            )

    any_res = next(iter(results.values()), None)
    if any_res is None:
        sys.exit("no case succeeded")
    print(
        f"N = {args.experts} experts; device {any_res['device']}; torch {any_res['torch']}; "
        f"torch.get_num_threads() = {any_res['threads']}; os.cpu_count() = {os.cpu_count()}; "
        f"load average at end {os.getloadavg()[0]:.1f}"
    )
    label_wudi = (
        "wudi (300 it.)"
        if args.wudi_iterations == WUDI_ITERATIONS
        else f"wudi (300 it., scaled from {args.wudi_iterations})"
    )
    print()
    print(
        "| layer (out x in) | method | wall time (s) | CPU time (s) | peak extra memory (MB) "
        "| wudi / method (wall) | wudi / method (CPU) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        wudi_res = results.get((shape, "wudi"))
        for method in methods:
            res = results.get((shape, method))
            if res is None:
                continue
            wall = res["seconds_300"] if method == "wudi" else res["seconds"]
            cpu = res["cpu_seconds_300"] if method == "wudi" else res["cpu_seconds"]
            name = label_wudi if method == "wudi" else method
            if method == "naive_swudi":
                name += f" (rel. diff vs swudi {res['rel_diff_vs_swudi']:.1e})"
            ratio_wall = f"{wudi_res['seconds_300'] / wall:.1f}x" if wudi_res else "-"
            ratio_cpu = f"{wudi_res['cpu_seconds_300'] / cpu:.1f}x" if wudi_res else "-"
            print(f"| {shape} | {name} | {wall:.2f} | {cpu:.2f} | {res['peak_mb']:.0f} | {ratio_wall} | {ratio_cpu} |")


if __name__ == "__main__":
    main()
