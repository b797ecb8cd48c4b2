"""Per-task WUDI interference against a direct float64 evaluation of the loss terms."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from swudi.core.diagnostics import interference_vs_sum, task_interference


def _direct(theta: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    theta, tv = theta.double(), tv.double()
    return torch.stack([((theta - t) @ t.T).square().sum() / t.square().sum() for t in tv])


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])  # both evaluation orders
def test_task_interference_equals_the_loss_terms(shape) -> None:
    g = torch.Generator().manual_seed(0)
    tv = torch.randn(3, *shape, generator=g)
    theta = torch.randn(*shape, generator=g)
    torch.testing.assert_close(task_interference(theta, tv, "cpu"), _direct(theta, tv), rtol=1e-5, atol=1e-8)


def test_ratios_are_relative_to_the_sum_and_zero_tasks_are_skipped() -> None:
    g = torch.Generator().manual_seed(1)
    tv = torch.randn(3, 5, 7, generator=g)
    tv[2] = 0
    theta = 0.5 * tv.sum(0)
    got: dict[str, Any] = interference_vs_sum(theta, tv, "cpu")
    want = _direct(theta, tv[:2]) / _direct(tv.sum(0), tv[:2])
    assert got["per_task"][2] is None
    torch.testing.assert_close(torch.tensor(got["per_task"][:2], dtype=torch.float64), want, rtol=1e-5, atol=0)
    total = _direct(theta, tv[:2]).sum() / _direct(tv.sum(0), tv[:2]).sum()
    assert got["total"] == pytest.approx(float(total), rel=1e-5)
    assert interference_vs_sum(tv.sum(0), tv, "cpu")["total"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 2, 9), (4, 7, 7)])
@pytest.mark.parametrize("init", ["sum", "mean", "zero"])
def test_total_interference_from_the_decomposition_equals_the_task_vector_formula(shape, init) -> None:
    """O(m r) from theta Q and S Q == L(theta) / L(sum) computed from the task vectors themselves."""
    from swudi.core.decomposition import decompose
    from swudi.core.diagnostics import interference_from_decomposition
    from swudi.core.spectral import apply_filter, exponential_filter, truncation_filter

    g = torch.Generator().manual_seed(sum(shape))
    tv = torch.randn(shape, generator=g)
    dec = decompose(tv, device="cpu")
    f = exponential_filter(dec.eigenvalues, 3.0) * truncation_filter(dec.eigenvalues, max(1, shape[2] // 2))
    theta = apply_filter(dec, f, init, device="cpu")
    want = interference_vs_sum(theta, tv, "cpu")["total"]
    assert interference_from_decomposition(dec, f, init, "cpu") == pytest.approx(want, rel=1e-4)
    direct = _direct(theta, tv).sum() / _direct(tv.sum(dim=0), tv).sum()  # the loss terms by hand
    assert want == pytest.approx(float(direct), rel=1e-4)
