"""Factor space: the decomposition of LoRA task vectors tau_i = B_i A_i equals the dense one."""

from __future__ import annotations

import pytest
import torch

from swudi import InputError, decompose, merge_decomposition
from swudi.core.decomposition import Decomposition
from swudi.core.diagnostics import interference_from_decomposition, interference_from_factors, interference_vs_sum
from swudi.core.lowrank import decompose_factors
from swudi.core.spectral import apply_filter, filtered_projection
from swudi.core.task_vectors import LowRank
from swudi.methods import spectral_filter


def make_factors(m: int, d: int, ranks: list[int], seed: int) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    return [
        LowRank(torch.randn(m, r, generator=g) * (0.5 + i), torch.randn(r, d, generator=g) * 0.1)
        for i, r in enumerate(ranks)
    ]


def dense(factors: list[LowRank]) -> torch.Tensor:
    return torch.stack([f.b.double() @ f.a.double() for f in factors])


def reference_theta(tv: torch.Tensor, k: int) -> torch.Tensor:
    """SWUDI-A's closed form in float64 from dense task vectors, term by term:
    theta = S (I - Q_k Q_k^T) + D Q_k diag(1/lambda_k) Q_k^T on the top k eigenpairs of C."""
    c = sum(t.T @ t / t.square().sum() for t in tv if t.square().sum() > 0)
    dm = sum(t @ t.T @ t / t.square().sum() for t in tv if t.square().sum() > 0)
    lam, vec = torch.linalg.eigh(c)
    lam, q = lam.flip(0)[:k], vec.flip(1)[:, :k]
    s = tv.sum(0)
    return s - s @ q @ q.T + (dm @ q / lam) @ q.T


@pytest.mark.parametrize(("m", "d", "ranks"), [(40, 32, [3, 5, 2]), (24, 50, [4, 4, 4, 4]), (30, 30, [1, 0, 6])])
def test_factored_pieces_match_the_dense_decomposition(m, d, ranks) -> None:
    factors = make_factors(m, d, ranks, seed=1)
    tv = dense(factors)
    got = decompose_factors(factors, name="w", device="cpu")
    want = decompose(tv.float(), name="w", device="cpu", route="svd")
    big = sum(ranks)
    assert got.factored and got.rank == big and got.full_rank == big and got.shape == (m, d)
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, atol=1e-6, rtol=1e-5)
    assert got.eigenvalues[:big].sum().item() == pytest.approx(sum(1 for r in ranks if r > 0), rel=1e-6)
    q = got.eigenvectors.double()
    torch.testing.assert_close(q.T @ q, torch.eye(big, dtype=torch.float64), atol=1e-6, rtol=0)
    # the stored pieces against their definitions (float64, dense)
    c = sum(t.T @ t / t.square().sum() for t in tv if t.square().sum() > 0)
    torch.testing.assert_close(c @ q, q * got.eigenvalues[:big].double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum_of_task_vectors().double(), tv.sum(0), atol=1e-5, rtol=1e-5)
    dm = sum(t @ t.T @ t / t.square().sum() for t in tv if t.square().sum() > 0)
    torch.testing.assert_close(got.dq.double(), dm @ q, atol=1e-5, rtol=1e-4)
    const = sum(float((t @ t.T).square().sum() / t.square().sum()) for t in tv if t.square().sum() > 0)
    assert got.objective_const == pytest.approx(const, rel=1e-9)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("swudi_a", {}),
        ("swudi", {"rank_ratio": 0.2, "t": 300.0}),
        ("swudi_soft", {}),
        ("pinv", {}),
        ("swudi_a", {"init": "mean"}),
    ],
)
def test_every_spectral_method_equals_the_dense_path(method, params) -> None:
    factors = make_factors(48, 40, [4, 3, 5, 2], seed=2)
    tv = dense(factors).float()
    got = merge_decomposition(decompose_factors(factors, device="cpu"), method, **params)
    # the SVD route: eigh of the dense C puts float32 noise (~1e-7) on the directions beyond sum r_i,
    # which the exponential filter then partly takes; the SVD route floors them as factor space does
    for route in ("svd", "eigh"):
        want = merge_decomposition(decompose(tv, device="cpu", route=route), method, **params)
        tol = (2e-5 if route == "svd" or method != "swudi_soft" else 5e-4) * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_swudi_a_equals_the_float64_closed_form() -> None:
    factors = make_factors(36, 60, [2, 6, 3], seed=3)
    dec = decompose_factors(factors, device="cpu")
    k = min(int((spectral_filter(dec.eigenvalues, dec.shape, "swudi_a") > 0).sum()), dec.rank)
    got = merge_decomposition(dec, "swudi_a")
    torch.testing.assert_close(got.double(), reference_theta(dense(factors), k), atol=1e-5, rtol=1e-4)


