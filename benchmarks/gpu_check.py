"""The GPU path, checked in one run: parity, per-layer timings, a generated 3B-shaped merge.

Three sections, printed and (``--out FILE``) written as JSON:

1. **Parity.** Random low-rank + noise task vectors (N = 4 and 8; 4096x4096, 4096x1024,
   1024x4096 and 512x4096, the last one taking the thin-SVD route at N = 4) go through
   ``swudi.decompose`` + ``swudi.merge_decomposition`` (``swudi`` and ``swudi_a``) and through
   ``swudi.merge_matrix`` on ``--device``. Eigenvalues and merged theta are compared with

   - on ``cuda``: the same library calls on the CPU (the CPU/GPU parity), and a float64 reference;
   - on ``cpu``: the float64 reference (so the check means something without a GPU).

   The float64 reference is written here from method.md, not from the library:
   C = sum_i w_i tau_i^T tau_i, D = sum_i w_i tau_i tau_i^T tau_i, eigh in float64, then
   theta = theta0 - theta0 Q diag(f) Q^T + D Q diag(f / lambda) Q^T with the SWUDI filter
   (1 - exp(-t lambda) on the top ceil(rank_ratio d)) and the SWUDI-A one (1 on the top
   participation_sqrt rank). Errors are max |a - b| / max |b| (eigenvalues: over the largest
   eigenvalue); each prints a PASS or FAIL line. The tolerance is 1e-3, except where float32
   itself cannot reach it: a hard cut that falls among close eigenvalues (SWUDI's cut at 65% of d
   lies in the noise bulk) makes theta as uncertain as the float32 eigenvectors there. The
   reference measures that floor per case (the same formulas with only the eigendecomposition in
   float32, on each float32 side's solver) and the tolerance becomes 10x the floor when larger;
   such lines say "above 1e-3".
2. **Per-layer timings** on ``--device`` (CUDA: ``torch.cuda.synchronize`` around every step,
   one warm-up run first): ``decompose``, the ``swudi`` and ``swudi_a`` filters, and
   ``merge_matrix`` (the one-call path), at the 4096-wide shapes (N = 4, 8) and at the
   Llama-3.2-3B shapes (q/o 3072x3072, k/v 1024x3072, gate/up 8192x3072, down 3072x8192; N = 3),
   with the peak GPU memory above the inputs (``torch.cuda.max_memory_allocated``).
3. **A generated 3B-shaped merge end to end on the device**: 28 layers x 7 weights, N experts
   (``--merge-experts``, default 5 as in the paper's Llama-3.2-3B run). Each layer's task vectors
   are generated on the device on the fly (nothing is written to disk: 28 layers of 5 experts
   hold 14 billion values, 28 GB even in bf16, more than the time limit allows for writing and
   reading back), merged with ``swudi.merge_matrix``
   (``swudi``, t = 300, rank_ratio = 0.85: the paper's Llama-3.2-3B setting) and copied to the
   host, as a merge that writes a checkpoint must. The embedding (128256 x 3072) gets the mean,
   as the default routing does. Generation is timed apart and not counted. The total is compared
   with the paper's 70.9 s (method.md). If the run would pass ``--time-budget`` seconds, the
   remaining layers are projected from the measured ones (and the output says so).

``--quick`` shrinks everything (256-wide shapes, a 2-layer model with hidden 256) for a CPU test.

Usage (from the repository root; ``benchmarks/gpu_check.sh`` picks the interpreter first)::

    bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json     # on a machine with CUDA
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import swudi

ROOT = Path(__file__).resolve().parents[1]

TOLERANCE = 1e-3
FLOOR_FACTOR = 10.0  # a float32 result may be this many times the float32-eigh floor (see tolerance())
EIGENVALUE_FLOOR = 1e-8  # method.md: floor eigenvalues at 1e-8
SWUDI_PARAMS: dict[str, Any] = {"t": 1300.0, "rank_ratio": 0.65}  # method.md default setting
SWUDI_A_PARAMS: dict[str, Any] = {"rank_rule": "participation_sqrt"}
LLAMA_PARAMS: dict[str, Any] = {"t": 300.0, "rank_ratio": 0.85}  # method.md, Llama-3.2-3B row
PAPER_LLAMA_3B_SECONDS = 70.9  # method.md: merge-only wall clock, Llama-3.2-3B, 5 experts, GPU
TASK_RANK = 16  # rank of each generated task vector's low-rank part
NOISE = 0.1  # dense noise, relative to the entries of the low-rank part
SCALE = 1e-3  # size of an entry of a task vector (fine-tuning deltas are small)

Shape = tuple[int, int]


@dataclass(frozen=True)
class Profile:
    """The sizes one run uses (full: the GPU check; quick: a CPU smoke test)."""

    name: str
    parity_shapes: tuple[Shape, ...]
    parity_experts: tuple[int, ...]
    layer_weights: tuple[tuple[str, Shape], ...]  # (name, (out, in)) of one transformer block
    layer_experts: int
    layers: int
    vocab: int
    hidden: int


def llama_block(hidden: int, kv: int, intermediate: int) -> tuple[tuple[str, Shape], ...]:
    """The seven 2-D weights of one Llama block, (out, in) as stored in the checkpoint."""
    return (
        ("self_attn.q_proj", (hidden, hidden)),
        ("self_attn.k_proj", (kv, hidden)),
        ("self_attn.v_proj", (kv, hidden)),
        ("self_attn.o_proj", (hidden, hidden)),
        ("mlp.gate_proj", (intermediate, hidden)),
        ("mlp.up_proj", (intermediate, hidden)),
        ("mlp.down_proj", (hidden, intermediate)),
    )


FULL = Profile(
    name="full",
    parity_shapes=((4096, 4096), (4096, 1024), (1024, 4096), (512, 4096)),
    parity_experts=(4, 8),
    layer_weights=llama_block(3072, 1024, 8192),  # Llama-3.2-3B
    layer_experts=3,
    layers=28,
    vocab=128256,
    hidden=3072,
)
QUICK = Profile(
    name="quick",
    parity_shapes=((256, 256), (256, 64), (64, 256), (32, 256)),
    parity_experts=(4, 8),
    layer_weights=llama_block(256, 96, 704),
    layer_experts=3,
    layers=2,
    vocab=1024,
    hidden=256,
)


# ------------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...`` -> ``t.seconds``: wall time, the device synchronized at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def mib(nbytes: float) -> float:
    """Bytes to MiB."""
    return nbytes / 2**20


def task_vectors(
    n: int, m: int, d: int, *, generator: torch.Generator, device: torch.device, rank: int = TASK_RANK
) -> torch.Tensor:
    """``[n, m, d]`` float32: per task a random rank-``rank`` matrix plus ``NOISE`` dense noise."""
    r = min(rank, m, d)
    a = torch.randn(n, m, r, generator=generator, device=device)
    b = torch.randn(n, r, d, generator=generator, device=device)
    tv = torch.bmm(a, b).mul_(1.0 / math.sqrt(r))
    tv.add_(torch.randn(n, m, d, generator=generator, device=device), alpha=NOISE)
    return tv.mul_(SCALE)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``."""
    return torch.Generator(device=device).manual_seed(seed)


