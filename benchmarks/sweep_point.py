"""Cost of a sweep point after the first merge: the read floor, measured through the real flow.

Generates a BERT-shaped base and experts (``swudi.io.synthetic``), then runs the merge flow (Prefect's
embedded server, thread runner) three times on one work folder:

1. the first merge (``swudi``, t = 1300): reads every input tensor once and decomposes every layer;
2. a sweep point with only ``t`` changed (t = 300): stored decompositions + the base weights;
3. a point with ``scale`` changed too: stored decompositions and deltas + the base weights.

For each run it prints wall seconds, this process's CPU seconds, bytes read from the inputs (base,
experts) and from the work folder as counted by the merge, and the peak RSS of this process, then
the ratios of runs 2 and 3 to run 1. Everything runs in one process, one merge after the other.

Usage::

    .venv/bin/python benchmarks/sweep_point.py                      # 4 layers, hidden 512, 4 experts
    .venv/bin/python benchmarks/sweep_point.py --layers 8 --hidden 768 --experts 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.commands import prepare_prefect_environment

    prepare_prefect_environment()
    import torch

    torch.set_num_threads(args.threads)
    from flows.merge import run_merge
    from swudi.config.merge_config import config_from_mapping
    from swudi.io.synthetic import SyntheticModel, write_synthetic_models

    root = args.dir or Path(tempfile.mkdtemp(prefix="swudi-sweep-point-"))
    model = SyntheticModel(layers=args.layers, hidden=args.hidden, intermediate=4 * args.hidden, vocab=1024,
                           positions=128)
    base, experts = write_synthetic_models(str(root / "in"), args.experts, model)
    common = {"base": base, "experts": experts, "output": str(root / "out"), "method": "swudi",
              "device": "cpu", "workers": args.workers}
    runs: list[tuple[str, dict[str, Any]]] = [("first merge (t=1300)", {"params": {"t": 1300.0}}),
            ("sweep point: t=300", {"params": {"t": 300.0}}),
            ("sweep point: t=300, scale=0.5", {"params": {"t": 300.0}, "scale": 0.5})]
    rows = []
    for label, settings in runs:
        cfg = config_from_mapping({**common, **settings})
        wall, cpu = time.perf_counter(), _cpu()
        result = run_merge(cfg)
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        io = result["io"]
        per = io["per_checkpoint"]
        rows.append({"run": label, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "computed": result["computed"], "decompositions_computed": result["decompositions_computed"],
                     "base_mb": round(per[0]["tensor_bytes"] / 1e6, 2),
                     "experts_mb": round(sum(p["tensor_bytes"] for p in per[1:]) / 1e6, 2),
                     "headers_kb": round(io["header_bytes"] / 1e3, 1), "work_mb": round(io["work_bytes"] / 1e6, 2),
                     "peak_rss_mb": round(_rss_mb())})
    first = rows[0]
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts; "
          f"{torch.get_num_threads()} torch thread(s), {args.workers} workers; folder {root}")
    print("| run | wall s | CPU s | merges / decompositions computed | base MB | experts MB | headers kB "
          "| read from work folder MB | peak RSS MB | wall / first | CPU / first |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']} | {r['cpu_s']} | {r['computed']} / {r['decompositions_computed']} "
              f"| {r['base_mb']} | {r['experts_mb']} | {r['headers_kb']} | {r['work_mb']} | {r['peak_rss_mb']} "
              f"| {r['wall_s'] / first['wall_s']:.2f} | {r['cpu_s'] / first['cpu_s']:.2f} |")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
