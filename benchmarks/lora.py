"""LoRA experts: factor-space decomposition + merge vs the dense path, per weight.

N adapters of rank r on one weight (tau_i = B_i A_i): the factor path
(:func:`swudi.core.lowrank.decompose_factors`, then the SWUDI-A filter) against the dense path the
pipeline takes otherwise (form the N dense task vectors, :func:`swudi.decompose`, same filter).
Both produce the merged update theta ``[m, d]``; the script checks they agree.

Each (shape, path) runs in its own subprocess; its peak memory is the process's peak RSS during
the merge (reset first through ``/proc/self/clear_refs``, Linux) minus its RSS just before (the
inputs, the factors, are generated before).
Wall time and process CPU time are both printed (the machine may be shared: CPU time is the
steadier measure of work).

Usage::

    python benchmarks/lora.py                     # 4096x4096 + a Llama-3-8B block (attention dense too)
    python benchmarks/lora.py --dense-mlp         # also the dense path on the 14336-wide MLP weights (slow)
    python benchmarks/lora.py --shapes 4096x4096 --experts 5 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

#: One Llama-3-8B block (hidden 4096, intermediate 14336, 8 KV heads of 128).
LLAMA_8B_BLOCK = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def _reset_peak() -> float:
    """Reset the process's peak RSS (Linux: ``5`` to ``/proc/self/clear_refs``); return the RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") / 1024.0


def _peak_mb() -> float:
    """Peak RSS since the last :func:`_reset_peak`, MB."""
    return _status_kib("VmHWM") / 1024.0


def worker(m: int, d: int, experts: int, rank: int, path: str, threads: int, out: str) -> dict:
    """Run one path on seeded factors; write theta to ``out`` (safetensors); return the figures."""
    import torch
    from safetensors.torch import save_file

    from swudi import decompose, merge_decomposition
    from swudi.core.lowrank import decompose_factors
    from swudi.core.task_vectors import LowRank
    from swudi.methods import spectral_filter

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    factors = [
        LowRank(torch.randn(m, rank, generator=g) * 0.01 * (i + 1), torch.randn(rank, d, generator=g) / d**0.5)
        for i in range(experts)
    ]
    # load the linear-algebra kernels first, so that neither path's peak counts loading them
    small = [LowRank(torch.randn(8, 2), torch.randn(2, 8)) for _ in range(2)]
    merge_decomposition(decompose_factors(small, device="cpu"), "swudi_a")
    merge_decomposition(decompose(torch.stack([f.dense() for f in small]), device="cpu"), "swudi_a")
    rss_before = _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    if path == "factor":
        dec = decompose_factors(factors, device="cpu")
    else:
        task_vectors = torch.stack([f.dense() for f in factors])  # what the dense path reads / forms
        dec = decompose(task_vectors, device="cpu")
        del task_vectors
    decompose_wall, decompose_cpu = time.perf_counter() - wall, time.process_time() - cpu
    decompose_peak = _peak_mb() - rss_before
    # SWUDI-A as configured by default, and with K capped at sum r_i (max_rank_ratio = R / d): the
    # dense path's float32 eigh leaves noise eigenvalues (~1e-7) beyond R that the default rank rule
    # may count, and 1 / lambda amplifies; capped, both paths compute the same exact closed form
    theta = merge_decomposition(dec, "swudi_a", device="cpu")
    result = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "decompose_wall_s": decompose_wall,
        "decompose_cpu_s": decompose_cpu,
        "decompose_peak_mb": decompose_peak,
        "peak_mb": _peak_mb() - rss_before,
        "artefact_mb": sum(t.numel() * 4 for t in dec.to_tensors()[0].values()) / 1e6,
        "rank": int((spectral_filter(dec.eigenvalues, dec.shape, "swudi_a") > 0).sum()),
    }
    capped = merge_decomposition(dec, "swudi_a", max_rank_ratio=experts * rank / d, device="cpu")
    save_file({"theta": theta.contiguous(), "capped": capped.contiguous()}, out)
    return result


def _run(m: int, d: int, args: argparse.Namespace, path: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([m, d, args.experts, args.rank, path, args.threads, out])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{path} {m}x{d} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _difference(a: str, b: str, key: str) -> float:
    """max |theta_factor - theta_dense| / max |theta_dense| of one stored result."""
    from safetensors.torch import load_file

    x, y = load_file(a)[key], load_file(b)[key]
    return float((x - y).abs().max() / y.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="*", default=["4096x4096"], help="single weights, out x in")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama-3-8B block")
    parser.add_argument("--dense-mlp", action="store_true", help="run the dense path on the 14336-wide MLP weights")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    cases = [(s, *map(int, s.split("x")), True) for s in args.shapes]
    if not args.no_llama:
        cases += [(f"llama-8b {n}", m, d, args.dense_mlp or max(m, d) <= 4096) for n, (m, d) in LLAMA_8B_BLOCK.items()]
    print(
        f"N = {args.experts} adapters of rank {args.rank} (sum r = {args.experts * args.rank}); SWUDI-A; "
        f"{args.threads} torch threads; CPU; {os.cpu_count()} cores visible"
    )
    print(
        "| weight | path | decompose CPU s | decompose peak MB | + merge (theta): CPU s | peak MB | wall s "
        "| artefact MB | SWUDI-A rank | max rel. diff, K <= sum r | max rel. diff, default K |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    measured: dict[tuple[int, int], dict] = {}  # dense results by shape (q_proj and o_proj share one)
    with tempfile.TemporaryDirectory() as tmp:
        for label, m, d, dense in cases:
            fac_out, den_out = os.path.join(tmp, "f.safetensors"), os.path.join(tmp, f"d{m}x{d}.safetensors")
            fac = _run(m, d, args, "factor", fac_out)
            rows = [(label, "factor", fac, "", "")]
            if dense:
                if (m, d) not in measured:
                    measured[(m, d)] = _run(m, d, args, "dense", den_out)
                den = measured[(m, d)]
                capped, default = _difference(fac_out, den_out, "capped"), _difference(fac_out, den_out, "theta")
                rows.append((label, "dense", den, f"{capped:.1e}", f"{default:.1e}"))
                rows.append(
                    (
                        label,
                        "dense / factor",
                        {k: den[k] / max(fac[k], 1e-9) for k in den if k != "rank"},
                        "",
                        "",
                    )
                )
            for name, path, res, c, dflt in rows:
                ratio = path == "dense / factor"
                fmt = (lambda v: f"{v:.0f}x") if ratio else (lambda v: f"{v:.2f}")
                print(
                    f"| {name} ({m}x{d}) | {path} | {fmt(res['decompose_cpu_s'])} | {fmt(res['decompose_peak_mb'])} | "
                    f"{fmt(res['cpu_s'])} | {fmt(res['peak_mb'])} | {fmt(res['wall_s'])} | {fmt(res['artefact_mb'])} | "
                    f"{'' if ratio else res['rank']} | {c} | {dflt} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