def fmt_shape(shape: Sequence[int]) -> str:
    """(m, d) -> 'mxd'."""
    return "x".join(str(int(s)) for s in shape)


def git_commit() -> str | None:
    """The repository's HEAD commit, or None (no git, or a copy without .git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """What the run found: interpreter, torch, CUDA, the device and the CPU."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": str(device),
        "device_name": None,
        "device_memory_gib": None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "swudi": swudi.__version__,
        "swudi_path": str(Path(swudi.__file__).resolve().parent),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["device_capability"] = f"{props.major}.{props.minor}"
    return env


# ----------------------------------------------------------------------- float64 reference
@dataclass
class Reference:
    """The merge of one weight computed independently of the library (method.md's formulas).

    ``eigenvalues`` and ``theta`` (method -> ``[m, d]``) are float64 throughout. ``float32_floor``
    (eigensolver device -> method -> error) is how far the same formulas land from ``theta`` when
    only the eigendecomposition of C runs in float32 on that device: the accuracy any float32
    merge is limited to, and the scale of the tolerance (see :func:`tolerance`).
    """

    eigenvalues: torch.Tensor
    theta: dict[str, torch.Tensor]
    rank_swudi_a: int
    float32_floor: dict[str, dict[str, float]]


def wudi_quadratic(tv: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tau, C, D) in float64 on ``device``: C = sum_i w_i tau_i^T tau_i, D = sum_i w_i tau_i tau_i^T tau_i."""
    x = tv.to(device=device, dtype=torch.float64)
    _, m, d = x.shape
    c = torch.zeros(d, d, dtype=torch.float64, device=device)
    dmat = torch.zeros(m, d, dtype=torch.float64, device=device)
    for xi in x:
        w = 1.0 / xi.square().sum()
        gram = xi.T @ xi
        c += w * gram
        dmat += w * (xi @ gram)
    return x, c, dmat


def filtered_thetas(
    x: torch.Tensor, c: torch.Tensor, dmat: torch.Tensor, eigh_dtype: torch.dtype, eigh_device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(eigenvalues, {method: theta}, SWUDI-A rank): eigh of C in ``eigh_dtype`` on ``eigh_device``.

    Everything but the eigendecomposition runs in float64 on ``x``'s device:
    theta = theta0 - theta0 Q diag(f) Q^T + D Q diag(f / lambda) Q^T, theta0 = sum_i tau_i, with
    f = (1 - exp(-t lambda)) on the top ceil(rank_ratio d) for SWUDI and f = 1 on the top
    ceil((sum sqrt lambda)^2 / sum lambda) for SWUDI-A (participation_sqrt).
    """
    d = int(c.shape[0])
    lam_asc, q_asc = torch.linalg.eigh(c.to(device=eigh_device, dtype=eigh_dtype))
    lam = lam_asc.to(c).flip(0).clamp(min=EIGENVALUE_FLOOR)
    q = q_asc.to(c).flip(1)
    theta0 = x.sum(dim=0)
    theta_q, dq = theta0 @ q, dmat @ q
    index = torch.arange(d, device=c.device)

    def filtered(f: torch.Tensor) -> torch.Tensor:
        return theta0 - (theta_q * f) @ q.T + (dq * (f / lam)) @ q.T

    k_swudi = math.ceil(SWUDI_PARAMS["rank_ratio"] * d - 1e-9)
    f_swudi = -torch.expm1(-SWUDI_PARAMS["t"] * lam) * (index < k_swudi)
    k_a = min(max(math.ceil(float(lam.sqrt().sum() ** 2 / lam.sum()) - 1e-9), 1), d)
    f_a = (index < k_a).to(torch.float64)
    return lam, {"swudi": filtered(f_swudi), "swudi_a": filtered(f_a)}, k_a


