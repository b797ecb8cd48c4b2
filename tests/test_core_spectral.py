"""The spectral estimator against independent float64 computations of the WUDI objective."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import swudi
from swudi import apply_filter, decompose, exponential_filter, landweber_filter, merge_matrix


def make_tv(n: int, m: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # task-specific scales so that the weights w_i matter
    scales = torch.linspace(0.5, 2.0, n).view(n, 1, 1)
    return (torch.randn(n, m, d, generator=g) * scales * scale).to(torch.float32)


def reference_c_d(tv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C and D in float64, written out term by term."""
    t = tv.double()
    c = torch.zeros(t.shape[2], t.shape[2], dtype=torch.float64)
    dm = torch.zeros(t.shape[1], t.shape[2], dtype=torch.float64)
    for ti in t:
        w = 1.0 / (ti * ti).sum()
        c += w * ti.T @ ti
        dm += w * ti @ ti.T @ ti
    return c, dm


def reference_loss(theta: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """L(theta) = sum_i ||(theta - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 in float64."""
    t = tv.double()
    return sum(((theta - ti) @ ti.T).square().sum() / ti.square().sum() for ti in t)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(4, 6, 5), (2, 3, 10)], ids=["full-rank-eigh", "rank-deficient-svd"])
def test_gradient_descent_equals_landweber_filter(shape):
    n_tasks, m, d = shape
    tv = make_tv(n_tasks, m, d, seed=1)
    c64, _ = reference_c_d(tv)
    eta = 0.4 / float(torch.linalg.eigvalsh(c64).max())
    steps = 25
    theta = tv.double().sum(0).clone().requires_grad_(True)
    for _ in range(steps):
        loss = reference_loss(theta, tv)
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= eta * grad
    dec = decompose(tv, device="cpu")
    got = apply_filter(dec, landweber_filter(dec.eigenvalues, eta, steps), "sum", device="cpu")
    assert rel_err(got, theta.detach()) < 1e-4


def test_small_step_gradient_descent_approaches_exponential_filter():
    tv = make_tv(4, 6, 5, seed=2)
    c64, d64 = reference_c_d(tv)
    t, steps = 3.0, 4000
    eta = t / (2 * steps)
    theta = tv.double().sum(0)
    for _ in range(steps):
        theta = theta - eta * 2.0 * (theta @ c64 - d64)  # explicit gradient of L
    dec = decompose(tv, device="cpu")
    got = apply_filter(dec, exponential_filter(dec.eigenvalues, t), "sum", device="cpu")
    start = tv.double().sum(0)
    # the distance travelled is matched to well under 1 %
    assert float((got.double() - theta).norm() / (theta - start).norm()) < 5e-3
    assert torch.allclose(got, merge_matrix(tv, "swudi_soft", t=t, device="cpu"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["sum", "mean", "zero"])
def test_full_rank_unit_filter_is_least_squares(init):
    tv = make_tv(3, 7, 6, seed=3)
    c64, d64 = reference_c_d(tv)
    # theta C = D  <=>  C theta^T = D^T, solved by least squares in float64
    expected = torch.linalg.lstsq(c64, d64.T).solution.T
    dec = decompose(tv, device="cpu")
    got = apply_filter(dec, torch.ones(6), init, device="cpu")
    assert rel_err(got, expected) < 1e-4
    # and it is a stationary point of the objective written independently
    theta = got.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_loss(theta, tv), theta)
    assert float(grad.norm()) < 1e-3 * float(d64.norm())


def test_pinv_equals_d_times_pseudo_inverse():
    tv = make_tv(3, 7, 6, seed=4)
    c64, d64 = reference_c_d(tv)
    expected = d64 @ torch.linalg.pinv(c64, hermitian=True)
    assert rel_err(merge_matrix(tv, "pinv", device="cpu"), expected) < 1e-4


def test_null_space_directions_keep_theta0():
    tv = make_tv(2, 3, 10, seed=5)  # N*m = 6 < d = 10: C has a 4-dim null space
    c64, d64 = reference_c_d(tv)
    evals, evecs = torch.linalg.eigh(c64)
    null = evecs[:, evals < 1e-10 * float(evals.max())]
    assert null.shape[1] == 4
    theta0 = tv.double().sum(0)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("swudi_soft", {"t": 300.0}), ("swudi", {}), ("swudi_a", {}), ("pinv", {"init": "sum"})]
    for method, params in cases:
        theta = merge_matrix(tv, method, device="cpu", **params).double()
        assert torch.allclose(theta @ null, theta0 @ null, atol=1e-5), method
    # pinv with init="zero" (its default) is the minimum-norm D C^+: zero on the null space
    pinv = merge_matrix(tv, "pinv", device="cpu").double()
    assert float((pinv @ null).norm()) < 1e-5
    assert rel_err(pinv, d64 @ torch.linalg.pinv(c64, hermitian=True)) < 1e-4


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_eigenvalues_sum_to_number_of_tasks(scale):
    tv = make_tv(5, 8, 6, seed=6, scale=scale)
    c64, _ = reference_c_d(tv)
    assert float(torch.trace(c64)) == pytest.approx(5.0, rel=1e-12)
    dec = decompose(tv, device="cpu")
    assert float(dec.eigenvalues.double().sum()) == pytest.approx(5.0, rel=1e-5)
    assert torch.all(dec.eigenvalues[:-1] >= dec.eigenvalues[1:])
    assert float(dec.eigenvalues.min()) >= 1e-8


