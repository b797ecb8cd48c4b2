"""Iso-C, Iso-CTS, TSV-M, CART, ACE and the SVC post-filter against float64 references written here
from the papers' formulas and the authors' published algorithms (dense full SVDs, explicit inverses,
the zero-padded stacks of the reference code), on low-rank-ish task vectors of several shapes."""

from __future__ import annotations

import math

import pytest
import torch

from swudi import ConfigError
from swudi.core.task_svd import TaskSVDs, task_svds, task_svds_from_factors
from swudi.core.task_vectors import LowRank
from swudi.methods import apply_post_filter, merge_matrix, merge_task_svds

F64 = torch.float64
SHAPES = [(24, 16, 3), (16, 24, 4), (20, 20, 3)]  # (m, d, N): m > d, m < d, square


def task_vectors(m: int, d: int, n: int, seed: int, *, scales: list[float] | None = None) -> torch.Tensor:
    """tau_i = shared low-rank part + own low-rank part + small full-rank noise (full numerical rank)."""
    g = torch.Generator().manual_seed(seed)
    r = max(2, min(m, d) // 3)
    shared = torch.randn(m, r, generator=g) @ torch.randn(r, d, generator=g) / r
    out = []
    for i in range(n):
        own = torch.randn(m, r, generator=g) @ torch.randn(r, d, generator=g) / r
        tau = 0.6 * shared + own + 0.05 * torch.randn(m, d, generator=g)
        out.append(tau * (scales[i] if scales else 1.0))
    return torch.stack(out)


def polar64(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-4) -> None:
    err = float((a.double() - b.double()).norm() / b.double().norm())
    assert err < tol, f"relative error {err:.2e}"


# --------------------------------------------------------------------- float64 references
def ref_iso_c(tv: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tv.double().sum(0), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def ref_iso_cts(tv: torch.Tensor, fraction: float = 0.8) -> torch.Tensor:
    x = tv.double()
    n, m, d = x.shape
    k = min(m, d)
    k_c = int(k * fraction)
    k_c = k - round((k - k_c) / n) * n
    per = (k - k_c) // n
    u, s, vh = torch.linalg.svd(x.sum(0), full_matrices=False)
    cu, cs, cv = torch.zeros(m, k, dtype=F64), torch.zeros(k, dtype=F64), torch.zeros(k, d, dtype=F64)
    for i in range(n):
        w = x[i] - u[:, :k_c] @ u[:, :k_c].T @ x[i]
        ut, st, vt = torch.linalg.svd(w, full_matrices=False)
        cu[:, i * per : (i + 1) * per] = ut[:, :per]
        cs[i * per : (i + 1) * per] = st[:per]
        cv[i * per : (i + 1) * per] = vt[:per]
    cu[:, n * per :], cs[n * per :], cv[n * per :] = u[:, :k_c], s[:k_c], vh[:k_c]
    return polar64(cu) @ torch.diag(torch.full_like(cs, float(cs.mean()))) @ polar64(cv)


def ref_tsv_m(tv: torch.Tensor) -> torch.Tensor:
    x = tv.double()
    n, m, d = x.shape
    k = min(m, d)
    r = k // n
    su, ss, sv = torch.zeros(m, k, dtype=F64), torch.zeros(k, dtype=F64), torch.zeros(k, d, dtype=F64)
    for i in range(n):
        u, s, vh = torch.linalg.svd(x[i], full_matrices=False)
        su[:, i * r : (i + 1) * r], ss[i * r : (i + 1) * r], sv[i * r : (i + 1) * r] = u[:, :r], s[:r], vh[:r]
    return polar64(su) @ torch.diag(ss) @ polar64(sv)  # zero columns meet zero singular values


def ref_cart(tv: torch.Tensor, prior: float = 2.0, rank_ratio: float = 0.12) -> torch.Tensor:
    x = tv.double()
    n, m, d = x.shape
    k = max(1, int(rank_ratio * min(m, d)))
    mean = x.mean(0)
    low = torch.zeros(m, d, dtype=F64)
    for i in range(n):
        u, s, vh = torch.linalg.svd(x[i] - mean, full_matrices=False)
        low += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return mean + prior * low / n


def ace_branch(tv: torch.Tensor) -> bool:
    traces = torch.tensor([float(torch.trace(t.T @ t)) for t in tv.double()], dtype=F64)
    logs = torch.log(traces + 1e-12)
    return bool(torch.var(logs) / (logs.mean() ** 2 + 1e-12) > 0.3)


def ref_ace(tv: torch.Tensor, eps: float = 1e-2, k_frac: float = 0.3) -> torch.Tensor:
    x = tv.double()
    n, m, d = x.shape
    traces = torch.tensor([float(torch.trace(t.T @ t)) for t in x], dtype=F64)
    flag = ace_branch(tv)
    sigmas, wsum, ssum = [], torch.zeros(m, d, dtype=F64), torch.zeros(d, d, dtype=F64)
    for t in x:
        w = t - t.mean(dim=0, keepdim=True)
        raw = w.T @ w
        tr = torch.trace(raw) + 1e-12
        sig, e = (raw / tr, eps / tr) if flag else (raw, eps)
        sigmas.append(sig)
        sig = sig + e * torch.eye(d, dtype=F64)
        wsum += w @ sig
        ssum += sig
    c_agg = torch.mean(sum(sigmas), dim=0, keepdim=True)
    if flag:
        c_agg = c_agg / (float(traces.mean()) + 1e-12)
    theta = wsum @ torch.linalg.inv(ssum + c_agg)
    if flag:
        smean = ssum / n
        fused = theta + sum(t @ (s - smean) for t, s in zip(x, sigmas, strict=True))
        u, s, vh = torch.linalg.svd(fused, full_matrices=False)
        k = int(min(m, d) * k_frac)
        theta = theta + s[:k].mean() * (u[:, :k] @ vh[:k])
    return theta


def ref_svc(theta: torch.Tensor, tv: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    wm, x = theta.double(), tv.double()
    u, s, vh = torch.linalg.svd(wm, full_matrices=False)
    am = u.T @ wm  # [k, d]
    ai = torch.einsum("mr,tmd->rtd", u, x)  # [k, N, d]
    ratio = torch.einsum("rd,rtd->rt", am, ai) / (ai * ai).sum(-1).clamp_min(1e-12)
    eta = torch.where((ratio > 0).all(1), torch.clamp(ratio.mean(1), min=alpha), torch.ones_like(s))
    return u @ torch.diag(s / eta) @ vh


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("m", "d", "n"), SHAPES)
@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("iso_c", {}, ref_iso_c),
        ("iso_cts", {}, ref_iso_cts),
        ("iso_cts", {"common_space_fraction": 0.5}, lambda tv: ref_iso_cts(tv, 0.5)),
        ("tsv_m", {}, ref_tsv_m),
        ("cart", {}, ref_cart),
        ("cart", {"prior": 1.0, "rank_ratio": 0.3}, lambda tv: ref_cart(tv, 1.0, 0.3)),
        ("ace", {}, ref_ace),
    ],
)
def test_method_matches_float64_reference(m: int, d: int, n: int, method: str, params: dict, reference) -> None:
    tv = task_vectors(m, d, n, seed=m * 100 + d)
    theta = merge_matrix(tv, method, device="cpu", **params)
    assert theta.dtype == torch.float32 and theta.shape == (m, d)
    close(theta, reference(tv))


