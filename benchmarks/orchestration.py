"""What orchestration costs: start-up, a no-op re-run, and the per-layer overhead of the flow.

A generated Llama-shaped model (28 layers by default, tiny hidden size so that the maths is
negligible and what is left is orchestration; 3 experts) is merged:

1. ``swudi merge`` in a fresh process on Prefect's embedded server (start-up included);
2. ``swudi merge`` again with nothing changed (the no-op path: headers + ``latest.json``, no Prefect);
3. in this process against a long-running ``prefect server start`` (started here on loopback),
   into a new output: flow wall time, the library's own compute time inside the tasks (summed from
   the records), and the server process's CPU seconds; per layer: (wall - compute / workers) and
   server CPU divided by the number of 2-D weights; the flow's own time split (plan, read, decompose,
   merge, diagnostics, write, publish, orchestration).

Usage::

    .venv/bin/python benchmarks/orchestration.py              # 28 layers
    .venv/bin/python benchmarks/orchestration.py --layers 16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loopback_server import LoopbackServer  # noqa: E402 - after the path


def _cli(config: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "swudi.cli", "merge", str(config)], env=env, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, done.stderr.strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from swudi.io.synthetic import SyntheticLlama, write_synthetic_models

    root = Path(tempfile.mkdtemp(prefix="swudi-orchestration-"))
    model = SyntheticLlama(layers=args.layers, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64)
    base, experts = write_synthetic_models(str(root / "in"), args.experts, model)
    settings = {"base": base, "experts": experts, "method": "swudi_a", "device": "cpu", "workers": args.workers}
    config = root / "merge.yaml"
    config.write_text(yaml.safe_dump({**settings, "output": str(root / "out")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "PREFECT_LOGGING_LEVEL": "WARNING",
                "SWUDI_LOCAL_PREFECT_API": ""})
    first_wall, first_line = _cli(config, env)
    noop_wall, noop_line = _cli(config, env)

    server = LoopbackServer({**env, "PREFECT_HOME": str(root / "server-home")}, timeout_s=120)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
        os.environ["PREFECT_API_URL"] = server.url
        from flows.history import wait_for_run_history
        from flows.merge import run_merge
        from swudi.config.merge_config import config_from_mapping

        cpu_before = server.cpu()
        started = time.perf_counter()
        result = run_merge(config_from_mapping({**settings, "output": str(root / "out-server")}))
        wait_for_run_history({result["flow_run_id"]: result["task_runs"]})
        wall = time.perf_counter() - started
        server_cpu = server.cpu() - cpu_before
    finally:
        server.stop()

    layers = result["layers"]
    compute = sum(r["seconds"] for r in result["records"])
    split = result["time_split"]
    overhead = split["orchestration"]
    print(f"model: Llama-shaped, {args.layers} layers ({layers} 2-D weights, {result['groups']} groups), "
          f"{args.experts} experts, {args.workers} workers; {result['task_runs']} task runs")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| first `swudi merge`, embedded server (start-up included), wall | {first_wall:.1f} s |")
    print(f"| no-op `swudi merge` re-run (nothing changed), wall | {noop_wall:.1f} s |")
    print(f"| merge on a running server: flow wall | {wall:.2f} s |")
    print(f"| library compute inside the tasks (sum) | {compute:.2f} s |")
    print(f"| flow time split (task phases summed over workers) | "
          f"{', '.join(f'{k} {v:.2f} s' for k, v in split.items())} |")
    print(f"| orchestration per 2-D weight (flow wall - plan - publish - task work / workers) | "
          f"{1000 * overhead / layers:.1f} ms |")
    print(f"| server CPU per 2-D weight | {1000 * server_cpu / layers:.1f} ms |")
    print(f"| orchestration share of the flow wall | {overhead / wall:.0%} |")
    print(f"first run: {first_line}\nno-op run: {noop_line}", file=sys.stderr)


if __name__ == "__main__":
    main()