@pytest.mark.parametrize("shape", [(2, 3, 10), (4, 6, 5)])
def test_svd_route_equals_eigh_route(shape):
    n, m, d = shape
    tv = make_tv(n, m, d, seed=7)
    a = decompose(tv, route="eigh", device="cpu")
    b = decompose(tv, route="svd", device="cpu")
    assert (a.route, b.route) == ("eigh", "svd")
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-4, atol=1e-6)
    assert a.objective_const == pytest.approx(b.objective_const, rel=1e-5)
    # the spanned pieces agree (sign-independent): D Q Q^T and S Q Q^T
    assert rel_err(a.dq @ a.eigenvectors.T, b.dq @ b.eigenvectors.T) < 1e-4
    for method in ["swudi", "swudi_soft", "swudi_a", "pinv"]:
        ta = swudi.merge_decomposition(a, method, device="cpu")
        tb = swudi.merge_decomposition(b, method, device="cpu")
        assert rel_err(ta, tb) < 1e-4, method


def reference_swudi(tv: torch.Tensor, t: float, k: int, init_c: float = 1.0) -> torch.Tensor:
    """SWUDI written directly from method.md in float64 (full D, full eigh)."""
    c64, d64 = reference_c_d(tv)
    lam, q = torch.linalg.eigh(c64)
    lam, q = lam.flip(0).clamp(min=1e-8), q.flip(1)
    f = 1.0 - torch.exp(-t * lam)
    f[k:] = 0.0
    theta0 = init_c * tv.double().sum(0)
    return theta0 - theta0 @ q @ torch.diag(f) @ q.T + d64 @ q @ torch.diag(f / lam) @ q.T


def test_float32_swudi_matches_float64_reference():
    tv = make_tv(4, 12, 10, seed=8, scale=0.01)
    # K = ceil(0.65 * 10) = 7
    expected = reference_swudi(tv, t=5.0, k=7)
    got = merge_matrix(tv, "swudi", t=5.0, rank_ratio=0.65, device="cpu")
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-4
    expected_mean = reference_swudi(tv, t=5.0, k=10, init_c=0.25)
    got_mean = merge_matrix(tv, "swudi", t=5.0, rank_ratio=1.0, init="mean", device="cpu")
    assert rel_err(got_mean, expected_mean) < 1e-4


def test_float64_input_returns_float64_within_tolerance():
    tv = make_tv(4, 12, 10, seed=9).double()
    got = merge_matrix(tv, "swudi", t=5.0, device="cpu")
    assert got.dtype == torch.float64
    assert rel_err(got, reference_swudi(tv, t=5.0, k=7)) < 1e-4


def test_swudi_a_hard_truncation_matches_reference():
    tv = make_tv(4, 12, 10, seed=10)
    c64, _ = reference_c_d(tv)
    lam = torch.linalg.eigvalsh(c64).flip(0).clamp(min=1e-8)
    k = int(torch.ceil(lam.sqrt().sum() ** 2 / lam.sum()))  # participation_sqrt by hand
    expected = reference_swudi(tv, t=1e9, k=k)  # f = 1 on the top k
    got = merge_matrix(tv, "swudi_a", device="cpu")
    assert rel_err(got, expected) < 1e-4
    # with an exponential filter instead of the hard one
    expected_t = reference_swudi(tv, t=3.0, k=k)
    assert rel_err(merge_matrix(tv, "swudi_a", t=3.0, device="cpu"), expected_t) < 1e-4


def test_swudi_with_large_t_and_full_rank_approaches_pinv():
    tv = make_tv(4, 8, 6, seed=11)
    pinv = merge_matrix(tv, "pinv", device="cpu")
    far = merge_matrix(tv, "swudi", t=1e8, rank_ratio=1.0, device="cpu")
    near = merge_matrix(tv, "swudi", t=1.0, rank_ratio=1.0, device="cpu")
    assert rel_err(far, pinv) < 1e-4
    assert rel_err(near, pinv) > 10 * rel_err(far, pinv)


def test_zero_filter_keeps_theta0():
    tv = make_tv(3, 5, 4, seed=12)
    assert torch.allclose(merge_matrix(tv, "swudi_soft", t=0.0, device="cpu"), tv.sum(0), atol=1e-6)
    assert torch.allclose(merge_matrix(tv, "swudi_soft", t=0.0, init="mean", device="cpu"), tv.mean(0), atol=1e-6)
