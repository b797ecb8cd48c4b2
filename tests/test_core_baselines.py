"""Baselines: hand-made examples for TIES / task arithmetic / mean; WUDI and OptMerge behaviour."""

from __future__ import annotations

import pytest
import torch

from swudi import merge_elementwise, merge_matrix
from swudi.core import baselines


def test_task_arithmetic_and_mean_by_hand():
    tv = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, -1.0]]])
    expected_ta = torch.tensor([[0.6, 0.6], [0.9, 0.9]])  # 0.3 * [[2, 2], [3, 3]]
    assert torch.allclose(merge_matrix(tv, "task_arithmetic"), expected_ta)
    assert torch.allclose(merge_elementwise(tv, "task_arithmetic", scale=1.0), torch.tensor([[2.0, 2.0], [3.0, 3.0]]))
    assert torch.allclose(merge_elementwise(tv, "mean"), torch.tensor([[1.0, 1.0], [1.5, 1.5]]))


TIES_TV = torch.tensor(
    [
        [3.0, -1.0, 0.5, 2.0, 0.0],  # top-2 |.|: 3, 2
        [-4.0, 1.0, 0.2, 1.5, 0.1],  # top-2: -4, 1.5
        [2.0, -3.0, 0.1, -0.5, 1.0],  # top-2: -3, 2
    ]
)


def test_ties_by_hand():
    # trimmed: [3,0,0,2,0], [-4,0,0,1.5,0], [2,-3,0,0,0]; sum [1,-3,0,3.5,0] -> signs [+,-,0,+,0]
    # disjoint means: (3+2)/2, -3, 0, (2+1.5)/2, 0
    expected = torch.tensor([2.5, -3.0, 0.0, 1.75, 0.0])
    assert torch.allclose(merge_elementwise(TIES_TV, "ties", density=0.4), expected)
    assert torch.allclose(merge_elementwise(TIES_TV, "ties", density=0.4, scale=0.5), expected * 0.5)


def test_ties_exact_k_keeps_what_a_stable_sort_keeps():
    """exact_k keeps the first k of a stable descending sort by magnitude (ties: lower index first),
    checked on rows with many equal magnitudes (bf16-like rounding) and a heavily tied threshold."""
    generator = torch.Generator().manual_seed(3)
    for n, numel, density, step in [(3, 4000, 0.2, 0.05), (4, 777, 0.1, 0.5), (2, 64, 0.9, 1.0), (3, 5000, 0.5, 0.0)]:
        tv = torch.randn(n, numel, generator=generator)
        if step:
            tv = (tv / step).round() * step
        k = int(density * numel)
        expected = torch.zeros_like(tv)
        for i in range(n):
            magnitudes = tv[i].abs().tolist()
            order = sorted(range(numel), key=lambda j: (-magnitudes[j], j))[:k]
            expected[i, order] = tv[i, order]
        trimmed = baselines._trim(tv, k, "exact_k")
        assert torch.equal(trimmed, expected), (n, numel, density)


def test_ties_density_one_and_zero():
    # density 1: nothing trimmed; signs of sums [+, -, +, +, +]
    # entry 0: 3, 2 agree (+) -> 2.5; entry 1: -1, -3 -> -2; entry 2: all + -> 0.8/3;
    # entry 3: 2, 1.5 -> 1.75; entry 4: 0.1, 1 -> 0.55 (the 0 of task 0 does not count)
    expected = torch.tensor([2.5, -2.0, 0.8 / 3, 1.75, 0.55])
    assert torch.allclose(merge_elementwise(TIES_TV, "ties", density=1.0), expected)
    assert torch.equal(merge_elementwise(TIES_TV, "ties", density=0.0), torch.zeros(5))


def test_ties_keeps_shape_and_dtype():
    tv = TIES_TV.reshape(3, 5, 1).to(torch.bfloat16)
    out = merge_elementwise(tv, "ties", density=0.4)
    assert out.shape == (5, 1) and out.dtype == torch.bfloat16


def independent_loss(theta: torch.Tensor, tv: torch.Tensor) -> float:
    t = tv.double()
    return float(sum(((theta.double() - ti) @ ti.T).square().sum() / ti.square().sum() for ti in t))


def test_wudi_lowers_the_objective_from_its_start():
    g = torch.Generator().manual_seed(0)
    tv = torch.randn(3, 8, 6, generator=g) * 1e-3  # fine-tuning-sized deltas: Adam's steps matter
    start = tv.sum(0)
    merged = merge_matrix(tv, "wudi", iterations=20, device="cpu")
    assert merged.dtype == torch.float32
    l0, l1 = independent_loss(start, tv), independent_loss(merged, tv)
    assert l1 < 0.9 * l0
    more = merge_matrix(tv, "wudi", iterations=40, device="cpu")
    assert independent_loss(more, tv) < l1
    assert torch.equal(merge_matrix(tv, "wudi", iterations=0, device="cpu"), start)