def reference_merge(tv: torch.Tensor, device: torch.device) -> Reference:
    """The float64 reference of ``tv`` ``[N, m, d]`` on ``device``, with the float32-eigh floor.

    The floor is measured with the eigensolver of ``device`` and, on CUDA, of the CPU too.
    """
    x, c, dmat = wudi_quadratic(tv, device)
    lam, theta, k_a = filtered_thetas(x, c, dmat, torch.float64, device)
    floors: dict[str, dict[str, float]] = {}
    for solver in dict.fromkeys((device, torch.device("cpu"))):
        _, theta32, _ = filtered_thetas(x, c, dmat, torch.float32, solver)
        floors[solver.type] = {method: relative_error(theta32[method], theta[method]) for method in theta}
    return Reference(
        eigenvalues=lam.cpu(),
        theta={method: t.cpu() for method, t in theta.items()},
        rank_swudi_a=k_a,
        float32_floor=floors,
    )


# ---------------------------------------------------------------------------------- parity
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in float64)."""
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp(min=1e-300))


def tolerance(quantity: str, compared: Sequence[str], ref: Reference) -> float:
    """The pass threshold of one comparison: ``TOLERANCE``, or more where float32 cannot do better.

    A hard cut (SWUDI's top ceil(rank_ratio d), SWUDI-A's rank) that falls inside a cluster of close
    eigenvalues makes theta as uncertain as the float32 eigenvectors there. The threshold is then
    ``FLOOR_FACTOR`` times the float32 floor of each float32 side (``compared``: their solver
    devices; "float64" adds nothing). Eigenvalues are always held to ``TOLERANCE``.
    """
    if quantity == "eigenvalues":
        return TOLERANCE
    method = quantity.split()[1]
    floor = sum(ref.float32_floor[side][method] for side in compared if side != "float64")
    return max(TOLERANCE, FLOOR_FACTOR * floor)


def library_results(tv: torch.Tensor, device: torch.device, *, one_call: bool = True) -> dict[str, Any]:
    """The library on ``device``: route, eigenvalues, theta per method and the SWUDI-A rank.

    Keys: "route", "eigenvalues", "rank_swudi_a", "theta <method>" (decompose + merge_decomposition)
    and, with ``one_call``, "theta <method> (merge_matrix)" (the one-call path).
    """
    dec = swudi.decompose(tv, device=device)
    rank_a = swudi.spectral_filter(dec.eigenvalues, dec.shape, "swudi_a", **SWUDI_A_PARAMS).count_nonzero()
    out: dict[str, Any] = {"route": dec.route, "eigenvalues": dec.eigenvalues, "rank_swudi_a": int(rank_a)}
    x = tv.to(device)
    for method, params in (("swudi", SWUDI_PARAMS), ("swudi_a", SWUDI_A_PARAMS)):
        out[f"theta {method}"] = swudi.merge_decomposition(dec, method, device=device, **params)
        if one_call:
            out[f"theta {method} (merge_matrix)"] = swudi.merge_matrix(x, method, device=device, **params).cpu()
    return out


def compare(quantity: str, value: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error: over the largest eigenvalue for eigenvalues, else max |a - b| / max |b|."""
    if quantity == "eigenvalues":
        scale = float(reference.double().abs().max())
        return float((value.double() - reference.double()).abs().max()) / max(scale, 1e-300)
    return relative_error(value, reference)


