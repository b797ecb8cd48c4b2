"""SWUDI-A rank rules: the truncation rank K of one weight chosen from the eigenvalues of C.

Eigenvalues are used descending and floored at 1e-8. Every rule's K is clamped to
``[min_rank, max(min_rank, round(max_rank_ratio * d))]`` (d = number of eigenvalues).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from swudi.core.decomposition import EIGENVALUE_FLOOR
from swudi.errors import ConfigError, InputError

__all__ = ["RANK_RULES", "CUMVAR_PREFIX", "select_rank", "check_rank_rule", "rank_ceil", "gavish_donoho_omega"]

CUMVAR_PREFIX = "cumvar_"


def rank_ceil(x: float) -> int:
    """ceil(x), ignoring float noise just above an integer (0.7 * 10 -> 7, exp(log 4) -> 4)."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def _participation_sqrt(lam: torch.Tensor, shape: tuple[int, int]) -> int:
    """ceil((sum sqrt lambda)^2 / sum lambda)."""
    y = lam.sqrt()
    return rank_ceil(float(y.sum() ** 2 / lam.sum()))


def _participation(lam: torch.Tensor, shape: tuple[int, int]) -> int:
    """ceil((sum lambda)^2 / sum lambda^2)."""
    return rank_ceil(float(lam.sum() ** 2 / lam.square().sum()))


def _entropy(lam: torch.Tensor, shape: tuple[int, int]) -> int:
    """ceil(exp(H)), H = -sum p log p, p = lambda / sum lambda."""
    p = lam / lam.sum()
    return rank_ceil(math.exp(float(-(p * p.log()).sum())))


def _stable_rank(lam: torch.Tensor, shape: tuple[int, int]) -> int:
    """ceil(sum lambda^2 / lambda_max^2)."""
    return rank_ceil(float(lam.square().sum() / lam.max() ** 2))


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) = lambda*(beta) / mu(beta) as in the SWUDI reference code (method.md).

    lambda*(beta) = sqrt(2(beta+1) + 8 beta / ((beta+1) + sqrt(beta^2 + 14 beta + 1))),
    mu(beta) = sqrt((1-beta)^2 + beta), or sqrt(2 + sqrt 3) when beta >= 0.9999.
    Note: this is the reference's approximation, not Gavish-Donoho's published omega(1) ~ 2.858.
    """
    lam_star = math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0)))
    if beta >= 0.9999:
        mu = math.sqrt(2.0 + math.sqrt(3.0))
    else:
        mu = math.sqrt(max((1.0 - beta) ** 2 + beta, 1e-3))
    return lam_star / max(mu, 1e-3)


def _gavish_donoho(lam: torch.Tensor, shape: tuple[int, int]) -> int:
    """#{sqrt(lambda_k) > omega(beta) * median(sqrt lambda)}, at least 1; beta = min(m,d)/max(m,d).

    The median of an even count is the lower middle value (torch.median, as the reference).
    """
    m, d = shape
    beta = min(m, d) / max(m, d)
    y = lam.sqrt()
    threshold = gavish_donoho_omega(beta) * max(float(y.median()), 1e-30)
    return max(1, int((y > threshold).sum()))


def _cumvar(fraction: float) -> Callable[[torch.Tensor, tuple[int, int]], int]:
    def rule(lam: torch.Tensor, shape: tuple[int, int]) -> int:
        """Smallest K whose top-K eigenvalue sum reaches ``fraction`` of the total."""
        cum = lam.cumsum(0) / lam.sum()
        return int((cum < fraction * (1.0 - 1e-12)).sum()) + 1

    return rule


#: The fixed-name rules; ``cumvar_<f>`` (0 < f <= 1) is accepted as well.
RANK_RULES: dict[str, Callable[[torch.Tensor, tuple[int, int]], int]] = {
    "participation_sqrt": _participation_sqrt,
    "participation": _participation,
    "entropy": _entropy,
    "stable_rank": _stable_rank,
    "gavish_donoho": _gavish_donoho,
}


def check_rank_rule(rule: str) -> Callable[[torch.Tensor, tuple[int, int]], int]:
    """Return the rule's function; :class:`ConfigError` naming the valid rules otherwise."""
    if isinstance(rule, str) and rule in RANK_RULES:
        return RANK_RULES[rule]
    if isinstance(rule, str) and rule.startswith(CUMVAR_PREFIX):
        try:
            fraction = float(rule[len(CUMVAR_PREFIX) :])
        except ValueError:
            fraction = float("nan")
        if 0.0 < fraction <= 1.0:
            return _cumvar(fraction)
        raise ConfigError(
            f"rank rule {rule!r}: the fraction after '{CUMVAR_PREFIX}' must lie in (0, 1], e.g. cumvar_0.9"
        )
    valid = ", ".join([*RANK_RULES, f"{CUMVAR_PREFIX}<f> (e.g. cumvar_0.9)"])
    raise ConfigError(f"unknown rank rule {rule!r}; valid: {valid}")


def select_rank(
    eigenvalues: torch.Tensor | Sequence[float],
    rule: str,
    shape: tuple[int, int] | Sequence[int],
    *,
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
) -> int:
    """Truncation rank K for the eigenvalues of C (length d) of a weight of ``shape`` (m, d).

    Rules (method.md): ``participation_sqrt`` (default of SWUDI-A), ``participation``,
    ``entropy``, ``stable_rank``, ``gavish_donoho``, ``cumvar_<f>``. Computed in float64 on
    eigenvalues sorted descending and floored at 1e-8, then clamped to
    ``[min_rank, max(min_rank, round(max_rank_ratio * d))]`` (and never above d).
    """
    fn = check_rank_rule(rule)
    if not isinstance(min_rank, int) or min_rank < 0:
        raise ConfigError(f"min_rank must be a non-negative integer, got {min_rank!r}")
    if not 0.0 < float(max_rank_ratio) <= 1.0:
        raise ConfigError(f"max_rank_ratio must lie in (0, 1], got {max_rank_ratio!r}")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().cpu()
    if len(tuple(shape)) != 2:
        raise InputError(f"shape must be (out, in), got {tuple(shape)}")
    m, d = (int(s) for s in shape)
    if lam.numel() != d or d == 0:
        raise InputError(f"{lam.numel()} eigenvalues given for a weight of shape {(m, d)}; expected {d} (> 0)")
    if not bool(torch.isfinite(lam).all()):
        raise InputError("eigenvalues contain non-finite values")
    lam = lam.clamp(min=EIGENVALUE_FLOOR).sort(descending=True).values
    k = fn(lam, (m, d))
    upper = max(min_rank, round(float(max_rank_ratio) * d))
    return min(d, max(min_rank, min(k, upper)))
