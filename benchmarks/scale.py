"""How a merge scales, measured through the real pipeline (issue 10, "Benchmarks").

Generated Llama-shaped checkpoints (``swudi.io.synthetic.SyntheticLlama``: GQA k/v, gate/up/down,
RMSNorm, tied or untied embeddings), written in bfloat16 and sharded, are merged with
``flows.merge.run_merge`` (method ``swudi_a``, device cpu, ``workers: 2``). Every measured merge runs
in its own subprocess, so ``getrusage(RUSAGE_SELF)`` of that child is the case's peak RSS
(``ru_maxrss``) and CPU seconds (``ru_utime + ru_stime``, the child alone: its children are not
counted). One ``prefect server start`` on loopback serves every child (``PREFECT_API_URL``), so no
case pays for a server start-up; the server's own CPU per case is reported beside it. Checkpoints
are generated (and the naive and pipeline outputs compared) in unmeasured children of their own: the
parent never imports torch, because Linux carries the spawning process's peak RSS into a child's
``ru_maxrss`` across vfork + exec (the children also report ``VmHWM``, their own image's peak).

Cases (``--cases``, default all):

- ``depth``: 4 vs 16 layers (h 256, m 688, 8 heads, 2 kv heads, vocab 8000, 3 experts, untied):
  peak RSS ratio 16/4 (target <= 1.2), wall, CPU.
- ``experts``: 2 / 4 / 8 / 16 experts at vocab 32000 (h 256, 2 layers, untied): peak RSS against N
  (embeddings and lm_head are merged as the mean one expert at a time, so RSS should be ~flat in N).
- ``vocab``: vocab 32000 vs 128000 (h 256, 2 layers, 3 experts, untied) under ``memory_budget:
  256MB``: embeddings and lm_head stream in row chunks sized by the budget, so peak RSS should not
  grow with the vocabulary (one [128000, 256] float32 tensor is 125 MiB).
- ``width``: 4 layers at h 2048 (m 5504, 16 heads, 4 kv heads, vocab 8000, tied embeddings,
  3 experts; ``--width-layers``): per-layer cost, per-weight decomposition seconds, and a projection
  to a Llama-3.2-3B-shaped merge (28 layers, h 3072, m 8192, 3 experts): each weight's measured
  decomposition seconds scaled by ``(d_3B / d)^3`` (eigh of the d x d Gram dominates; d = input
  dimension), the other phases by ``m d^2`` (merge, diagnostics: products) or ``m d`` (read, write:
  bytes).
- ``naive``: a straightforward implementation of the published algorithm, no pipeline (below,
  :func:`naive_merge`), on the depth-4 model of ``depth`` (also on the depth-16 model, to show the
  trend, and on the width model when ``width`` runs): time and peak RSS in its own subprocess vs the
  pipeline's; target (depth-4): the pipeline is faster and uses at most half the memory. The two
  merged models are compared tensor by tensor. The naive reference runs with 1 torch thread by
  default (``--naive-threads``): with torch's default (2 threads on 2 cores) MKL's eigh is 100x+
  slower on a loaded shared machine, and a baseline that slow would say nothing about the algorithm.

For every pipeline run the flow result's ``time_split`` (plan, read, decompose, merge, diagnostics,
write, publish, orchestration, wall; the phases are task seconds summed over the parallel tasks)
is printed with the orchestration fraction ``orchestration / wall``, and two cross-checks:

- "orch. from phases": the flow computes orchestration as ``wall - plan - publish - sum(record
  seconds) / parallel tasks``, but a prefetched weight's record seconds start when its read is
  queued, i.e. while the previous weight is still being computed, so the sum over-counts and the
  flow's figure clamps to 0 on multi-weight blocks. The cross-check uses the records' phase seconds
  (read, decompose, merge, diagnostics, write) instead.
- "outside the flow body": wall of the ``run_merge`` call minus the flow's own wall (flow-run
  creation and final state on the server, task runner start/stop, input checks), which the time
  split does not see.

"wall s (merge call)" is the ``run_merge`` call; "CPU s (merge)" the child's CPU over that call;
"CPU s (child total)" adds the interpreter start and imports (torch, Prefect); "RSS after imports"
is ``VmRSS`` just before the merge, so "peak - imports" is what the merge itself added.

Usage::

    .venv/bin/python benchmarks/scale.py                      # everything (~8 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick              # tiny sizes, smoke run (< 2 min)
    .venv/bin/python benchmarks/scale.py --cases depth,naive --json /tmp/scale.json

Generated data lives in a temporary folder under ``--tmp`` (default /tmp), removed at the end
(``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loopback_server import LoopbackServer  # noqa: E402 - after the path
from benchmarks.memory import proc_status_mib  # noqa: E402 - after the path

CASES = ("depth", "experts", "vocab", "width", "naive")
SPLIT_KEYS = ("plan", "read", "decompose", "merge", "diagnostics", "write", "publish", "orchestration", "wall")
WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Shape:
    """A generated Llama-shaped model (``SyntheticLlama`` arguments) and its experts."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    def model(self) -> Any:
        from swudi.io.synthetic import SyntheticLlama

        return SyntheticLlama(**asdict(self))

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        """(m, d) = (out, in) of each 2-D weight of one block."""
        h, m = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (m, h),
            "up_proj": (m, h),
            "down_proj": (h, m),
        }

    def label(self) -> str:
        tied = "tied" if self.tie_embeddings else "untied"
        return (
            f"{self.layers} layers, h {self.hidden}, m {self.intermediate}, heads {self.heads}/{self.kv_heads}, "
            f"vocab {self.vocab}, {tied}"
        )