def test_wudi_loss_matches_independent_formula():
    g = torch.Generator().manual_seed(1)
    tv = torch.randn(3, 4, 5, generator=g)
    theta = torch.randn(4, 5, generator=g)
    assert float(baselines.wudi_loss(theta, tv)) == pytest.approx(independent_loss(theta, tv), rel=1e-5)


def test_optmerge_with_full_rank_is_wudi():
    g = torch.Generator().manual_seed(2)
    tv = torch.randn(3, 6, 4, generator=g) * 1e-3
    a = merge_matrix(tv, "optmerge", iterations=20, rank=4, device="cpu")
    b = merge_matrix(tv, "wudi", iterations=20, device="cpu")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_optmerge_default_rank_and_effect():
    assert baselines.optmerge_rank((6, 4), 3) == 1  # floor(4 / 3)
    assert baselines.optmerge_rank((768, 3072), 8) == 96
    assert baselines.optmerge_rank((2, 2), 8) == 1
    g = torch.Generator().manual_seed(3)
    tv = torch.randn(3, 6, 4, generator=g) * 1e-3
    out = merge_matrix(tv, "optmerge", iterations=20, device="cpu")
    assert torch.isfinite(out).all() and not torch.allclose(out, tv.sum(0))


def test_iterative_methods_fall_back_to_mean_on_zero_task_vectors():
    tv = torch.zeros(3, 4, 5)
    tv[0, 0, 0] = 1e-9  # below the near-zero threshold (||tau||^2 < 1e-12)
    for method in ["wudi", "optmerge"]:
        out = merge_matrix(tv, method, device="cpu")
        assert torch.allclose(out, tv.mean(0)), method


def test_streamed_mean_equals_the_stacked_mean_and_names_a_bad_expert() -> None:
    from swudi import InputError
    from swudi.core.task_vectors import MeanAccumulator, stack_task_vectors

    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    experts = [(base.float() + 0.01 * torch.randn(40, 8, generator=g)).to(torch.bfloat16) for _ in range(5)]
    acc = MeanAccumulator(base, "embed")
    for i, expert in enumerate(experts):
        acc.add(i, expert)
    torch.testing.assert_close(acc.mean(), stack_task_vectors(base, experts, "embed").mean(dim=0))
    bad = experts[2].clone()
    bad[3, 1] = float("nan")
    acc = MeanAccumulator(base, "embed")
    with pytest.raises(InputError, match=r"'embed'.*expert 2"):
        for i, expert in enumerate([experts[0], experts[1], bad]):
            acc.add(i, expert)
    with pytest.raises(InputError, match="expert 1 has shape"):
        MeanAccumulator(base, "embed").add(1, torch.zeros(3, 3))


def _autograd_adam_reference(theta0, targets, projectors, weights, iterations, lr):
    """The published WUDI loop: autograd through sum_i w_i ||(theta - T_i) P_i^T||^2 every step (float64)."""
    theta = torch.nn.Parameter(theta0.double().clone())
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(iterations):
        loss = sum(
            w * ((theta - t) @ p.T).square().sum()
            for t, p, w in zip(targets.double(), projectors.double(), weights.double(), strict=True)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()


def test_closed_form_gradient_equals_autograd_of_the_loss():
    g = torch.Generator().manual_seed(4)
    targets = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    projectors = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)  # rank-2 projectors (OptMerge)
    weights = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    theta = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sum(w * ((theta - t) @ p.T).square().sum() for t, p, w in zip(targets, projectors, weights, strict=True))
    (auto,) = torch.autograd.grad(loss, theta)
    c, b = baselines.projected_loss_grad_terms(targets, projectors, weights)
    assert torch.allclose(2 * (theta.detach() @ c - b), auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 12, 8), (3, 8, 12)])
def test_wudi_matches_the_autograd_loop(shape):
    g = torch.Generator().manual_seed(5)
    tv = torch.randn(*shape, generator=g) * 1e-3
    weights = 1.0 / tv.double().square().sum(dim=(1, 2))
    ref = _autograd_adam_reference(tv.sum(0), tv, tv, weights, 50, 1e-5)
    fast = baselines.wudi(tv, iterations=50, lr=1e-5)
    assert not torch.allclose(ref, tv.sum(0).double(), atol=1e-7), "the test must move theta"
    assert torch.allclose(fast.double(), ref, rtol=1e-4, atol=1e-8)
