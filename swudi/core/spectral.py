"""Spectral filters and the filtered estimator.

With C = Q diag(lambda) Q^T and a filter f_k in [0, 1] per eigendirection::

    theta = theta0 - theta0 Q diag(f) Q^T + D Q diag(f / lambda) Q^T

f = 1 everywhere is the pseudo-inverse solution, f = 0 keeps theta0. Plain gradient descent on the
WUDI loss with step eta for n steps is the Landweber filter f = 1 - (1 - 2 eta lambda)^n; gradient
flow for time t is the exponential filter f = 1 - exp(-t lambda).
"""

from __future__ import annotations

import logging

import torch

from swudi.core.decomposition import Decomposition, init_coefficient
from swudi.core.device import resolve_device
from swudi.errors import ConfigError, InputError

__all__ = [
    "exponential_filter",
    "landweber_filter",
    "truncation_filter",
    "pinv_filter",
    "apply_filter",
    "filtered_projection",
]

logger = logging.getLogger(__name__)

#: Filter values above this beyond a max_rank cut trigger a warning (those directions keep theta0).
_TRUNCATION_WARN = 1e-3


def exponential_filter(eigenvalues: torch.Tensor, t: float) -> torch.Tensor:
    """f_k = 1 - exp(-t lambda_k) (gradient flow for time t), float32."""
    if t < 0:
        raise ConfigError(f"t must be >= 0, got {t}")
    lam = eigenvalues.to(torch.float64)
    return (-torch.expm1(-float(t) * lam)).to(torch.float32)


def landweber_filter(eigenvalues: torch.Tensor, step: float, iterations: int) -> torch.Tensor:
    """f_k = 1 - (1 - 2 step lambda_k)^n: n plain gradient-descent steps of size ``step`` on L."""
    if iterations < 0:
        raise ConfigError(f"iterations must be >= 0, got {iterations}")
    lam = eigenvalues.to(torch.float64)
    return (1.0 - (1.0 - 2.0 * float(step) * lam) ** int(iterations)).to(torch.float32)


def truncation_filter(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """f_k = 1 on the k largest eigenvalues (the first k, eigenvalues descending), 0 elsewhere."""
    d = int(eigenvalues.shape[0])
    if not 0 <= k <= d:
        raise ConfigError(f"truncation rank must lie in [0, {d}], got {k}")
    f = torch.zeros(d, dtype=torch.float32)
    f[:k] = 1.0
    return f


def pinv_filter(eigenvalues: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """f_k = 1 where lambda_k > rtol * lambda_max, else 0 (rtol defaults to d * eps(float32)).

    This is the pseudo-inverse C^+ with torch.linalg.pinv's default cut for a Hermitian matrix:
    eigenvalues at float32 noise level are treated as zero instead of being inverted.
    """
    d = int(eigenvalues.shape[0])
    if rtol is None:
        rtol = d * torch.finfo(torch.float32).eps
    lam = eigenvalues.to(torch.float64)
    return (lam > float(rtol) * float(lam.max())).to(torch.float32)


def apply_filter(
    dec: Decomposition,
    f: torch.Tensor,
    init: str = "sum",
    *,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """The filtered estimator from a decomposition, ``[m, d]`` float32 on the CPU.

    ``f`` has one value per eigenvalue (length d, descending order) or per stored eigenvector
    (length r). Directions beyond the stored rank keep theta0 (f = 0 there). Only the leading
    directions up to the last non-zero f_k enter the products. An all-zero decomposition returns
    the mean of the task vectors whatever the filter.
    """
    if dec.all_zero:
        return dec.theta0("mean")
    if dec.sum_tv is None:  # factored: S = (S Q) Q^T, so theta = (theta Q) Q^T, one [m, r] x [r, d] product
        dev = resolve_device(device)
        return (filtered_projection(dec, f, init, device=dev).to(dev) @ dec.eigenvectors.to(dev).T).cpu()
    init_c, coef = _filter_coefficients(dec, f, init, device)
    if coef is None:
        return dec.sum_tv * init_c
    q = dec.eigenvectors[:, : coef.shape[1]].to(coef.device)
    # theta = init_c * S + coef Q_k^T in one allocation
    return torch.addmm(dec.sum_tv.to(coef.device), coef, q.T, beta=init_c).cpu()


def filtered_projection(
    dec: Decomposition,
    f: torch.Tensor,
    init: str = "sum",
    *,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """theta Q ``[m, r]`` of the filtered estimator, without forming theta (CPU, float32).

    With theta = c S + coef Q_k^T and Q orthonormal, theta Q = c (S Q) + [coef, 0]: O(m r) work
    from the stored ``sum_q``. :meth:`Decomposition.objective_of_projection` turns it into L(theta).
    """
    m, _ = dec.shape
    if dec.all_zero:
        return torch.zeros((m, dec.rank), dtype=torch.float32)
    init_c, coef = _filter_coefficients(dec, f, init, device)
    out = dec.sum_q * init_c
    if coef is not None:
        out[:, : coef.shape[1]] += coef.cpu()
    return out


def _filter_coefficients(
    dec: Decomposition, f: torch.Tensor, init: str, device: str | torch.device
) -> tuple[float, torch.Tensor | None]:
    """(c, coef) with theta = c S + coef Q_k^T, coef = D Q_k diag(f / lambda) - c S Q_k diag(f).

    k is the last direction with f_k != 0; coef is None when the filter is zero everywhere.
    """
    _, d = dec.shape
    init_c = init_coefficient(init, dec.num_tasks)
    f = torch.as_tensor(f, dtype=torch.float32).flatten().cpu()
    r = dec.rank
    if f.shape[0] not in (d, r):
        raise InputError(f"weight {dec.name!r}: filter has {f.shape[0]} values, expected {d} (or the rank {r})")
    if not bool(torch.isfinite(f).all()):
        raise InputError(f"weight {dec.name!r}: filter has non-finite values")
    if f.shape[0] > r and r < dec.full_rank:
        beyond = f[r : dec.full_rank]
        if beyond.numel() and float(beyond.max()) > _TRUNCATION_WARN:
            logger.warning(
                "weight %r: the filter uses directions beyond the %d stored eigenvectors "
                "(decomposition cut by max_rank); they keep theta0",
                dec.name,
                r,
            )
    f = f[:r]
    nonzero = torch.nonzero(f).flatten()
    if nonzero.numel() == 0:
        return init_c, None
    k = int(nonzero[-1]) + 1
    dev = resolve_device(device)
    fk = f[:k].to(dev)
    lam = dec.eigenvalues[:k].to(dev)
    return init_c, dec.dq[:, :k].to(dev) * (fk / lam) - dec.sum_q[:, :k].to(dev) * (fk * init_c)
