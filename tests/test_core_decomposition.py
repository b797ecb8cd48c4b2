"""Decomposition pieces, its safetensors form, the objective, the registry and bad inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import swudi
from swudi import (
    ConfigError,
    Decomposition,
    InputError,
    decompose,
    get_method,
    merge_decomposition,
    merge_matrix,
    validate_params,
)
from swudi.core.decomposition import _dq_with_order


def make_tv(n: int, m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, d, generator=g) * torch.linspace(0.5, 2.0, n).view(n, 1, 1)


def reference_pieces(tv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """C, D and sum_i w_i ||tau_i tau_i^T||_F^2 in float64, term by term."""
    t = tv.double()
    c = torch.zeros(t.shape[2], t.shape[2], dtype=torch.float64)
    dm = torch.zeros(t.shape[1], t.shape[2], dtype=torch.float64)
    const = 0.0
    for ti in t:
        w = 1.0 / ti.square().sum()
        c += w * ti.T @ ti
        dm += w * ti @ ti.T @ ti
        const += float(w * (ti @ ti.T).square().sum())
    return c, dm, const


def reference_loss(theta: torch.Tensor, tv: torch.Tensor) -> float:
    t = tv.double()
    return float(sum(((theta.double() - ti) @ ti.T).square().sum() / ti.square().sum() for ti in t))


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 3, 9), (4, 5, 5)])
def test_stored_pieces_match_definitions(shape):
    n, m, d = shape
    tv = make_tv(n, m, d, seed=0)
    c64, d64, const = reference_pieces(tv)
    dec = decompose(tv, name="w", device="cpu")
    n, m, d = shape
    r = min(d, n * m)
    assert dec.shape == (m, d) and dec.rank == r and dec.num_tasks == n and not dec.all_zero
    q = dec.eigenvectors.double()
    assert torch.allclose(q.T @ q, torch.eye(r, dtype=torch.float64), atol=1e-5)
    # Q holds eigenvectors of C with the stored eigenvalues
    assert torch.allclose(c64 @ q, q * dec.eigenvalues[:r].double(), atol=1e-5)
    assert torch.allclose(dec.sum_tv, tv.sum(0), atol=1e-5)
    assert torch.allclose(dec.sum_q.double(), tv.double().sum(0) @ q, atol=1e-4)
    assert torch.allclose(dec.dq.double(), d64 @ q, rtol=1e-4, atol=1e-5)
    assert dec.objective_const == pytest.approx(const, rel=1e-5)


@pytest.mark.parametrize("order", ["chain", "gram_left", "gram_right", "full_d", "svd_factors"])
@pytest.mark.parametrize("shape", [(3, 4, 7), (3, 7, 4)])
def test_every_product_order_gives_d_q(order, shape):
    n, m, d = shape
    tv = make_tv(n, m, d, seed=1)
    _, d64, const = reference_pieces(tv)
    n, m, d = shape
    c = tv.reshape(n, -1).norm(dim=1)
    xs = tv / c.view(n, 1, 1)
    u, s, vh = torch.linalg.svd(xs.reshape(n * m, d), full_matrices=False)
    q = vh.T[:, :3].contiguous()
    dq, got_const = _dq_with_order(xs, c, q, order, u_sigma=u * s)
    assert torch.allclose(dq.double(), d64 @ q.double(), rtol=1e-4, atol=1e-5), order
    assert got_const == pytest.approx(const, rel=1e-5)


def test_objective_matches_wudi_loss():
    tv = make_tv(3, 6, 5, seed=2)
    dec = decompose(tv, device="cpu")
    g = torch.Generator().manual_seed(3)
    for theta in [torch.randn(6, 5, generator=g), tv.sum(0) * 0.3, merge_decomposition(dec, "swudi")]:
        assert dec.objective(theta, device="cpu") == pytest.approx(reference_loss(theta, tv), rel=1e-4)
    # pinv is the minimiser: nothing else scores lower
    best = dec.objective(merge_decomposition(dec, "pinv"), device="cpu")
    assert best <= dec.objective(merge_decomposition(dec, "swudi"), device="cpu")
    assert best <= dec.objective(tv.sum(0) * 0.3, device="cpu")
    with pytest.raises(InputError, match="shape"):
        dec.objective(torch.zeros(5, 6))


def test_to_tensors_round_trip_is_exact():
    tv = make_tv(3, 6, 5, seed=4).to(torch.bfloat16)
    dec = decompose(tv, name="layers.0.q_proj.weight", device="cpu")
    tensors, metadata = dec.to_tensors()
    assert all(isinstance(v, str) for v in metadata.values())
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    back = Decomposition.from_tensors(tensors, metadata)
    for field in ["eigenvalues", "eigenvectors", "sum_tv", "sum_q", "dq"]:
        assert torch.equal(getattr(back, field), getattr(dec, field)), field
    assert back.objective_const == dec.objective_const
    assert (back.num_tasks, back.all_zero, back.dtype, back.name, back.route) == (
        3,
        False,
        torch.bfloat16,
        "layers.0.q_proj.weight",
        dec.route,
    )
    assert torch.equal(merge_decomposition(back, "swudi_a"), merge_decomposition(dec, "swudi_a"))


def test_round_trip_through_safetensors_bytes():
    st = pytest.importorskip("safetensors.torch")
    dec = decompose(make_tv(2, 3, 8, seed=5), max_rank=4, device="cpu")
    tensors, metadata = dec.to_tensors()
    raw = st.save(tensors, metadata=metadata)
    back = Decomposition.from_tensors(st.load(raw), metadata)
    assert back.rank == 4
    assert torch.equal(merge_decomposition(back, "swudi"), merge_decomposition(dec, "swudi"))


def test_from_tensors_rejects_bad_input():
    tensors, metadata = decompose(make_tv(2, 3, 4, seed=6), device="cpu").to_tensors()
    with pytest.raises(InputError, match="format"):
        Decomposition.from_tensors(tensors, {**metadata, "format": "other"})
    with pytest.raises(InputError, match="format_version"):
        Decomposition.from_tensors(tensors, {**metadata, "format_version": "99"})
    with pytest.raises(InputError, match="missing"):
        Decomposition.from_tensors({k: v for k, v in tensors.items() if k != "dq"}, metadata)
    with pytest.raises(InputError, match="sum_q"):
        Decomposition.from_tensors({**tensors, "sum_q": tensors["sum_q"][:, :1]}, metadata)


def test_decompose_once_filter_many_equals_merge_matrix():
    tv = make_tv(4, 6, 8, seed=7)
    dec = decompose(tv, device="cpu")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("swudi", {}),
        ("swudi", {"t": 50.0, "rank_ratio": 0.3, "init": "mean"}),
        ("swudi_soft", {"t": 10.0}),
        ("swudi_a", {"rank_rule": "entropy"}),
        ("swudi_a", {"rank_rule": "cumvar_0.8", "t": 20.0, "init": "zero"}),
        ("pinv", {}),
        ("mean", {}),
        ("task_arithmetic", {"scale": 0.5}),
    ]
    for method, params in cases:
        a = merge_decomposition(dec, method, device="cpu", **params)
        b = merge_matrix(tv, method, device="cpu", **params)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (method, params)


def test_max_rank_cut_matches_the_truncated_filter():
    tv = make_tv(3, 6, 8, seed=8)
    full = decompose(tv, device="cpu")
    cut = decompose(tv, max_rank=3, device="cpu")
    assert cut.rank == 3 and torch.equal(cut.eigenvalues, full.eigenvalues)
    # hard truncation at K <= 3 needs nothing beyond the cut
    a = merge_decomposition(cut, "swudi_a", rank_rule="stable_rank", max_rank_ratio=0.375)
    b = merge_decomposition(full, "swudi_a", rank_rule="stable_rank", max_rank_ratio=0.375)
    assert torch.allclose(a, b, atol=1e-5)


def test_all_zero_task_vectors_fall_back_to_mean():
    tv = torch.zeros(3, 4, 5)
    tv[1, 2, 3] = 1e-7  # ||tau||^2 = 1e-14 < 1e-12: near zero
    dec = decompose(tv, device="cpu")
    assert dec.all_zero and dec.rank == 0 and dec.route == "none"
    for method in swudi.METHODS:
        if method in ("ties",):
            continue
        out = merge_matrix(tv, method, device="cpu")
        expected = tv.mean(0) if method != "task_arithmetic" else tv.sum(0) * 0.3
        assert torch.allclose(out, expected), method
    tensors, metadata = dec.to_tensors()
    assert Decomposition.from_tensors(tensors, metadata).all_zero


def test_one_zero_task_is_ignored():
    tv = make_tv(3, 5, 4, seed=9)
    with_zero = torch.cat([tv, torch.zeros(1, 5, 4)])
    dec = decompose(with_zero, device="cpu")
    assert float(dec.eigenvalues.sum()) == pytest.approx(3.0, rel=1e-5)  # trace = number of non-zero tasks
    a = merge_matrix(with_zero, "swudi", t=5.0, device="cpu")
    b = merge_matrix(tv, "swudi", t=5.0, device="cpu")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # same C, D and sum


def test_dtype_device_and_determinism():
    tv = make_tv(3, 6, 5, seed=10)
    out16 = merge_matrix(tv.to(torch.bfloat16), "swudi")
    assert out16.dtype == torch.bfloat16 and out16.device.type == "cpu"
    assert torch.equal(merge_matrix(tv, "swudi_a"), merge_matrix(tv, "swudi_a"))
    assert torch.equal(decompose(tv).eigenvectors, decompose(tv).eigenvectors)
    seq = merge_matrix(list(tv), "swudi")
    assert torch.equal(seq, merge_matrix(tv, "swudi"))
    assert swudi.resolve_device("cpu").type == "cpu"
    assert swudi.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            swudi.resolve_device("cuda")
    with pytest.raises(ConfigError):
        swudi.resolve_device("tpu")


def test_bad_inputs_name_the_weight():
    tv = make_tv(3, 4, 5, seed=11)
    bad = tv.clone()
    bad[2, 1, 1] = float("nan")
    with pytest.raises(InputError, match=r"'blocks\.0\.attn'.*expert\(s\) \[2\]"):
        merge_matrix(bad, "swudi", name="blocks.0.attn")
    bad[2, 1, 1] = float("inf")
    with pytest.raises(InputError, match=r"blocks\.0\.attn"):
        decompose(bad, name="blocks.0.attn")
    with pytest.raises(InputError, match="N = 0"):
        merge_matrix(torch.zeros(0, 4, 5), "swudi", name="w")
    with pytest.raises(InputError, match="N = 0"):
        merge_matrix([], "swudi", name="w")
    with pytest.raises(InputError, match=r"'w'.*task vector 1 has shape"):
        merge_matrix([torch.zeros(4, 5), torch.zeros(4, 6)], "swudi", name="w")
    with pytest.raises(InputError, match=r"'w'.*3 dimensions"):
        merge_matrix(torch.zeros(3, 20), "swudi", name="w")
    with pytest.raises(InputError, match="non-floating"):
        merge_matrix(torch.zeros(3, 4, 5, dtype=torch.int64), "swudi", name="w")
    with pytest.raises(ConfigError, match="route"):
        decompose(tv, route="qr")


def test_registry_and_parameter_validation():
    builtin = {
        "task_arithmetic": "elementwise",
        "mean": "elementwise",
        "ties": "elementwise",
        "wudi": "iterative",
        "optmerge": "iterative",
        "pinv": "spectral",
        "swudi_soft": "spectral",
        "swudi": "spectral",
        "swudi_a": "spectral",
    }
    assert {m: get_method(m).kind for m in builtin} == builtin  # tests/test_core_method_registry.py: more
    assert validate_params("swudi", {}) == {"t": 1300.0, "rank_ratio": 0.65, "init": "sum"}
    assert validate_params("swudi_a", {"t": 5}) == {
        "rank_rule": "participation_sqrt",
        "min_rank": 1,
        "max_rank_ratio": 1.0,
        "t": 5.0,
        "init": "sum",
    }
    assert validate_params("wudi", {})["iterations"] == 300
    assert validate_params("ties", {}) == {
        "density": 0.2, "scale": 1.0, "trim": "exact_k", "zero_sign": "zero", "empty_trim": "keep_one"
    }
    with pytest.raises(ConfigError, match=r"unknown merge method 'swud'.*swudi_a"):
        get_method("swud")
    with pytest.raises(ConfigError, match=r"unknown parameter 'rank'.*Valid parameters: t, rank_ratio, init"):
        validate_params("swudi", {"rank": 3})
    with pytest.raises(ConfigError, match="'rank_ratio'"):
        validate_params("swudi", {"rank_ratio": 1.5})
    with pytest.raises(ConfigError, match="'init'"):
        validate_params("swudi_soft", {"init": "median"})
    with pytest.raises(ConfigError, match=r"rank_rule.*unknown rank rule"):
        validate_params("swudi_a", {"rank_rule": "bogus"})
    with pytest.raises(ConfigError, match="unknown parameter 'density'"):
        merge_matrix(make_tv(2, 3, 4, seed=0), "swudi", density=0.3)
    dec = decompose(make_tv(2, 3, 4, seed=0))
    for method in ["wudi", "ties"]:
        with pytest.raises(ConfigError, match="task vectors"):
            merge_decomposition(dec, method)


def test_spectral_filter_reports_the_rank():
    lam = torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0])
    f = swudi.spectral_filter(lam, (5, 5), "swudi_a", rank_rule="participation")
    assert int(f.count_nonzero()) == 4
    f = swudi.spectral_filter(lam, (5, 5), "swudi", rank_ratio=0.5)  # ceil(2.5) = 3
    assert int(f.count_nonzero()) == 3
    with pytest.raises(ConfigError, match="not spectral"):
        swudi.spectral_filter(lam, (5, 5), "wudi")


def test_huge_finite_values_are_not_mistaken_for_non_finite():
    tv = torch.zeros(2, 3, 4)
    tv[:, 0, 0] = 3e38  # the float32 sum overflows, the values are finite
    tv[1, 2, 3] = -1.0
    assert torch.equal(swudi.check_task_vectors(tv, "big"), tv)
    from swudi.core.task_vectors import squared_norms

    assert torch.allclose(squared_norms(tv), torch.tensor([9e76, 9e76 + 1.0], dtype=torch.float64), rtol=1e-6)


def test_task_vector_norms_are_summed_in_float64() -> None:
    """||tau_i||^2 of float32 task vectors equals the float64 sum to 1e-12 (a float32 sum is off by
    ~1e-4 at this size), so trace(C) = N holds to float32 rounding of C, not of the norms."""
    from swudi.core.task_vectors import squared_norms

    tv = torch.randn((2, 2048, 2048), generator=torch.Generator().manual_seed(5)) * 1e-3
    want = tv.double().reshape(2, -1).square().sum(dim=1)
    torch.testing.assert_close(squared_norms(tv), want, rtol=1e-12, atol=0.0)