@pytest.mark.parametrize(("m", "d", "n"), SHAPES)
def test_ace_heterogeneous_branch_matches_reference(m: int, d: int, n: int) -> None:
    """Task norms spread over two decades: ACE normalises the covariances and adds the refinement."""
    tv = task_vectors(m, d, n, seed=7, scales=[0.1 * 10.0**i for i in range(n)])
    hom = task_vectors(m, d, n, seed=7, scales=[30.0] * n)
    assert ace_branch(tv) and not ace_branch(hom)  # both branches are exercised
    close(merge_matrix(tv, "ace", device="cpu"), ref_ace(tv))
    close(merge_matrix(tv, "ace", device="cpu", k_frac=0.5, eps=0.1), ref_ace(tv, 0.1, 0.5))
    close(merge_matrix(hom, "ace", device="cpu"), ref_ace(hom))


@pytest.mark.parametrize(("m", "d", "n"), SHAPES)
@pytest.mark.parametrize("base", ["swudi_a", "tsv_m", "task_arithmetic"])
def test_svc_post_filter_matches_reference(m: int, d: int, n: int, base: str) -> None:
    tv = task_vectors(m, d, n, seed=3)
    theta = merge_matrix(tv, base, device="cpu")
    calibrated = apply_post_filter(theta, task_svds(tv, device="cpu"), "svc", device="cpu")
    close(calibrated, ref_svc(theta, tv))
    low = apply_post_filter(theta, task_svds(tv, device="cpu"), "svc", device="cpu", alpha=0.2)
    close(low, ref_svc(theta, tv, 0.2))


