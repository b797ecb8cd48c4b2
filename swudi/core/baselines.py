"""Baseline merges on stacked task vectors ``[N, ...]`` (float32 compute on the input's device).

- task arithmetic: theta = scale * sum_i tau_i
- mean: theta = (1/N) sum_i tau_i
- TIES: trim, elect sign, disjoint mean, scale
- WUDI: Adam on L(theta) = sum_i w_i ||(theta - tau_i) tau_i^T||_F^2 from theta = sum_i tau_i
- OptMerge: WUDI on per-task rank-K truncations, K = floor(min(m, d) / N)
"""

from __future__ import annotations

import logging

import torch

from swudi.core.task_vectors import ZERO_NORM_SQ, is_all_zero, squared_norms
from swudi.errors import InputError

__all__ = ["task_arithmetic", "mean", "ties", "wudi", "wudi_loss", "optmerge", "optmerge_rank"]

logger = logging.getLogger(__name__)


def task_arithmetic(task_vectors: torch.Tensor, scale: float = 0.3) -> torch.Tensor:
    """theta = scale * sum_i tau_i."""
    return task_vectors.to(torch.float32).sum(dim=0) * float(scale)


def mean(task_vectors: torch.Tensor) -> torch.Tensor:
    """theta = (1/N) sum_i tau_i."""
    return task_vectors.to(torch.float32).sum(dim=0) / task_vectors.shape[0]