LLAMA_3B = Shape(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128256, tie_embeddings=True)


@dataclass(frozen=True)
class Sizes:
    depth: tuple[Shape, Shape]
    depth_experts: int
    experts_shape: Shape
    experts_counts: tuple[int, ...]
    width: Shape
    width_experts: int
    shard: dict[str, str]
    vocabs: tuple[Shape, Shape]
    vocab_budget: str


FULL = Sizes(
    depth=(Shape(4, 256, 688, 8, 2, 8000), Shape(16, 256, 688, 8, 2, 8000)),
    depth_experts=3,
    experts_shape=Shape(2, 256, 688, 8, 2, 32000),
    experts_counts=(2, 4, 8, 16),
    width=Shape(4, 2048, 5504, 16, 4, 8000, tie_embeddings=True),
    width_experts=3,
    shard={"depth": "8MB", "experts": "16MB", "width": "200MB", "vocab": "64MB"},
    vocabs=(Shape(2, 256, 688, 8, 2, 32000), Shape(2, 256, 688, 8, 2, 128000)),
    vocab_budget="256MB",
)
QUICK = Sizes(
    depth=(Shape(2, 64, 172, 4, 2, 512), Shape(8, 64, 172, 4, 2, 512)),
    depth_experts=3,
    experts_shape=Shape(1, 64, 172, 4, 2, 4000),
    experts_counts=(2, 4),
    width=Shape(1, 256, 688, 8, 2, 512, tie_embeddings=True),
    width_experts=3,
    shard={"depth": "200KB", "experts": "400KB", "width": "1MB", "vocab": "1MB"},
    vocabs=(Shape(1, 64, 172, 4, 2, 4000), Shape(1, 64, 172, 4, 2, 16000)),
    vocab_budget="8MB",
)


# ------------------------------------------------------------------------------ measured children
def _proc_status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak of this process image) from /proc/self/status, in MiB (NaN if absent)."""
    value = proc_status_mib(field)
    return float("nan") if value is None else value


def _rss_now_mib() -> float:
    return _proc_status_mib("VmRSS")


def _usage() -> dict[str, float]:
    """CPU seconds and peak RSS of this process. ``ru_maxrss`` (KiB on Linux) is the larger of this
    image's peak and what Linux carried over at exec (the spawning process's high-water mark when
    the child was made by vfork/posix_spawn); ``VmHWM`` is this image's own peak. The parent of the
    measured children keeps torch out of its memory so that both agree (both are reported)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": u.ru_utime + u.ru_stime, "maxrss_mib": u.ru_maxrss / 1024, "hwm_mib": _proc_status_mib("VmHWM")}