def test_task_svds_reconstruct_and_round_trip() -> None:
    tv = task_vectors(18, 11, 3, seed=5)
    t = task_svds(tv, device="cpu")
    for i in range(3):
        close(t.task(i), tv[i], 1e-5)
    close(t.sum(), tv.sum(0), 1e-5)
    tensors, meta = t.to_tensors()
    back = TaskSVDs.from_tensors(tensors, meta)
    assert back.ranks == t.ranks and back.shape == (18, 11)
    assert sum(x.numel() * 4 for x in tensors.values()) == t.nbytes
    meta["shape"] = "18,12"
    with pytest.raises(Exception, match=r"task 0 has u"):
        TaskSVDs.from_tensors(tensors, meta)


def lora(m: int, d: int, ranks: list[int], seed: int) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(m, r, generator=g), torch.randn(r, d, generator=g) / math.sqrt(d)) for r in ranks]


@pytest.mark.parametrize(("m", "d"), [(40, 24), (24, 40)])
def test_lora_factor_space_equals_dense(m: int, d: int) -> None:
    """Task SVDs from LoRA factors (no m x d SVD) hold the same task vectors; the methods agree."""
    factors = lora(m, d, [2, 3, 0, 4], seed=11)
    dense = torch.stack([f.dense() for f in factors])
    ft = task_svds_from_factors(factors, device="cpu")
    assert ft.ranks == [2, 3, 0, 4] and ft.route == "factors"
    for i in range(4):
        assert float((ft.task(i) - dense[i]).norm()) <= 1e-5 * (1 + float(dense[i].norm()))
    dt = task_svds(dense, device="cpu")
    assert dt.ranks == [2, 3, 0, 4]  # dense SVDs keep the numerical rank only
    for method in ("iso_c", "tsv_m", "cart", "iso_cts"):
        close(merge_task_svds(ft, method, device="cpu"), merge_task_svds(dt, method, device="cpu"), 1e-4)
    # Iso-C of a rank-R sum: mean over min(m, d) singular values on the R non-zero directions
    u, s, vh = torch.linalg.svd(dense.double().sum(0), full_matrices=False)
    rank = 9
    expected = float(s.sum()) / min(m, d) * (u[:, :rank] @ vh[:rank])
    close(merge_task_svds(ft, "iso_c", device="cpu"), expected)


def test_bad_parameters_are_refused() -> None:
    tv = task_vectors(8, 6, 2, seed=1)
    with pytest.raises(ConfigError, match="common_space_fraction"):
        merge_matrix(tv, "iso_cts", common_space_fraction=1.5)
    with pytest.raises(ConfigError, match="unknown post-filter 'nope'"):
        apply_post_filter(tv[0], task_svds(tv), "nope")
    with pytest.raises(ConfigError, match="not a subspace method"):
        merge_task_svds(task_svds(tv), "swudi_a")