def ties(
    task_vectors: torch.Tensor,
    density: float = 0.2,
    scale: float = 1.0,
    *,
    trim: str = "exact_k",
    zero_sign: str = "zero",
    empty_trim: str = "keep_one",
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023), with its three conventions as options.

    1. Trim: per task keep the k = floor(density * numel) entries of largest magnitude, zero the rest.
       ``trim="exact_k"``: exactly k, entries tied at the threshold taken in index order (mergekit
       also keeps exactly k); ``"keep_tied"``: every entry tied with the k-th largest is kept too
       (can keep far more than k on bf16 weights, where equal magnitudes are common).
       k = 0 for a density > 0 (a small tensor): ``empty_trim="keep_one"`` keeps the largest entry,
       ``"base"`` leaves the tensor at the base (theta = 0), ``"error"`` raises :class:`InputError`
       (mergekit refuses too). Density 0 is theta = 0; density >= 1 trims nothing.
    2. Elect: sign of the sum of the trimmed task vectors, per entry. Where the sum is exactly 0,
       ``zero_sign="zero"`` (the paper's sgn) elects nothing and theta is 0 there; ``"positive"``
       elects + (mergekit).
    3. Disjoint mean: average the non-zero trimmed entries whose sign agrees with the elected one.
    4. theta = scale * that mean.
    """
    tv = task_vectors.to(torch.float32)
    n = tv.shape[0]
    flat = tv.reshape(n, -1)
    numel = flat.shape[1]
    zero = torch.zeros(tv.shape[1:], dtype=torch.float32, device=tv.device)
    if numel == 0 or float(density) <= 0.0:
        return zero
    k = numel if float(density) >= 1.0 else int(float(density) * numel)
    if k == 0:
        if empty_trim == "error":
            raise InputError(
                f"TIES: density {density} keeps no entry of a tensor of {numel} entries; raise the density "
                "or set params.empty_trim to keep_one or base"
            )
        if empty_trim == "base":
            return zero
        k = 1
    trimmed = flat if k >= numel else _trim(flat, k, trim)
    total = trimmed.sum(dim=0)
    elected = torch.sign(total)
    if zero_sign == "positive":
        elected = torch.where(total == 0, torch.ones_like(elected), elected)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    selected = torch.where(agree, trimmed, torch.zeros((), dtype=flat.dtype, device=flat.device))
    counts = agree.sum(dim=0).clamp(min=1)
    merged = selected.sum(dim=0) / counts
    return (merged * float(scale)).reshape(tv.shape[1:])


def _trim(flat: torch.Tensor, k: int, trim: str) -> torch.Tensor:
    """Each row of ``flat`` with all but its top-``k`` magnitudes zeroed (:func:`ties`' ``trim``).

    With t_i the k-th largest magnitude of row i: ``"keep_tied"`` keeps |x| >= t_i; ``"exact_k"``
    keeps |x| > t_i and then the lowest-indexed entries with |x| = t_i until k are kept (what a
    stable descending sort's first k are, found by selection in O(numel) per row, one row at a time,
    instead of sorting).
    """
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    if trim == "keep_tied":
        mag = flat.abs()
        threshold = mag.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # k-th largest
        return torch.where(mag >= threshold, flat, zero)
    out = torch.empty_like(flat)
    for row, kept in zip(flat, out, strict=True):
        mag = row.abs()
        threshold = mag.kthvalue(row.shape[0] - k + 1).values  # k-th largest
        keep = mag > threshold
        room = k - int(keep.sum())
        keep[torch.nonzero(mag == threshold).flatten()[:room]] = True  # nonzero: in index order
        torch.where(keep, row, zero, out=kept)
    return out


def _wudi_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """w_i = 1 / max(||tau_i||^2, 1e-12) as float32 (a zero task contributes nothing)."""
    return (1.0 / squared_norms(task_vectors).clamp(min=ZERO_NORM_SQ)).to(torch.float32)


def wudi_loss(theta: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """L(theta) = sum_i w_i ||(theta - tau_i) tau_i^T||_F^2, w_i = 1 / ||tau_i||_F^2 (float32)."""
    tv = task_vectors.to(torch.float32)
    return _projected_loss(theta, tv, tv, _wudi_weights(tv))


def _projected_loss(
    theta: torch.Tensor, targets: torch.Tensor, projectors: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_i w_i ||(theta - target_i) projector_i^T||_F^2 (the reference's batched form)."""
    inner = torch.matmul(theta.unsqueeze(0) - targets, projectors.transpose(1, 2))
    return (inner.square().sum(dim=(1, 2)) * weights).sum()


def projected_loss_grad_terms(
    targets: torch.Tensor, projectors: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, B)`` with C = sum_i w_i P_i^T P_i ``[d, d]`` and B = sum_i w_i T_i P_i^T P_i ``[m, d]``.

    The projected loss L(theta) = sum_i w_i ||(theta - T_i) P_i^T||_F^2 has the gradient
    dL/dtheta = 2 sum_i w_i (theta - T_i) P_i^T P_i = 2 (theta C - B), so with C and B formed once
    a gradient costs one ``[m, d] x [d, d]`` product instead of 2 N products of ``~ m k d``.
    """
    d = projectors.shape[-1]
    c = projectors.new_zeros((d, d))
    b = targets.new_zeros((targets.shape[1], d))
    for target, projector, weight in zip(targets, projectors, weights.tolist(), strict=True):
        gram = projector.T @ projector  # [d, d]: one expert's P_i^T P_i at a time, never N of them
        c.add_(gram, alpha=weight)
        b.add_(target @ gram, alpha=weight)
    return c, b


def _adam(
    theta0: torch.Tensor,
    targets: torch.Tensor,
    projectors: torch.Tensor,
    weights: torch.Tensor,
    iterations: int,
    lr: float,
) -> torch.Tensor:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay) on the projected loss, with its exact
    gradient in closed form, 2 (theta C - B) (:func:`projected_loss_grad_terms`), instead of autograd
    through the N products of every step (same iterates up to float32 rounding)."""
    c, b = projected_loss_grad_terms(targets, projectors, weights)
    theta = torch.nn.Parameter(theta0.clone())
    optimizer = torch.optim.Adam([theta], lr=float(lr))
    for _ in range(int(iterations)):
        theta.grad = 2.0 * (torch.matmul(theta.detach(), c) - b)
        optimizer.step()
    return theta.detach()


def wudi(task_vectors: torch.Tensor, iterations: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """Iterative WUDI (the reference baseline): Adam on L from theta0 = sum_i tau_i, float32.

    Task vectors ``[N, m, d]``. The published code evaluates the loss with autograd every step
    (cost ~ 2 N m^2 d per step); here the gradient 2 (theta C - B) uses C = sum_i w_i tau_i^T tau_i
    and B = sum_i w_i tau_i tau_i^T tau_i formed once (cost ~ m d^2 per step, N m d^2 once).
    All-zero task vectors return the mean.
    """
    tv = task_vectors.to(torch.float32)
    if tv.ndim != 3:
        raise InputError(f"wudi needs stacked task vectors [N, out, in], got shape {tuple(tv.shape)}")
    if is_all_zero(squared_norms(tv)):
        return mean(tv)
    return _adam(tv.sum(dim=0), tv, tv, _wudi_weights(tv), iterations, lr)


def optmerge_rank(shape: tuple[int, int], num_tasks: int) -> int:
    """K = max(1, floor(min(m, d) / N))."""
    return max(1, min(shape) // num_tasks)


def optmerge(
    task_vectors: torch.Tensor, iterations: int = 300, lr: float = 1e-5, rank: int | None = None
) -> torch.Tensor:
    """OptMerge: WUDI with each task vector replaced in the loss by rank-K truncations.

    Following the public reference: with mu = mean_i tau_i and K = ``rank`` or floor(min(m,d)/N),
    the loss is sum_i w_i ||(theta - T_i) P_i^T||_F^2 where P_i = [tau_i]_K (top-K SVD truncation,
    the projector), T_i = mu + [tau_i - mu]_K (the target), w_i = 1/||tau_i||_F^2, minimised with
    Adam from theta0 = sum_i tau_i. With K = min(m, d) this is exactly WUDI.
    """
    tv = task_vectors.to(torch.float32)
    if tv.ndim != 3:
        raise InputError(f"optmerge needs stacked task vectors [N, out, in], got shape {tuple(tv.shape)}")
    n, m, d = tv.shape
    if is_all_zero(squared_norms(tv)):
        return mean(tv)
    k = optmerge_rank((m, d), n) if rank is None else int(rank)
    k = max(1, min(k, min(m, d)))
    avg = tv.mean(dim=0)
    projectors = torch.empty((n, k, d), dtype=torch.float32, device=tv.device)
    targets = torch.empty_like(tv)
    for i in range(n):
        _, s, vh = torch.linalg.svd(tv[i], full_matrices=False)
        # ||A [tau]_K^T|| = ||A V_K S_K||: the [K, d] factor S_K V_K^T is an equivalent projector.
        projectors[i] = s[:k, None] * vh[:k]
        u_r, s_r, vh_r = torch.linalg.svd(tv[i] - avg, full_matrices=False)
        targets[i] = avg + (u_r[:, :k] * s_r[:k]) @ vh_r[:k]
    return _adam(tv.sum(dim=0), targets, projectors, _wudi_weights(tv), iterations, lr)