def test_objective_and_interference_from_factors_equal_the_dense_ones() -> None:
    factors = make_factors(32, 28, [3, 2, 4], seed=4)
    tv = dense(factors).float()
    dec = decompose_factors(factors, device="cpu")
    f = torch.zeros(dec.shape[1])
    f[:5] = 1.0
    theta = apply_filter(dec, f)
    loss = float(sum(((theta.double() - t) @ t.T).square().sum() / t.square().sum() for t in tv.double()))
    assert dec.objective(theta) == pytest.approx(loss, rel=1e-4)
    assert dec.objective_of_projection(filtered_projection(dec, f)) == pytest.approx(loss, rel=1e-4)
    want = interference_vs_sum(theta, tv, "cpu")
    got = interference_from_factors(dec, f, "sum", factors, "cpu")
    assert got["per_task"] == pytest.approx(want["per_task"], rel=1e-4)
    assert got["total"] == pytest.approx(want["total"], rel=1e-4)
    assert interference_from_decomposition(dec, f) == pytest.approx(want["total"], rel=1e-4)


def test_factored_decomposition_round_trips_without_a_dense_sum() -> None:
    factors = make_factors(20, 24, [2, 3], seed=5)
    dec = decompose_factors(factors, name="layer.weight", device="cpu")
    tensors, metadata = dec.to_tensors()
    assert "sum_tv" not in tensors and metadata["factored"] == "true"
    assert sum(t.numel() for t in tensors.values()) < 20 * 24  # smaller than one m x d matrix
    back = Decomposition.from_tensors(tensors, metadata)
    assert back.factored and back.sum_tv is None and back.shape == (20, 24)
    torch.testing.assert_close(merge_decomposition(back, "swudi_a"), merge_decomposition(dec, "swudi_a"))


def test_zero_and_untrained_adapters() -> None:
    m, d = 16, 12
    zero = [LowRank(torch.zeros(m, 2), torch.randn(2, d)), LowRank(torch.zeros(m, 0), torch.zeros(0, d))]
    dec = decompose_factors(zero, device="cpu")
    assert dec.all_zero
    assert torch.count_nonzero(merge_decomposition(dec, "swudi_a")) == 0
    one = make_factors(m, d, [3], seed=6) + zero
    got = merge_decomposition(decompose_factors(one, device="cpu"), "swudi_a", init="mean")
    want = merge_decomposition(decompose(dense(one).float(), device="cpu"), "swudi_a", init="mean")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bad_factors_are_named() -> None:
    good = make_factors(10, 8, [2], seed=7)[0]
    with pytest.raises(InputError, match=r"'w'.*expert 1"):
        decompose_factors([good, LowRank(torch.randn(10, 2), torch.randn(3, 8))], name="w")
    with pytest.raises(InputError, match=r"non-finite.*expert 0"):
        decompose_factors([LowRank(good.b, good.a * float("nan"))], name="w")
    with pytest.raises(InputError, match=r"sum of ranks 9 >= min"):
        decompose_factors(make_factors(10, 8, [5, 4], seed=8), name="w")