def parity_case(tv: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Every comparison for one stack of task vectors; prints a PASS/FAIL line per comparison.

    On CUDA the library's results are compared with the library on the CPU (the parity) and with
    the float64 reference; on the CPU with the float64 reference.
    """
    n, m, d = (int(s) for s in tv.shape)
    label = f"{fmt_shape((m, d))} N={n}"
    mine = library_results(tv, device)
    ref = reference_merge(tv, device)
    refs: dict[str, dict[str, Any]] = {
        "float64": {"eigenvalues": ref.eigenvalues, "rank_swudi_a": ref.rank_swudi_a}
        | {f"theta {method}": theta for method, theta in ref.theta.items()}
    }
    if device.type == "cuda":
        refs = {"cpu": library_results(tv, torch.device("cpu"), one_call=False)} | refs
    quantities = ["eigenvalues", *(k for k in mine if k.startswith("theta"))]
    checks = []
    for ref_name, ref_values in refs.items():
        for quantity in quantities:
            err = compare(quantity, mine[quantity], ref_values[" ".join(quantity.split()[:2])])
            tol = tolerance(quantity, (device.type, ref_name), ref)
            what = quantity if quantity == "eigenvalues" or "merge_matrix" in quantity else f"{quantity} (decompose)"
            against = f"{device.type} vs {ref_name}"
            check = {"quantity": what, "compare": against, "rel_err": err, "tolerance": tol}
            check |= {"pass": err <= tol, "within_1e-3": err <= TOLERANCE}
            checks.append(check)
            note = "" if err <= TOLERANCE else "  (above 1e-3: float32 eigenvectors at the cut)"
            print(
                f"{'PASS' if check['pass'] else 'FAIL'}  {label:<14} {what:<30} {against:<16} "
                f"rel err {err:.2e}  tol {tol:.1e}{note}"
            )
    ranks = {device.type: mine["rank_swudi_a"]} | {k: v["rank_swudi_a"] for k, v in refs.items()}
    floors = "; ".join(
        f"{solver}: " + ", ".join(f"{method} {err:.1e}" for method, err in per.items())
        for solver, per in ref.float32_floor.items()
    )
    print(f"      {label:<14} route {mine['route']}; swudi_a rank {ranks}; float32-eigh floor {floors}")
    return {
        "shape": [m, d],
        "experts": n,
        "route": mine["route"],
        "rank_swudi_a": ranks,
        "float32_floor": ref.float32_floor,
        "checks": checks,
    }


def run_parity(profile: Profile, device: torch.device, seed: int) -> dict[str, Any]:
    """Section 1: parity cases over the profile's shapes and expert counts."""
    gen = make_generator(torch.device("cpu"), seed)
    cases = []
    for n in profile.parity_experts:
        for m, d in profile.parity_shapes:
            tv = task_vectors(n, m, d, generator=gen, device=torch.device("cpu"))
            cases.append(parity_case(tv, device))
    checks = [c for case in cases for c in case["checks"]]
    return {
        "tolerance": TOLERANCE,
        "floor_factor": FLOOR_FACTOR,
        "cases": cases,
        "checks": len(checks),
        "passed": sum(c["pass"] for c in checks),
        "within_1e-3": sum(c["within_1e-3"] for c in checks),
        "all_pass": all(c["pass"] for c in checks),
    }


# --------------------------------------------------------------------------------- timings
def timing_case(tv: torch.Tensor, device: torch.device, repeat: int) -> dict[str, Any]:
    """Seconds of decompose, the two filters and merge_matrix for ``tv`` on ``device`` (best of ``repeat``)."""

    routes: list[str] = []

    def once() -> dict[str, float]:
        with Timer(device) as t_dec:
            dec = swudi.decompose(tv, device=device)
        routes.append(dec.route)
        with Timer(device) as t_swudi:
            swudi.merge_decomposition(dec, "swudi", device=device, **SWUDI_PARAMS)
        with Timer(device) as t_a:
            swudi.merge_decomposition(dec, "swudi_a", device=device, **SWUDI_A_PARAMS)
        with Timer(device) as t_mm:
            swudi.merge_matrix(tv, "swudi_a", device=device, **SWUDI_A_PARAMS)
        return {
            "decompose_s": t_dec.seconds,
            "filter_swudi_s": t_swudi.seconds,
            "filter_swudi_a_s": t_a.seconds,
            "merge_matrix_s": t_mm.seconds,
        }

    once()  # warm-up: kernels, cuSOLVER/cuBLAS handles, allocator
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    runs = [once() for _ in range(repeat)]
    if device.type == "cuda":
        peak_mib = mib(torch.cuda.max_memory_allocated(device) - resident)
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    return best | {"route": routes[-1], "peak_extra_mib": peak_mib, "input_mib": mib(tv.numel() * tv.element_size())}


def run_timings(profile: Profile, device: torch.device, seed: int, repeat: int) -> dict[str, Any]:
    """Section 2: per-layer timings at the parity shapes and at one transformer block's shapes."""
    gen = make_generator(device, seed)
    plan: list[tuple[str, Shape, int]] = [
        ("(parity shape)", shape, n) for n in profile.parity_experts for shape in profile.parity_shapes
    ]
    seen: set[Shape] = set()
    for name, shape in profile.layer_weights:
        if shape not in seen:  # k/v, q/o and gate/up share shapes
            seen.add(shape)
            plan.append((name, shape, profile.layer_experts))
    header = (
        f"{'weight':<18}{'shape':>11}{'N':>3}{'route':>6}{'decompose s':>13}{'filter swudi s':>16}"
        f"{'filter swudi_a s':>18}{'merge_matrix s':>16}{'peak extra MiB':>16}{'input MiB':>11}"
    )
    print(header)
    cases = []
    for name, (m, d), n in plan:
        tv = task_vectors(n, m, d, generator=gen, device=device)
        row = {"weight": name, "shape": [m, d], "experts": n} | timing_case(tv, device, repeat)
        cases.append(row)
        peak = "n/a" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f}"
        print(
            f"{name:<18}{fmt_shape((m, d)):>11}{n:>3}{row['route']:>6}{row['decompose_s']:>13.3f}"
            f"{row['filter_swudi_s']:>16.3f}{row['filter_swudi_a_s']:>18.3f}{row['merge_matrix_s']:>16.3f}"
            f"{peak:>16}{row['input_mib']:>11.0f}"
        )
        del tv
    if device.type != "cuda":
        print("(peak extra MiB: torch.cuda.max_memory_allocated above the inputs; n/a on the CPU)")
    return {"repeat": repeat, "warmup": 1, "cases": cases}


