"""Factor space: the decomposition of one 2-D weight whose task vectors are low-rank (LoRA).

With tau_i = B_i A_i (B_i ``[m, r_i]``, A_i ``[r_i, d]``, R = sum_i r_i < min(m, d)), everything
a :class:`~swudi.core.decomposition.Decomposition` holds lives in the R-dimensional span of the
stacked A's. With the thin QR ``[A_1; ...; A_N]^T = P T`` (P ``[d, R]`` orthonormal, T ``[R, R]``)
each A_i = K_i P^T, K_i = (columns of T for task i)^T ``[r_i, R]``, so tau_i = M_i P^T with
M_i = B_i K_i, and with H_i = M_i^T M_i = K_i^T (B_i^T B_i) K_i ``[R, R]``::

    ||tau_i||_F^2 = tr(H_i),      w_i = 1 / max(tr(H_i), 1e-12)
    C   = P (sum_i w_i H_i) P^T  = P V diag(lambda) V^T P^T        Q = P V  [d, R]
    S Q = sum_i B_i (K_i V)                                         [m, R]
    D Q = sum_i w_i M_i H_i V = sum_i w_i B_i (K_i H_i V)           [m, R]
    const = sum_i w_i ||H_i||_F^2         (= sum_i w_i ||tau_i tau_i^T||_F^2)

Cost O((m + d) R^2 + N R^3) and memory O((m + d) R): no m x d task vector and no d x d matrix.
The decomposition is *factored*: it stores all R eigenvectors (C's whole range) and not S, which is
(S Q) Q^T. It equals :func:`swudi.core.decomposition.decompose` on the dense B_i A_i to float32
tolerance (eigenvalues beyond R are the floor, as on the SVD route).

The small R x R algebra and the factor products run in float64 (they cost O((m + d) R^2), so the
extra precision is free); the stored pieces are float32 like every decomposition.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from swudi.core.decomposition import EIGENVALUE_FLOOR, Decomposition, _sign_fix
from swudi.core.device import resolve_device
from swudi.core.task_vectors import ZERO_NORM_SQ, LowRank
from swudi.errors import InputError

__all__ = ["total_rank", "fits_factor_space", "decompose_factors", "task_projections"]

log = logging.getLogger(__name__)


def total_rank(factors: Sequence[LowRank]) -> int:
    """R = sum_i r_i."""
    return sum(f.rank for f in factors)


def fits_factor_space(shape: tuple[int, int], ranks: Sequence[int]) -> bool:
    """True when sum_i r_i < min(m, d): C's range is smaller than the dense path's."""
    return sum(ranks) < min(shape)


def decompose_factors(
    factors: Sequence[LowRank],
    *,
    name: str = "",
    device: str | torch.device = "auto",
) -> Decomposition:
    """The factored :class:`~swudi.core.decomposition.Decomposition` of tau_i = b_i @ a_i (module docstring).

    Raises :class:`InputError` naming the weight for no factors, mismatched shapes, non-finite
    values, or R >= min(m, d) (then the dense path is the cheaper one).
    """
    if not factors:
        raise InputError(f"weight {name!r}: no task vectors given (N = 0)")
    m, d = factors[0].shape
    for i, f in enumerate(factors):
        if f.shape != (m, d) or f.b.shape[1] != f.a.shape[0]:
            raise InputError(
                f"weight {name!r}: factors of expert {i} are {list(f.b.shape)} x {list(f.a.shape)}, "
                f"expected [{m}, r] x [r, {d}]"
            )
        if not (bool(torch.isfinite(f.a).all()) and bool(torch.isfinite(f.b).all())):
            raise InputError(f"weight {name!r}: non-finite values (NaN or inf) in the LoRA factors of expert {i}")
    big = total_rank(factors)
    if not fits_factor_space((m, d), [big]):
        raise InputError(f"weight {name!r}: sum of ranks {big} >= min(m, d) = {min(m, d)}; use the dense path")
    dev = resolve_device(device)
    f64 = torch.float64
    n = len(factors)
    a_all = torch.cat([f.a.to(dev, f64) for f in factors], dim=0)  # [R, d]
    p, t = torch.linalg.qr(a_all.T)  # P [d, R], T [R, R]
    del a_all
    ks, hs, sq = [], [], []
    start = 0
    for f in factors:
        k = t[:, start : start + f.rank].T  # [r_i, R]
        start += f.rank
        b = f.b.to(dev, f64)
        h = k.T @ (b.T @ b) @ k  # M_i^T M_i
        ks.append(k)
        hs.append(h)
        sq.append(float(h.trace()))
    norms = torch.tensor(sq, dtype=f64)
    if big == 0 or float(norms.max()) < ZERO_NORM_SQ:
        log.debug("weight %r: all task vectors are (near) zero; methods fall back to the mean", name)
        sum_q = sum(
            (f.b.to(dev, f64) @ k for f, k in zip(factors, ks, strict=True)), torch.zeros(m, big, dtype=f64, device=dev)
        )
        return _factored(name, n, torch.full((d,), EIGENVALUE_FLOOR), p, sum_q, torch.zeros(m, big), 0.0, True)
    w = 1.0 / norms.clamp(min=ZERO_NORM_SQ)
    c_small = sum((float(wi) * h for wi, h in zip(w, hs, strict=True)), torch.zeros(big, big, dtype=f64, device=dev))
    evals_asc, v_asc = torch.linalg.eigh(c_small)
    evals, v = evals_asc.flip(0), v_asc.flip(1)
    q = p @ v  # [d, R]
    signs = _sign_fix(q.to(torch.float32)).to(f64)  # the dense path's sign rule, decided on the stored Q
    q, v = q * signs, v * signs
    sum_q = torch.zeros(m, big, dtype=f64, device=dev)
    dq = torch.zeros(m, big, dtype=f64, device=dev)
    const = 0.0
    for f, k, h, wi in zip(factors, ks, hs, w, strict=True):
        b = f.b.to(dev, f64)
        sum_q += b @ (k @ v)
        dq += float(wi) * (b @ (k @ h @ v))
        const += float(wi) * float(h.square().sum())
    eigenvalues = torch.full((d,), EIGENVALUE_FLOOR, dtype=torch.float32)
    eigenvalues[:big] = evals.clamp(min=EIGENVALUE_FLOOR).to(torch.float32).cpu()
    return _factored(name, n, eigenvalues, q, sum_q, dq, const, False)


def _factored(
    name: str,
    n: int,
    eigenvalues: torch.Tensor,
    q: torch.Tensor,
    sum_q: torch.Tensor,
    dq: torch.Tensor,
    const: float,
    all_zero: bool,
) -> Decomposition:
    f32 = torch.float32
    return Decomposition(
        eigenvalues=eigenvalues.to(f32).cpu(),
        eigenvectors=q.to(f32).cpu().contiguous(),
        sum_tv=None,
        sum_q=sum_q.to(f32).cpu().contiguous(),
        dq=dq.to(f32).cpu().contiguous(),
        objective_const=const,
        num_tasks=n,
        all_zero=all_zero,
        dtype=f32,
        name=name,
        route="none" if all_zero else "factors",
        factored=True,
    )


def task_projections(factors: Sequence[LowRank], q: torch.Tensor) -> list[torch.Tensor]:
    """tau_i Q = b_i (a_i Q) ``[m, r]`` float64 per task: with Q spanning C's range, tau_i = (tau_i Q) Q^T."""
    q64 = q.to(torch.float64)
    return [f.b.to(q64.device, torch.float64) @ (f.a.to(q64.device, torch.float64) @ q64) for f in factors]