def _measured(work: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``work()`` and what a measured child reports of it: wall seconds, CPU seconds of the work and of
    the whole process, peak RSS (ru_maxrss and VmHWM) and the RSS before it (after the imports)."""
    before, rss_imports = _usage(), _rss_now_mib()
    started = time.perf_counter()
    value = work()
    wall = time.perf_counter() - started
    after = _usage()
    return value, {
        "wall": wall,
        "cpu_merge": after["cpu"] - before["cpu"],
        "cpu_total": after["cpu"],
        "peak_rss_mib": after["maxrss_mib"],
        "vm_hwm_mib": after["hwm_mib"],
        "rss_after_imports_mib": rss_imports,
    }


def child_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One merge through the real flow (in this process: a measured child)."""
    from flows.history import wait_for_run_history
    from flows.merge import run_merge
    from swudi.config.merge_config import config_from_mapping

    config = config_from_mapping(
        {
            "base": spec["base"],
            "experts": spec["experts"],
            "method": "swudi_a",
            "device": "cpu",
            "workers": 2,
            "output": spec["output"],
            "memory_budget": spec.get("memory_budget"),
        }
    )
    result, measured = _measured(lambda: run_merge(config))
    try:  # outside the measurement: every task run reaches the server before the child exits
        wait_for_run_history({result["flow_run_id"]: result["task_runs"]})
    except Exception as error:  # noqa: BLE001 - a benchmark reports, it does not fail on history
        print(f"run history wait failed: {error}", file=sys.stderr)
    return {
        **measured,
        "time_split": result["time_split"],
        "url": result["url"],
        "layers": result["layers"],
        "groups": result["groups"],
        "task_runs": result["task_runs"],
        "io": result["io"],
        "records": [
            {"names": list(r["names"]), "rank": r["rank"], "seconds": r["seconds"], "phases": r["phases"]}
            for r in result["records"]
        ],
    }


# ------------------------------------------------------------- NAIVE REFERENCE (no pipeline) ---
def _load_checkpoint(folder: str) -> dict[str, Any]:
    """Every tensor of a (sharded) safetensors checkpoint, with safetensors.torch.load_file."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def naive_merge(base_dir: str, expert_dirs: list[str], out_file: str) -> dict[str, int]:
    """NAIVE SWUDI-A, straight from method.md, no pipeline: the whole model's task vectors in memory
    as float32; per 2-D weight (embeddings and lm_head excluded), C = sum_i w_i tau_i^T tau_i and
    D = sum_i w_i tau_i (tau_i^T tau_i) formed task by task (d x d Gram each), full eigh of C,
    K = ceil((sum sqrt(lambda))^2 / sum lambda) (participation_sqrt, clamped to [1, d]), then
    theta = S (I - Q_K Q_K^T) + D Q_K diag(1/lambda_K) Q_K^T with S = sum_i tau_i (init = sum);
    every other tensor gets the mean task vector. W = W0 + theta, cast to the base dtype, saved in
    one safetensors file. Returns the rank chosen per weight. (Threads: ``--naive-threads``, default 1;
    torch's default of one thread per core makes eigh far slower on a loaded 2-core machine, which
    would flatter the pipeline.)"""
    import torch
    from safetensors.torch import save_file

    base = _load_checkpoint(base_dir)
    dtypes = {name: t.dtype for name, t in base.items()}
    base = {name: t.float() for name, t in base.items()}
    task_vectors = []  # [N] dicts: every task vector of the whole model, float32
    for expert_dir in expert_dirs:
        expert = _load_checkpoint(expert_dir)
        task_vectors.append({name: expert[name].float() - w0 for name, w0 in base.items()})
        del expert
    merged: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for name, w0 in base.items():
        taus = [tv[name] for tv in task_vectors]
        if w0.ndim == 2 and "embed" not in name and "lm_head" not in name:
            m, d = w0.shape
            c = torch.zeros(d, d)
            dm = torch.zeros(m, d)
            for tau in taus:
                w = 1.0 / max(float(tau.pow(2).sum()), 1e-12)
                gram = tau.T @ tau  # d x d, one task at a time
                c += w * gram
                dm += w * (tau @ gram)
            lam, q = torch.linalg.eigh(c)
            lam, q = lam.flip(0).clamp_min(1e-8), q.flip(1)
            k = math.ceil(float(lam.sqrt().sum()) ** 2 / float(lam.sum()))
            k = min(max(k, 1), d)
            qk = q[:, :k]
            s = torch.stack(taus).sum(0)
            theta = s - (s @ qk) @ qk.T + ((dm @ qk) / lam[:k]) @ qk.T
            ranks[name] = k
        else:
            theta = torch.stack(taus).mean(0)
        merged[name] = (w0 + theta).to(dtypes[name]).contiguous()
    save_file(merged, out_file)
    return ranks


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # imported before the baseline RSS is read, like the pipeline child

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    ranks, measured = _measured(lambda: naive_merge(spec["base"], spec["experts"], spec["output"]))
    return {
        **measured,
        "ranks": ranks,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------- parent: harness
def _prefect_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    return env


class Harness:
    def __init__(self, root: Path, server: LoopbackServer | None):
        self.root = root
        self.server = server
        self.runs = 0

    def run_child(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.runs += 1
        spec_file = self.root / f"child-{self.runs}.json"
        out_file = self.root / f"child-{self.runs}.out.json"
        spec_file.write_text(json.dumps(spec))
        env = _prefect_env(self.root / "client-home")
        if self.server is not None:
            env["PREFECT_API_URL"] = self.server.url
        server_cpu = self.server.cpu() if self.server else 0.0
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_child",
                kind,
                "--_spec",
                str(spec_file),
                "--_out",
                str(out_file),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{kind} child failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(out_file.read_text())
        result["process_wall"] = time.perf_counter() - started
        if self.server is not None:
            result["server_cpu"] = self.server.cpu() - server_cpu
        return result


def child_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the base and experts (a child of its own: not measured, keeps torch out of the parent)."""
    import torch

    from swudi.io.synthetic import write_synthetic_models

    started = time.perf_counter()
    model = Shape(**spec["shape"]).model()
    base, urls = write_synthetic_models(
        spec["root"], spec["experts"], model, dtype=torch.bfloat16, max_shard_size=spec["shard"]
    )
    return {"base": base, "experts": urls, "seconds": time.perf_counter() - started}


def _generate(h: Harness, root: Path, shape: Shape, experts: int, shard: str) -> tuple[str, list[str], float]:
    spec = {"root": str(root), "shape": asdict(shape), "experts": experts, "shard": shard}
    done = h.run_child("generate", spec)
    return done["base"], done["experts"], done["seconds"]


def _folder_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def _pipeline(h: Harness, base: str, experts: list[str], out: Path, memory_budget: str | None = None) -> dict[str, Any]:
    spec = {"base": base, "experts": experts, "output": str(out), "memory_budget": memory_budget}
    return h.run_child("pipeline", spec)


# ------------------------------------------------------------------------------------- formatting
def _mib(x: float) -> str:
    return f"{x:,.0f}"


def _orchestration_from_phases(r: dict[str, Any]) -> float:
    """wall - plan - publish - (sum of the task phases) / tasks in parallel: the flow's own formula,
    but with the records' phase seconds instead of their ``seconds`` (see the module doc)."""
    split = r["time_split"]
    phases = sum(split.get(k, 0.0) for k in ("read", "decompose", "merge", "diagnostics", "write"))
    parallel = max(1, min(2, r.get("task_runs", 6) - 4))
    return max(0.0, split["wall"] - split["plan"] - split["publish"] - phases / parallel)


def _split_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| run | "
        + " | ".join(SPLIT_KEYS)
        + " | orchestration / wall | orch. from phases (/ wall) | merge call - flow wall (outside the flow body) |",
        "|---|" + "---:|" * (len(SPLIT_KEYS) + 3),
    ]
    for label, r in rows:
        split = r["time_split"]
        frac = split["orchestration"] / split["wall"] if split["wall"] else float("nan")
        orch = _orchestration_from_phases(r)
        outside = r["wall"] - split["wall"]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{split.get(k, 0.0):.2f}" for k in SPLIT_KEYS)
            + f" | {frac:.0%} | {orch:.2f} ({orch / split['wall']:.0%}) | {outside:.2f} |"
        )
    return lines