# ------------------------------------------------------------------------------- 3B merge
def run_model_merge(
    profile: Profile, device: torch.device, seed: int, layers: int, experts: int, deadline: float
) -> dict[str, Any]:
    """Section 3: a generated Llama-shaped merge on ``device``, layer by layer, within ``deadline``."""
    gen = make_generator(device, seed)
    per_layer: list[dict[str, float]] = []
    checksum = 0.0
    cuda = device.type == "cuda"
    peak_extra_mib = 0.0  # the largest merge's torch.cuda.max_memory_allocated above its resident task vectors
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for layer in range(layers):
        gen_s = merge_s = host_s = 0.0
        for name, (m, d) in profile.layer_weights:
            with Timer(device) as t_gen:
                tv = task_vectors(experts, m, d, generator=gen, device=device)
            if cuda:
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with Timer(device) as t_merge:
                theta = swudi.merge_matrix(
                    tv, "swudi", name=f"model.layers.{layer}.{name}.weight", device=device, **LLAMA_PARAMS
                )
            if cuda:
                peak_extra_mib = max(peak_extra_mib, mib(torch.cuda.max_memory_allocated(device) - resident))
            with Timer(device) as t_host:
                host = theta.to("cpu")
            checksum += float(host.double().square().sum())
            gen_s, merge_s, host_s = gen_s + t_gen.seconds, merge_s + t_merge.seconds, host_s + t_host.seconds
            del tv, theta, host
        per_layer.append({"generate_s": gen_s, "merge_s": merge_s, "to_host_s": host_s})
        done = layer + 1
        print(
            f"layer {layer:>2}: merge {merge_s:7.3f} s, to host {host_s:6.3f} s "
            f"(generation {gen_s:6.3f} s, not counted)"
        )
        mean_layer = sum(r["merge_s"] + r["to_host_s"] + r["generate_s"] for r in per_layer) / done
        if done < layers and time.perf_counter() + mean_layer > deadline:
            print(f"time budget reached after {done} of {layers} layers: the rest is projected from these")
            break

    embedding = task_vectors(experts, profile.vocab, profile.hidden, generator=gen, device=device)
    with Timer(device) as t_emb:  # excluded from the matrix method by default: the mean
        swudi.merge_elementwise(embedding, "swudi", name="model.embed_tokens.weight").cpu()
    emb_s = t_emb.seconds
    del embedding

    measured = len(per_layer)
    layer_s = [r["merge_s"] + r["to_host_s"] for r in per_layer]
    per_layer_mean = sum(layer_s) / measured
    total = per_layer_mean * layers + emb_s
    llama_3b = per_layer_mean * FULL.layers + emb_s if profile is FULL else None
    return {
        "method": "swudi",
        "params": LLAMA_PARAMS,
        "layers": layers,
        "layers_measured": measured,
        "weights_per_layer": len(profile.layer_weights),
        "weights": [[name, list(shape)] for name, shape in profile.layer_weights],
        "experts": experts,
        "vocab": profile.vocab,
        "hidden": profile.hidden,
        "per_layer": per_layer,
        "seconds_per_layer_mean": per_layer_mean,
        "seconds_per_layer_min": min(layer_s),
        "seconds_per_layer_max": max(layer_s),
        "merge_seconds_measured": sum(r["merge_s"] for r in per_layer),
        "to_host_seconds_measured": sum(r["to_host_s"] for r in per_layer),
        "generate_seconds_measured": sum(r["generate_s"] for r in per_layer),
        "embedding_mean_seconds": emb_s,
        "merge_peak_extra_mib": peak_extra_mib if cuda else None,
        "total_seconds": total,
        "total_is_projected": measured < layers,
        "llama_3b_seconds": llama_3b,
        "paper_seconds": PAPER_LLAMA_3B_SECONDS,
        "paper_over_ours": PAPER_LLAMA_3B_SECONDS / llama_3b if llama_3b else None,
        "checksum": checksum,
    }


