"""swudi beside mergekit 0.1.5: wall, CPU and peak RSS of the same merge, A/B pairs interleaved.

A Llama-shaped model (``swudi.io.synthetic.SyntheticLlama``: bf16, sharded Hugging Face layout,
seeded, so the same options give the same bytes) is generated once under ``--root`` with
``--experts`` experts. In each of ``--runs`` rounds, every entry ``SWUDI_METHOD[@key=value...]:
MERGEKIT_METHOD`` of ``--methods`` is merged by swudi, every mergekit method named once by
mergekit, and, with ``--baseline-checkout DIR`` (e.g. a worktree of main), the entries of
``--baseline-methods`` by that checkout's swudi ("before" rows), each in a fresh child process one
after the other (the order is reversed every other round, so that no tool always runs on a warmer
page cache, and before/after/mergekit see the same machine load):

- swudi: the real command, ``swudi merge CONFIG`` (Prefect's embedded server included, its start
  as a user sees it; ``SWUDI_LOCAL_PREFECT_API=''`` so that no other server on this machine is
  used; one ``PREFECT_HOME`` for all runs, warmed by an untimed tiny merge per checkout), into a new output and work
  folder each time;
- mergekit: ``mergekit-yaml CONFIG OUT --no-copy-tokenizer`` from its own venv (``--install-mergekit
  DIR`` makes it: ``uv venv`` + ``uv pip install mergekit==0.1.5 torch==2.13.0`` with pip's
  find-links folder).

Measured per child with ``os.wait4``: wall, CPU (user + sys of the child and of the children it
reaped, so the embedded Prefect server's own process counts), peak RSS (``ru_maxrss``: the largest
single process among them). Reported: medians over the runs and the swudi / mergekit ratios;
swudi's own time split (``time_split`` of the flow, from its summary line) is kept in the JSON.

Equivalent settings: ``task_arithmetic`` scale 0.3 = mergekit ``weight: 0.3`` per model (no
normalisation); ``ties`` density 0.2, scale 1 = mergekit ``density: 0.2, weight: 1`` (normalised:
the disjoint mean); ``swudi_a`` (its defaults) is compared with mergekit ``ties``. Both compute in
float32 and write bf16 (mergekit ``dtype: float32, out_dtype: bfloat16``).

Usage::

    python benchmarks/peer_mergekit.py --install-mergekit /tmp/mergekit-venv
    nice -n 5 python benchmarks/peer_mergekit.py --mergekit-venv /tmp/mergekit-venv \\
        --layers 4 --hidden 1024 --vocab 32000 --experts 3 --runs 3 \\
        --methods task_arithmetic:task_arithmetic,ties:ties,swudi_a:ties
    nice -n 5 python benchmarks/peer_mergekit.py --mergekit-venv /tmp/mergekit-venv --layers 8 \\
        --methods swudi_a:ties --record-as layers8
    # this checkout with settings beside main's code (git worktree add --detach /tmp/main main)
    nice -n 5 python benchmarks/peer_mergekit.py --mergekit-venv /tmp/mergekit-venv \\
        --methods task_arithmetic@per_task_diagnostics=false:task_arithmetic \\
        --baseline-checkout /tmp/main --baseline-methods task_arithmetic:task_arithmetic

Writes ``docs/results/peer_mergekit[-RECORD_AS].json`` and ``.md`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
#: swudi params of each method, and mergekit's equivalent per-model parameters (and global ones)
SWUDI_PARAMS: dict[str, dict[str, Any]] = {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2, "scale": 1.0}}
MERGEKIT_PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task_arithmetic": ({"weight": 0.3}, {"normalize": False}),
    "ties": ({"density": 0.2, "weight": 1.0}, {"normalize": True}),
}


def install_mergekit(venv: Path) -> Path:
    """``uv venv`` + mergekit 0.1.5 with the CPU torch wheel of pip's find-links folder; its bin/."""
    find_links = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["uv", "venv", "-q", str(venv)], check=True)
    command = ["uv", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN]
    if find_links:
        command[3:3] = ["--find-links", find_links]
    subprocess.run(command, check=True, env={**os.environ, "VIRTUAL_ENV": str(venv)})
    return venv / "bin"