def _run_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| run | wall s (merge call) | CPU s (merge) | CPU s (child total) | server CPU s | RSS after imports MiB "
        "| peak RSS MiB (ru_maxrss) | peak - imports MiB | VmHWM MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        server = f"{r['server_cpu']:.1f}" if "server_cpu" in r else "-"
        lines.append(
            f"| {label} | {r['wall']:.1f} | {r['cpu_merge']:.1f} | {r['cpu_total']:.1f} | {server} "
            f"| {_mib(r['rss_after_imports_mib'])} | {_mib(r['peak_rss_mib'])} "
            f"| {_mib(r['peak_rss_mib'] - r['rss_after_imports_mib'])} | {_mib(r.get('vm_hwm_mib', float('nan')))} |"
        )
    return lines


def _emit(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------------ cases
def case_depth(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    rows = []
    for shape in sizes.depth:
        root = h.root / f"depth-{shape.layers}"
        base, experts, gen = _generate(h, root / "in", shape, sizes.depth_experts, sizes.shard["depth"])
        r = _pipeline(h, base, experts, root / "out")
        r.update(
            shape=asdict(shape),
            experts=sizes.depth_experts,
            generate_seconds=gen,
            input_bytes=_folder_bytes(str(root / "in")),
            base=base,
            expert_urls=experts,
        )
        rows.append((f"{shape.layers} layers", r))
    small, large = rows[0][1], rows[-1][1]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    ratio_above = (large["peak_rss_mib"] - large["rss_after_imports_mib"]) / max(
        small["peak_rss_mib"] - small["rss_after_imports_mib"], 1e-9
    )
    out["depth"] = {"runs": dict(rows), "peak_rss_ratio": ratio, "peak_rss_above_imports_ratio": ratio_above}
    _emit(
        [
            "",
            f"## depth: {sizes.depth[0].label()} vs {sizes.depth[1].layers} layers, "
            f"{sizes.depth_experts} experts, bf16, shards {sizes.shard['depth']}",
            "",
            *_run_table(rows),
            "",
            f"peak RSS ratio {sizes.depth[1].layers}/{sizes.depth[0].layers} layers: "
            f"{ratio:.2f} (target <= 1.2); above the after-imports RSS: {ratio_above:.2f}",
            "",
            *_split_table(rows),
        ]
    )


def case_experts(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    shape = sizes.experts_shape
    root = h.root / "experts"
    base, experts, gen = _generate(h, root / "in", shape, max(sizes.experts_counts), sizes.shard["experts"])
    rows = []
    for n in sizes.experts_counts:
        r = _pipeline(h, base, experts[:n], root / f"out-{n}")
        r.update(experts=n)
        rows.append((f"N = {n}", r))
    ns = [r["experts"] for _, r in rows]
    rss = [r["peak_rss_mib"] for _, r in rows]
    slope = _slope(ns, rss)
    emb_mib = shape.vocab * shape.hidden * 4 / MiB
    out["experts"] = {
        "runs": dict(rows),
        "shape": asdict(shape),
        "generate_seconds": gen,
        "peak_rss_slope_mib_per_expert": slope,
        "embedding_float32_mib": emb_mib,
    }
    _emit(
        [
            "",
            f"## experts: {shape.label()}, bf16, shards {sizes.shard['experts']}",
            "",
            *_run_table(rows),
            "",
            f"peak RSS growth: {slope:.1f} MiB per expert (least squares over N = "
            f"{', '.join(map(str, ns))}); one [vocab, h] float32 tensor is {emb_mib:.1f} MiB; "
            f"N={ns[-1]} vs N={ns[0]}: {rss[-1] / rss[0]:.2f}x",
            "",
            *_split_table(rows),
        ]
    )


def case_vocab(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    """Peak RSS at two vocabularies under one ``memory_budget``: embeddings and lm_head stream in
    row chunks, so the merge's peak should not grow with the vocabulary."""
    rows = []
    for shape in sizes.vocabs:
        root = h.root / f"vocab-{shape.vocab}"
        base, experts, gen = _generate(h, root / "in", shape, 3, sizes.shard["vocab"])
        r = _pipeline(h, base, experts, root / "out", memory_budget=sizes.vocab_budget)
        r.update(vocab=shape.vocab, generate_seconds=gen)
        rows.append((f"vocab {shape.vocab}", r))
    small, large = rows[0][1], rows[1][1]
    emb = [s.vocab * s.hidden * 4 / MiB for s in sizes.vocabs]
    ratio = (large["peak_rss_mib"] - large["rss_after_imports_mib"]) / max(
        1e-9, small["peak_rss_mib"] - small["rss_after_imports_mib"]
    )
    out["vocab"] = {"runs": dict(rows), "budget": sizes.vocab_budget, "merge_rss_ratio": ratio}
    _emit(
        [
            "",
            f"## vocab: {sizes.vocabs[0].label()} vs vocab {sizes.vocabs[1].vocab}, 3 experts, "
            f"memory_budget {sizes.vocab_budget}",
            "",
            *_run_table(rows),
            "",
            f"one [vocab, h] float32 tensor: {emb[0]:.1f} vs {emb[1]:.1f} MiB; peak RSS "
            f"{large['peak_rss_mib'] / small['peak_rss_mib']:.2f}x, peak - imports {ratio:.2f}x",
            "",
            *_split_table(rows),
        ]
    )


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _weight_type(name: str) -> str | None:
    for w in WEIGHTS:
        if f".{w}." in name:
            return w
    return None


def case_width(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    shape = sizes.width
    root = h.root / "width"
    base, experts, gen = _generate(h, root / "in", shape, sizes.width_experts, sizes.shard["width"])
    r = _pipeline(h, base, experts, root / "out")
    r.update(shape=asdict(shape), experts=sizes.width_experts, generate_seconds=gen, base=base, expert_urls=experts)
    layers = shape.layers
    # per weight type: phase seconds (mean over layers) from the task records
    per_type: dict[str, dict[str, float]] = {}
    for rec in r["records"]:
        kind = _weight_type(rec["names"][0]) if len(rec["names"]) == 1 else None
        if kind is None:
            continue
        acc = per_type.setdefault(kind, {"seconds": 0.0, "rank": 0.0})
        acc["seconds"] += rec["seconds"] / layers
        acc["rank"] += (rec["rank"] or 0) / layers
        for phase, sec in rec["phases"].items():
            acc[phase] = acc.get(phase, 0.0) + sec / layers
    measured, target = shape.weight_shapes(), LLAMA_3B.weight_shapes()
    proj_rows, proj_dec, proj_other = [], 0.0, 0.0
    for kind in WEIGHTS:
        p = per_type.get(kind, {})
        (m0, d0), (m1, d1) = measured[kind], target[kind]
        dec = p.get("decompose", 0.0) * (d1 / d0) ** 3
        products = (p.get("merge", 0.0) + p.get("diagnostics", 0.0)) * (m1 * d1 * d1) / (m0 * d0 * d0)
        bytes_ = (p.get("read", 0.0) + p.get("write", 0.0)) * (m1 * d1) / (m0 * d0)
        proj_dec += dec * LLAMA_3B.layers
        proj_other += (products + bytes_) * LLAMA_3B.layers
        proj_rows.append(
            f"| {kind} | {m0}x{d0} | {p.get('rank', 0):.0f} | {p.get('read', 0):.2f} "
            f"| {p.get('decompose', 0):.2f} | {p.get('merge', 0):.2f} | {p.get('diagnostics', 0):.2f} "
            f"| {p.get('write', 0):.2f} | {p.get('seconds', 0):.2f} | {m1}x{d1} | {dec:.1f} "
            f"| {products + bytes_:.1f} |"
        )
    split = r["time_split"]
    phase_total = sum(split.get(k, 0.0) for k in ("read", "decompose", "merge", "diagnostics", "write"))
    cpu_factor = r["cpu_merge"] / phase_total if phase_total else 1.0  # CPU per task-second of phases
    wall_per_layer = (split["wall"] - split["plan"] - split["publish"]) / layers
    phases_per_layer = sum(
        v
        for p in per_type.values()
        for k, v in p.items()
        if k in ("read", "decompose", "merge", "diagnostics", "write")
    )
    cpu_per_layer = r["cpu_merge"] / layers
    orch_per_layer = _orchestration_from_phases(r) / layers
    proj_task = proj_dec + proj_other
    proj_cpu = proj_task * cpu_factor
    proj_wall = proj_task / 2 + orch_per_layer * LLAMA_3B.layers
    out["width"] = {
        "run": r,
        "per_weight_type": per_type,
        "wall_per_layer": wall_per_layer,
        "task_phase_seconds_per_layer": phases_per_layer,
        "cpu_per_layer": cpu_per_layer,
        "cpu_per_task_phase_second": cpu_factor,
        "projection_3b": {
            "decompose_task_seconds": proj_dec,
            "other_task_seconds": proj_other,
            "task_seconds": proj_task,
            "cpu_seconds": proj_cpu,
            "wall_seconds_2_workers_same_load": proj_wall,
            "wall_seconds_2_idle_cores": proj_cpu / 2,
        },
    }
    _emit(
        [
            "",
            f"## width: {shape.label()}, {sizes.width_experts} experts, bf16, shards {sizes.shard['width']}",
            "",
            *_run_table([(f"{layers} layers", r)]),
            "",
            *_split_table([(f"{layers} layers", r)]),
            "",
            f"per layer: flow wall (wall - plan - publish) / layers {wall_per_layer:.1f} s; task phase seconds of "
            f"the 7 weights {phases_per_layer:.1f} s; child CPU (merge) / layers {cpu_per_layer:.1f} s (includes the "
            f"embedding/norm group and publishing); CPU per task phase second {cpu_factor:.2f} (the 2 task threads "
            "shared the 2 cores with other jobs)",
            "",
            "per weight: task phase seconds (mean over layers, 1 torch thread per task), the record's own seconds "
            "(which, for a prefetched weight, start when its read was queued), and the 3B projection per layer:",
            "",
            "| weight | m x d | rank | read | decompose | merge | diagnostics | write | record seconds | 3B m x d "
            "| 3B decompose = dec x (d_3B/d)^3 | 3B other phases |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
            *proj_rows,
            "",
            "Llama-3.2-3B-shaped projection (28 layers, h 3072, m 8192, 3 experts; per weight: decompose x "
            "(d_3B/d)^3, merge + diagnostics x (m d^2)_3B/(m d^2), read + write x (m d)_3B/(m d); x 28 layers): "
            f"decomposition {proj_dec:,.0f} + other phases {proj_other:,.0f} = {proj_task:,.0f} task-s; "
            f"x {cpu_factor:.2f} CPU per task-s = {proj_cpu:,.0f} CPU-s (~{proj_cpu / 2 / 60:.0f} min on 2 idle "
            f"cores); under this run's load with 2 workers: {proj_task / 2:,.0f} s + orchestration "
            f"{orch_per_layer:.2f} s/layer x 28 = {proj_wall:,.0f} s wall (~{proj_wall / 60:.0f} min); "
            "the [128256, 3072] embedding (mean) is not included.",
        ]
    )


def child_compare(spec: dict[str, Any]) -> dict[str, Any]:
    """Largest relative Frobenius difference, naive vs pipeline, over every tensor (a child of its own)."""
    from safetensors.torch import load_file

    from swudi.io.checkpoint import Checkpoint

    naive = load_file(spec["naive"])
    published = Checkpoint.open(spec["pipeline"])
    worst, worst_name, count = 0.0, "", 0
    for name, tensor in naive.items():
        ours = published.read(name).float()
        diff = float((tensor.float() - ours).norm() / max(float(ours.norm()), 1e-12))
        count += 1
        if diff > worst:
            worst, worst_name = diff, name
    return {"max_relative_difference": worst, "worst_tensor": worst_name, "tensors": count}


def case_naive(h: Harness, sizes: Sizes, out: dict[str, Any], cases: list[str], threads: int) -> None:
    targets: list[tuple[str, dict[str, Any] | None, Shape, int, str, str]] = []
    for shape in sizes.depth:  # the target is on the first (4 layers); the second shows the trend
        run = out.get("depth", {}).get("runs", {}).get(f"{shape.layers} layers")
        if run is None and shape is not sizes.depth[0]:
            continue
        folder = f"depth-{shape.layers}"
        targets.append((folder, run, shape, sizes.depth_experts, sizes.shard["depth"], folder))
    if "width" in cases and "width" in out:
        targets.append(("width", out["width"]["run"], sizes.width, sizes.width_experts, sizes.shard["width"], "width"))
    results: dict[str, Any] = {}
    for label, pipe, shape, n, shard, folder in targets:
        root = h.root / folder
        if pipe is None:  # depth case not run: generate its small model and run the pipeline here
            base, experts, _ = _generate(h, root / "in", shape, n, shard)
            pipe = _pipeline(h, base, experts, root / "out")
            pipe.update(base=base, expert_urls=experts)
        naive = h.run_child(
            "naive",
            {
                "base": pipe["base"],
                "experts": pipe["expert_urls"],
                "output": str(root / "naive.safetensors"),
                "threads": threads,
            },
        )
        same = h.run_child("compare", {"naive": str(root / "naive.safetensors"), "pipeline": pipe["url"]})
        rows = [
            ("pipeline (run_merge, 2 workers x 1 torch thread)", pipe),
            (f"naive (all task vectors in RAM, per-task Grams, {naive['torch_threads']} torch thread(s))", naive),
        ]
        speed = naive["wall"] / pipe["wall"]
        mem = pipe["peak_rss_mib"] / naive["peak_rss_mib"]
        mem_above = (pipe["peak_rss_mib"] - pipe["rss_after_imports_mib"]) / max(
            naive["peak_rss_mib"] - naive["rss_after_imports_mib"], 1e-9
        )
        results[label] = {
            "pipeline": {k: v for k, v in pipe.items() if k != "records"},
            "naive": naive,
            "naive_over_pipeline_wall": speed,
            "pipeline_over_naive_peak_rss": mem,
            "pipeline_over_naive_rss_above_imports": mem_above,
            "outputs": same,
        }
        _emit(
            [
                "",
                f"## naive vs pipeline: {shape.label()}, {n} experts",
                "",
                *_run_table(rows),
                "",
                f"wall: naive / pipeline = {speed:.2f}x (target > 1: pipeline faster); peak RSS: pipeline / naive = "
                f"{mem:.2f} (target <= 0.5); above each process's after-imports RSS: {mem_above:.2f}; CPU (merge): "
                f"naive {naive['cpu_merge']:.1f} s vs pipeline {pipe['cpu_merge']:.1f} s (+ server "
                f"{pipe.get('server_cpu', 0.0):.1f} s)",
                f"merged models agree: max relative Frobenius difference {same['max_relative_difference']:.2e} "
                f"({same['worst_tensor']}, {same['tensors']} tensors, bf16 outputs)",
            ]
        )
    out["naive"] = results


CHILDREN = {"pipeline": child_pipeline, "naive": child_naive, "generate": child_generate, "compare": child_compare}


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, < 2 minutes)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--width-layers", type=int, help="layers of the width model (default 4, issue 10; quick 1)")
    parser.add_argument(
        "--naive-threads",
        type=int,
        default=1,
        help="torch threads of the naive reference (default 1; 0: torch's default)",
    )
    parser.add_argument("--tmp", default="/tmp", help="parent folder of the generated data")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--_child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        spec = json.loads(args._spec.read_text())
        result = CHILDREN[args._child](spec)
        args._out.write_text(json.dumps(result))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    sizes = QUICK if args.quick else FULL
    if args.width_layers:
        sizes = replace(sizes, width=replace(sizes.width, layers=args.width_layers))

    root = Path(tempfile.mkdtemp(prefix="swudi-scale-", dir=args.tmp))
    started = time.perf_counter()
    out: dict[str, Any] = {
        "cases": cases,
        "quick": args.quick,
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "tmp": str(root),
    }
    server = None
    try:
        server = LoopbackServer(_prefect_env(root / "server-home"))  # one for every case
        out["server_startup_seconds"] = server.startup
        h = Harness(root, server)
        _emit(
            [
                f"# swudi scale benchmark ({'quick' if args.quick else 'full'}): cases {', '.join(cases)}; "
                f"{os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; method swudi_a, "
                f"device cpu, workers 2; one prefect server (start-up {server.startup:.1f} s, not in any case)"
            ]
        )
        for case in CASES:  # fixed order: naive reuses the depth and width runs
            if case not in cases:
                continue
            mark = time.perf_counter()
            if case == "depth":
                case_depth(h, sizes, out)
            elif case == "experts":
                case_experts(h, sizes, out)
            elif case == "vocab":
                case_vocab(h, sizes, out)
            elif case == "width":
                case_width(h, sizes, out)
            else:
                case_naive(h, sizes, out, cases, args.naive_threads)
            print(f"\n({case}: {time.perf_counter() - mark:.0f} s including generation)", flush=True)
    finally:
        if server is not None:
            server.stop()
        out["loadavg_end"] = os.getloadavg()
        out["total_seconds"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str))
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {out['total_seconds']:.0f} s; load at the end {' '.join(f'{x:.2f}' for x in out['loadavg_end'])}")


if __name__ == "__main__":
    main()