def print_model_merge(result: dict[str, Any], profile: Profile) -> None:
    """The summary lines of section 3."""
    how = "projected from" if result["total_is_projected"] else "measured over"
    print(
        f"{result['layers']} layers x {result['weights_per_layer']} weights, N={result['experts']}, "
        f"swudi t={LLAMA_PARAMS['t']:g} rank_ratio={LLAMA_PARAMS['rank_ratio']:g}: "
        f"total {result['total_seconds']:.1f} s ({how} {result['layers_measured']} layers; "
        f"embedding mean {result['embedding_mean_seconds']:.2f} s included)"
    )
    print(
        f"seconds per layer: mean {result['seconds_per_layer_mean']:.3f}, min {result['seconds_per_layer_min']:.3f}, "
        f"max {result['seconds_per_layer_max']:.3f} (merge + copy to host; generation not counted)"
    )
    if result["merge_peak_extra_mib"] is not None:
        print(
            f"peak GPU memory of one weight's merge above its task vectors: {result['merge_peak_extra_mib']:.0f} MiB "
            "(torch.cuda.max_memory_allocated; the largest over all weights)"
        )
    if result["llama_3b_seconds"] is not None:
        print(
            f"Llama-3.2-3B ({FULL.layers} layers) at this rate: {result['llama_3b_seconds']:.1f} s; "
            f"paper (5 experts, merge only, GPU): {PAPER_LLAMA_3B_SECONDS} s; "
            f"paper / this run = {result['paper_over_ours']:.2f}"
        )
    else:
        print(f"(quick profile: not comparable with the paper's {PAPER_LLAMA_3B_SECONDS} s for Llama-3.2-3B)")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="compute device (default cuda)")
    p.add_argument("--quick", action="store_true", help="small shapes (256-wide, 2 layers): a CPU smoke test")
    p.add_argument("--layers", type=int, default=None, help="layers of the generated model (default 28; quick 2)")
    p.add_argument("--merge-experts", type=int, default=5, help="experts of the generated model merge (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per timing case after the warm-up (best kept)")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; later layers are projected past it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if args.merge_experts < 1 or args.repeat < 1 or (args.threads is not None and args.threads < 1):
        p.error("--merge-experts, --repeat and --threads must be >= 1")
    return args


