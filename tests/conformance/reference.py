"""Independent float64 references of the merged tensors (method.md), written from the formulas.

Every function takes the task vectors tau_i = E_i - W0 (float64) of one tensor and returns theta;
:func:`reference_tensor` applies a tensor's treatment (orientation, fused experts, route) and
W = W0 + alpha * theta.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch


def swudi_a(taus: list[torch.Tensor]) -> torch.Tensor:
    """SWUDI-A, participation_sqrt, init sum, on m x d = out x in task vectors (method.md):

    w_i = 1/||tau_i||_F^2, C = sum w_i tau_i^T tau_i (d x d), D = sum w_i tau_i tau_i^T tau_i,
    lambda, Q = eigh(C) descending, floored at 1e-8, K = ceil((sum sqrt lambda)^2 / sum lambda)
    clamped to [1, d], theta = S (I - Q_K Q_K^T) + D Q_K diag(1/lambda_K) Q_K^T with S = sum tau_i.
    """
    d = taus[0].shape[1]
    norms = [float((t * t).sum()) for t in taus]
    s = torch.stack(taus).sum(0)
    if max(norms) < 1e-12:
        return s / len(taus)
    c = torch.zeros(d, d, dtype=torch.float64)
    dm = torch.zeros_like(taus[0])
    for t, n in zip(taus, norms, strict=True):
        w = 1.0 / max(n, 1e-12)
        c += w * t.T @ t
        dm += w * t @ t.T @ t
    lam, q = torch.linalg.eigh(c)
    lam, q = lam.flip(0).clamp(min=1e-8), q.flip(1)
    k = math.ceil(float(lam.sqrt().sum()) ** 2 / float(lam.sum()))
    k = min(max(k, 1), d)
    qk, lk = q[:, :k], lam[:k]
    return s - s @ qk @ qk.T + dm @ qk @ torch.diag(1.0 / lk) @ qk.T


def task_arithmetic(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    """theta = scale * sum_i tau_i."""
    return scale * torch.stack(taus).sum(0)


def ties(taus: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES (Yadav et al.): per task keep the k = floor(density * numel) largest magnitudes (at least
    one; magnitudes tied at the threshold: the lower index first, as mergekit), elect the sign of the
    sum per entry (0 where it is 0), average the kept entries of that sign, times scale."""
    flat = torch.stack([t.reshape(-1) for t in taus])
    k = max(1, int(density * flat.shape[1]))
    kept = torch.zeros_like(flat)
    for i, row in enumerate(flat):
        top = torch.sort(row.abs(), descending=True, stable=True).indices[:k]
        kept[i, top] = row[top]
    sign = torch.sign(kept.sum(0))
    agree = (torch.sign(kept) == sign) & (kept != 0)
    mean = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (scale * mean).reshape(taus[0].shape)


def mean(taus: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(taus).mean(0)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def expected_treatment(name: str, shape: tuple[int, ...], method: str, fused: tuple[str, ...]) -> str:
    """What the test expects swudi to do with a floating tensor: "layer" (the method on a 2-D weight),
    "experts" (the method on each expert of a fused [E, a, b] tensor), "method" (an elementwise
    method on the whole tensor) or "mean" (method.md: biases, norms, embeddings, lm_head, 1-D/4-D)."""
    if len(shape) == 3 and matches(name, fused):
        return "experts"
    if method in ("task_arithmetic", "ties"):
        return "method"
    if len(shape) == 2 and not matches(name, ("*lm_head*", "*embed*", "*bias")):
        return "layer"
    return "mean"


def reference_tensor(
    name: str,
    base: torch.Tensor,
    experts: list[torch.Tensor],
    method: str,
    params: dict,
    treatment: str,
    in_out: bool,
    alpha: float = 1.0,
) -> torch.Tensor:
    """W0 + alpha * theta in float64 for one tensor; ``in_out``: the weight (each expert's weight of a
    fused tensor) is stored [in, out] and merged as its transpose."""
    w0 = base.double()
    taus = [e.double() - w0 for e in experts]

    def theta_2d(ts: list[torch.Tensor]) -> torch.Tensor:
        if method == "ties":
            return ties(ts, params["density"], params["scale"])
        if method == "task_arithmetic":
            return task_arithmetic(ts, params["scale"])
        if in_out:
            return swudi_a([t.T for t in ts]).T
        return swudi_a(ts)

    if treatment == "experts":
        theta = torch.stack([theta_2d([t[e] for t in taus]) for e in range(w0.shape[0])])
    elif treatment == "layer":
        theta = theta_2d(taus)
    elif treatment == "method":
        theta = (
            ties(taus, params["density"], params["scale"])
            if method == "ties"
            else task_arithmetic(taus, params["scale"])
        )
    else:
        theta = mean(taus)
    return w0 + alpha * theta