def make_models(root: Path, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The generated base and experts under ``root`` (reused when already written with these options)."""
    import torch

    from swudi.io.synthetic import SyntheticLlama, write_synthetic_models

    model = SyntheticLlama(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate or _llama_intermediate(args.hidden),
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
    )
    stamp = root / "models.json"
    wanted = {"model": repr(model), "experts": args.experts, "dtype": "bfloat16", "shard": args.shard_size}
    base, experts = str(root / "base"), [str(root / f"expert-{i}") for i in range(args.experts)]
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return base, experts
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base, experts = write_synthetic_models(
        str(root), args.experts, model, dtype=torch.bfloat16, max_shard_size=args.shard_size
    )
    stamp.write_text(json.dumps(wanted))
    return base, experts


def _llama_intermediate(hidden: int) -> int:
    """Llama's MLP width for a hidden size (11008 / 4096 of it, a multiple of 64)."""
    return round(hidden * 11008 / 4096 / 64) * 64


def swudi_config(path: Path, method: str, base: str, experts: list[str], out: Path, extra: dict[str, Any]) -> Path:
    settings = {
        "base": base,
        "experts": experts,
        "method": method,
        "params": SWUDI_PARAMS.get(method, {}),
        "output": str(out / "published"),
        "work_dir": str(out / "work"),
        "device": "cpu",
        **extra,
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def mergekit_config(path: Path, method: str, base: str, experts: list[str]) -> Path:
    per_model, global_ = MERGEKIT_PARAMS[method]
    settings = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
        "parameters": global_,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def measure(command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``command`` as a child; its wall, CPU (user + sys, reaped descendants included), peak RSS."""
    started = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({child.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
    }


def swudi_split(log: Path) -> dict[str, float]:
    """The flow's time split from ``swudi merge``'s summary (``N s in the flow: read 1.2 s, ...``)."""
    text = " ".join(log.read_text().split())  # the console wraps long lines
    found = re.search(r"([\d.]+) s in the flow: (.*?) read [\d.]+ MB of the inputs", text)
    if not found:
        return {}
    split = {"flow": float(found.group(1))}
    split.update({k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", found.group(2))})
    return split


def prefect_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "SWUDI_LOCAL_PREFECT_API": "",
            "COLUMNS": "1000",  # the summary line on one line
        }
    )
    return env


def parse_entry(entry: str) -> tuple[str, dict[str, Any], str]:
    """``SWUDI_METHOD[@key=value...]:MERGEKIT_METHOD`` -> (swudi method, its extra settings, mergekit method)."""
    swudi, _, mergekit = entry.partition(":")
    method, *settings = swudi.split("@")
    extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in settings)}
    return method, extra, mergekit or method


def label(method: str, extra: dict[str, Any]) -> str:
    return method + "".join(f" {k}={json.dumps(v)}" for k, v in extra.items())


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root or Path(tempfile.gettempdir()) / f"swudi-peer-{args.layers}x{args.hidden}x{args.vocab}")
    base, experts = make_models(root / "models", args)
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    env = prefect_env(root / "prefect-home")
    common = yaml.safe_load(args.swudi_set) if args.swudi_set else {}
    mergekit_bin = str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml")
    # jobs of one round: (row label, tool, checkout, swudi method, settings, mergekit method)
    jobs: list[tuple[str, str, Path, str, dict[str, Any], str]] = []
    checkouts = [("", ROOT, args.methods)]
    if args.baseline_checkout:
        checkouts.append(("before: ", Path(args.baseline_checkout).resolve(), args.baseline_methods))
    mergekit_methods: list[str] = []
    for prefix, checkout, entries in checkouts:
        for entry in filter(None, entries.split(",")):
            method, extra, mk = parse_entry(entry)
            jobs.append((prefix + label(method, extra), "swudi", checkout, method, {**common, **extra}, mk))
            if mk not in mergekit_methods:
                mergekit_methods.append(mk)
    jobs += [(f"mergekit {mk}", "mergekit", ROOT, "", {}, mk) for mk in mergekit_methods]

    # untimed: Prefect's database created and bytecode compiled for every checkout (a tiny merge)
    warm_args = argparse.Namespace(
        **{**vars(args), "layers": 1, "hidden": 64, "vocab": 128, "intermediate": 128, "heads": 4, "kv_heads": 2}
    )
    wbase, wexperts = make_models(root / "warm-models", warm_args)
    for _, checkout, _ in checkouts:
        out = Path(tempfile.mkdtemp(dir=runs, prefix="warm-"))
        cfg = swudi_config(out / "c.yaml", "task_arithmetic", wbase, wexperts, out, common)
        measure([sys.executable, "-m", "swudi.cli", "merge", str(cfg)], env, out / "log", checkout)

    samples: dict[str, list[dict[str, Any]]] = {job[0]: [] for job in jobs}
    splits: dict[str, list[dict[str, float]]] = {job[0]: [] for job in jobs}
    for r in range(args.runs):
        for name, tool, checkout, method, extra, mk in jobs if r % 2 == 0 else jobs[::-1]:
            out = Path(tempfile.mkdtemp(dir=runs, prefix=f"{r}-{tool}-"))
            if tool == "swudi":
                cfg = swudi_config(out / "c.yaml", method, base, experts, out, extra)
                got = measure([sys.executable, "-m", "swudi.cli", "merge", str(cfg)], env, out / "log", checkout)
                splits[name].append(swudi_split(out / "log"))
            else:
                cfg = mergekit_config(out / "c.yaml", mk, base, experts)
                got = measure(
                    [mergekit_bin, str(cfg), str(out / "merged"), "--no-copy-tokenizer", "--quiet"],
                    env,
                    out / "log",
                    checkout,
                )
            samples[name].append(got)
            print(f"run {r} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
            if not args.keep:
                for folder in ("published", "merged", "work"):
                    shutil.rmtree(out / folder, ignore_errors=True)

    def median(name: str) -> dict[str, float]:
        return {m: statistics.median(x[m] for x in samples[name]) for m in samples[name][0]}

    rows = []
    for name, tool, _, _, _, mk in jobs:
        if tool != "swudi":
            continue
        s, m = median(name), median(f"mergekit {mk}")
        split_keys = sorted({k for x in splits[name] for k in x})
        rows.append(
            {
                "swudi": name,
                "mergekit": mk,
                "swudi_median": s,
                "mergekit_median": m,
                "ratio": {k: s[k] / m[k] for k in s},
                "swudi_split_median": {k: statistics.median(x.get(k, 0.0) for x in splits[name]) for k in split_keys},
                "swudi_samples": samples[name],
                "mergekit_samples": samples[f"mergekit {mk}"],
            }
        )
    return {
        "command": "python " + shlex.join(["benchmarks/peer_mergekit.py", *sys.argv[1:]]),
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate or _llama_intermediate(args.hidden),
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "experts": args.experts,
            "dtype": "bfloat16",
        },
        "runs": args.runs,
        "swudi_set": common,
        "baseline_checkout": args.baseline_checkout,
        "load_average_before": LOAD_BEFORE,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    model = result["model"]
    lines = [
        f"`{result['command']}`",
        "",
        f"Model: Llama-shaped, {model['layers']} layers, hidden {model['hidden']}, MLP {model['intermediate']}, "
        f"{model['heads']} heads ({model['kv_heads']} k/v), vocab {model['vocab']}, {model['experts']} experts, "
        f"bf16. Medians of {result['runs']} interleaved runs; {result['cpus']} CPUs, load average "
        f"{' / '.join(f'{x:.1f}' for x in result['load_average_before'])} before, "
        f"{' / '.join(f'{x:.1f}' for x in result['load_average_after'])} after."
        + (f" swudi settings: `{json.dumps(result['swudi_set'])}`." if result["swudi_set"] else ""),
        "",
        "| swudi : mergekit | swudi wall | mergekit wall | wall | swudi CPU | mergekit CPU | CPU | "
        "swudi peak RSS | mergekit peak RSS | RSS | swudi flow split |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        s, m, r = row["swudi_median"], row["mergekit_median"], row["ratio"]
        split = ", ".join(f"{k} {v:.1f}" for k, v in row["swudi_split_median"].items() if v >= 0.05)
        lines.append(
            f"| {row['swudi']} : {row['mergekit']} | {s['wall_s']:.1f} s | {m['wall_s']:.1f} s | {r['wall_s']:.2f}x | "
            f"{s['cpu_s']:.1f} s | {m['cpu_s']:.1f} s | {r['cpu_s']:.2f}x | "
            f"{s['peak_rss_mb']:.0f} MB | {m['peak_rss_mb']:.0f} MB | {r['peak_rss_mb']:.2f}x | {split} |"
        )
    return "\n".join(lines) + "\n"


LOAD_BEFORE = os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install-mergekit", metavar="DIR", help="make a venv with mergekit 0.1.5 at DIR and exit")
    parser.add_argument("--mergekit-venv", metavar="DIR", help="venv holding mergekit-yaml")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width; 0: Llama's ratio (2752 at 1024)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--methods",
        default="task_arithmetic:task_arithmetic,ties:ties,swudi_a:ties",
        help="comma-separated SWUDI_METHOD[@key=value...]:MERGEKIT_METHOD pairs, e.g. "
        "task_arithmetic@per_task_diagnostics=false:task_arithmetic",
    )
    parser.add_argument(
        "--baseline-checkout",
        metavar="DIR",
        help="another swudi checkout (e.g. a worktree of main) run as 'before: ...' rows, interleaved",
    )
    parser.add_argument("--baseline-methods", default="", help="the pairs run from --baseline-checkout")
    parser.add_argument("--swudi-set", default="", help="extra swudi config keys as YAML, e.g. '{workers: 1}'")
    parser.add_argument("--shard-size", default="100MB", help="input shard size (sharded layout)")
    parser.add_argument("--root", help="folder for models and runs (default: a temp folder per model size)")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "peer_mergekit"), help="JSON/markdown stem")
    parser.add_argument("--record-as", default="", help="suffix of the output stem (e.g. layers8)")
    args = parser.parse_args()
    if args.install_mergekit:
        print(install_mergekit(Path(args.install_mergekit)) / "mergekit-yaml")
        if not args.mergekit_venv:
            return
    if not args.mergekit_venv:
        parser.error("--mergekit-venv DIR (made by --install-mergekit DIR) is needed to run the comparison")
    result = run(args)
    stem = args.out + (f"-{args.record_as}" if args.record_as else "")
    Path(stem + ".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    Path(stem + ".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