def section(title: str) -> None:
    """A section header."""
    print(f"\n== {title} ==", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three sections; exit status 0 if every parity check passed, 1 if one failed, 2 without CUDA."""
    args = parse_args(argv)
    start = time.perf_counter()
    profile = QUICK if args.quick else FULL
    layers = args.layers if args.layers is not None else profile.layers
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda, but torch {torch.__version__} (CUDA build: {torch.version.cuda}) at "
            f"{sys.executable} sees no CUDA device; use an interpreter whose torch has CUDA, or --device cpu",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "settings": {
            "profile": profile.name,
            "device": args.device,
            "layers": layers,
            "merge_experts": args.merge_experts,
            "repeat": args.repeat,
            "time_budget_s": args.time_budget,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "tolerance": TOLERANCE,
            "task_vectors": f"rank {TASK_RANK} + {NOISE:g} dense noise, entries ~{SCALE:g}",
        }
    }

    section("environment")
    env = environment(device)
    results["environment"] = env
    for key, value in env.items():
        print(f"{key:>18}: {value}")

    references = "the library on the cpu, and float64" if args.device == "cuda" else "float64"
    section(f"1. parity on {args.device} (compared with {references})")
    results["parity"] = run_parity(profile, device, args.seed)
    parity = results["parity"]
    print(
        f"parity: {parity['passed']} of {parity['checks']} checks passed; {parity['within_1e-3']} within "
        f"{TOLERANCE:.0e} (the others: within {FLOOR_FACTOR:g}x the float32-eigh floor, or FAIL)"
    )

    section(f"2. per-layer timings on {args.device} (warm-up once, best of {args.repeat})")
    results["timings"] = run_timings(profile, device, args.seed + 1, args.repeat)

    section(f"3. generated {'Llama-3.2-3B' if profile is FULL else 'small Llama'}-shaped merge on {args.device}")
    deadline = start + args.time_budget
    results["merge_3b"] = run_model_merge(profile, device, args.seed + 2, layers, args.merge_experts, deadline)
    print_model_merge(results["merge_3b"], profile)

    results["total_seconds"] = time.perf_counter() - start
    section("summary")
    print(f"parity {'PASS' if results['parity']['all_pass'] else 'FAIL'}; total {results['total_seconds']:.1f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0 if results["parity"]["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
