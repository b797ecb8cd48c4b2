"""Subspace merging methods computed from the per-task SVDs (:class:`~swudi.core.task_svd.TaskSVDs`) of
one 2-D weight, and the Singular Value Calibration post-filter.

Notation: tau_i = U_i diag(s_i) V_i^T (i = 1..N), S = sum_i tau_i, k = min(m, d), and
polar(X) = P Q^T for the thin SVD X = P Sigma Q^T (the nearest matrix with orthonormal columns).
Every function returns theta ``[m, d]`` float32 on the CPU (before the global scale alpha).

- Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025, arXiv 2502.04959): S = U diag(sigma) V^T,
  theta = mean(sigma) U V^T, the mean over all k singular values of S.
- Iso-CTS (same paper, Algorithm 1 and the authors' code): k_c = int(f k), then the task-specific
  budget rounded to a multiple of N, t = round((k - k_c) / N) N, k_c = k - t, p = t / N per task.
  Common subspace: the top k_c singular triplets (U_c, sigma_c, V_c) of S. Per task: the top p
  singular triplets of (I - U_c U_c^T) tau_i. Stack U = [U_c, U_1', ..., U_N'], V likewise, the
  singular values sigma = [sigma_c, sigma_1', ...] (k of them); theta = mean(sigma) polar(U) polar(V)^T.
- TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025, arXiv 2412.00081): per task its top r = floor(k / N) singular triplets; stacked
  U = [U_1[:, :r], ...], s = [s_1[:r], ...], V likewise; theta = polar(U) diag(s) polar(V)^T.
- CART (Choi et al., "Revisiting Weight Averaging for Model Merging", arXiv 2412.12153):
  tau_bar = S / N, theta = tau_bar + prior * (1/N) sum_i SVD_k'(tau_i - tau_bar), SVD_k' the best
  rank-k' approximation, k' = max(1, int(rank_ratio * k)).
- ACE (Xu et al., "ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation",
  CVPR 2026, arXiv 2603.02945): :func:`ace` (its docstring lists every difference from the
  authors' code).
- SVC (Li et al., "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging",
  ICML 2026, arXiv 2602.05536): :func:`svc`.

Singular directions with a zero singular value are left out everywhere (the reference codes take
them from a full SVD, where they are arbitrary orthonormal completions): for task vectors of full
numerical rank, the usual case for fine-tuned weights, the results are the papers'; for low-rank
(LoRA) task vectors they are the well-defined part of them. The SVDs of products P Q^T of thin
factors (the sum, the centred task vectors) are taken in factor space when the inner dimension is
below k (:func:`factor_svd`), so LoRA experts never need an m x d SVD.
"""

from __future__ import annotations

import logging

import torch

from swudi.core.device import resolve_device
from swudi.core.task_svd import TaskSVDs

__all__ = ["ace", "cart", "factor_svd", "iso_c", "iso_cts", "iso_cts_split", "polar", "svc", "tsv_m"]

log = logging.getLogger(__name__)

Device = str | torch.device


def polar(x: torch.Tensor) -> torch.Tensor:
    """polar(X) = P Q^T for the thin SVD X = P Sigma Q^T (orthonormal columns)."""
    if x.shape[1] == 0:
        return x
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def factor_svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U ``[m, j]``, sigma ``[j]``, V ``[d, j]``) of the product P Q^T (P ``[m, R]``, Q ``[d, R]``).

    For R < min(m, d): the thin QRs P = Q_p R_p, Q = Q_q R_q and the SVD of the R x R core
    R_p R_q^T (O((m + d) R^2), no m x d matrix); otherwise the SVD of the formed product.
    """
    m, d, r = int(p.shape[0]), int(q.shape[0]), int(p.shape[1])
    if r >= min(m, d):
        u, s, vh = torch.linalg.svd(p @ q.T, full_matrices=False)
        return u, s, vh.T
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q)
    x, s, yh = torch.linalg.svd(rp @ rq.T)
    return qp @ x, s, qq @ yh.T


def _factors(t: TaskSVDs, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with S = P Q^T: P = [U_i diag(s_i)]_i, Q = [V_i]_i."""
    p = torch.cat([(u * s) for u, s in zip(t.u, t.s, strict=True)], dim=1).to(dev)
    q = torch.cat(t.v, dim=1).to(dev)
    return p, q


_EPS32 = float(torch.finfo(torch.float32).eps)


def _nonzero(s: torch.Tensor, shape: tuple[int, int], scale: float | None = None) -> int:
    """Number of singular values above ``scale`` (default: the largest) x max(m, d) x eps(float32):
    the rest is float32 round-off (the rank rule of :mod:`swudi.core.task_svd`)."""
    top = float(s[0]) if s.numel() else 0.0
    ref = top if scale is None else scale
    if top <= 0 or ref <= 0:
        return 0
    return int((s > ref * max(shape) * _EPS32).sum())


def iso_c(t: TaskSVDs, *, device: Device = "auto") -> torch.Tensor:
    """Iso-C: theta = mean(sigma) U V^T for S = U diag(sigma) V^T, the mean over all k = min(m, d) values."""
    dev = resolve_device(device)
    m, d = t.shape
    u, s, v = factor_svd(*_factors(t, dev))
    j = _nonzero(s, t.shape)
    mean = s[:j].sum() / min(m, d)
    return (mean * (u[:, :j] @ v[:, :j].T)).cpu()


def iso_cts_split(shape: tuple[int, int], num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_c, p): the common subspace size and the task-specific directions per task (module docstring)."""
    k = min(shape)
    k_c = int(k * common_space_fraction)
    task_total = round((k - k_c) / num_tasks) * num_tasks
    k_c = k - task_total
    return k_c, task_total // num_tasks


def iso_cts(t: TaskSVDs, common_space_fraction: float = 0.8, *, device: Device = "auto") -> torch.Tensor:
    """Iso-CTS: the common subspace of S plus each task's top directions orthogonal to it, isotropic."""
    dev = resolve_device(device)
    m, d = t.shape
    k_c, per_task = iso_cts_split(t.shape, t.num_tasks, common_space_fraction)
    u, s, v = factor_svd(*_factors(t, dev))
    k_c = min(k_c, _nonzero(s, t.shape))
    uc = u[:, :k_c]
    us, ss, vs = [uc], [s[:k_c]], [v[:, :k_c]]
    if per_task > 0:
        for ui, si, vi in zip(t.u, t.s, t.v, strict=True):
            p = ui.to(dev) * si.to(dev)
            p = p - uc @ (uc.T @ p)  # (I - U_c U_c^T) tau_i = p V_i^T
            x, sig, yh = torch.linalg.svd(p, full_matrices=False)
            # leave out round-off of tau_i (the part of tau_i inside the common subspace)
            j = min(per_task, _nonzero(sig, t.shape, float(si[0]))) if si.numel() else 0
            us.append(x[:, :j])
            ss.append(sig[:j])
            vs.append(vi.to(dev) @ yh[:j].T)
    sigma = torch.cat(ss).sum() / min(m, d)
    return (sigma * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=1)).T)).cpu()


def tsv_m(t: TaskSVDs, *, device: Device = "auto") -> torch.Tensor:
    """TSV-M: theta = polar(U) diag(s) polar(V)^T over each task's top floor(min(m, d) / N) triplets."""
    dev = resolve_device(device)
    m, d = t.shape
    r = min(m, d) // t.num_tasks
    u = torch.cat([x[:, :r] for x in t.u], dim=1).to(dev)
    s = torch.cat([x[:r] for x in t.s]).to(dev)
    v = torch.cat([x[:, :r] for x in t.v], dim=1).to(dev)
    if s.numel() == 0:
        return torch.zeros((m, d), dtype=torch.float32)
    return ((polar(u) * s) @ polar(v).T).cpu()


def cart(t: TaskSVDs, prior: float = 2.0, rank_ratio: float = 0.12, *, device: Device = "auto") -> torch.Tensor:
    """CART: theta = tau_bar + prior * (1/N) sum_i SVD_k'(tau_i - tau_bar), k' = max(1, int(rank_ratio k)).

    tau_i - tau_bar = sum_j (delta_ij - 1/N) U_j diag(s_j) V_j^T: its SVD is taken in factor space
    (:func:`factor_svd`) when the stacked rank is below min(m, d).

    Unverified against the authors' code (not found): ``prior`` multiplies the *average* over tasks
    of the rank-k' centred task vectors (our reading of the paper: with prior 2 and 8 tasks the
    low-rank part weighs 0.25, task arithmetic's usual range); the defaults prior 2.0 and rank_ratio
    0.12 are those of the reference run cited in issue 22; the paper reports a rank near 8% as best.
    (The CART in the ACE-Merging repository low-ranks the mean of the centred vectors, which is 0,
    so it reduces to the mean: not followed.)
    """
    dev = resolve_device(device)
    m, d = t.shape
    n = t.num_tasks
    k = max(1, int(rank_ratio * min(m, d)))
    p, q = _factors(t, dev)
    mean = (p @ q.T) / n
    low = torch.zeros((m, d), dtype=torch.float32, device=dev)
    bounds = [0]
    for r in t.ranks:
        bounds.append(bounds[-1] + r)
    for i in range(n):
        coeff = torch.full((p.shape[1],), -1.0 / n, dtype=torch.float32, device=dev)
        coeff[bounds[i] : bounds[i + 1]] += 1.0
        u, s, v = factor_svd(p * coeff, q)
        j = min(k, int(s.shape[0]))
        low += (u[:, :j] * s[:j]) @ v[:, :j].T
    return (mean + prior * low / n).cpu()


def ace(
    t: TaskSVDs,
    eps: float = 1e-2,
    k_frac: float = 0.3,
    heterogeneity_threshold: float = 0.3,
    *,
    device: Device = "auto",
) -> torch.Tensor:
    """ACE-Merging, following the authors' published code (github.com/unravel-xu/ACE-Merging,
    ``MergeStrategy.ace_merging``, defaults eps = 1e-2, k_frac = 0.3, threshold 0.3)::

        n_t = ||tau_t||_F^2,  l_t = log(n_t + 1e-12),  gamma = var(l) / (mean(l)^2 + 1e-12)  (unbiased var)
        heterogeneous = gamma > threshold
        W_t = tau_t - 1 mean_rows(tau_t)                 (rows centred: mean over the output index)
        Sigma_t = W_t^T W_t, divided by tr(Sigma_t) + 1e-12 when heterogeneous (eps_t = eps / that trace),
                  else eps_t = eps
        A = sum_t (Sigma_t + eps_t I) + c,   c = column means of sum_t Sigma_t ([1, d], added to every
            row as the code's broadcast does; divided by mean_t n_t + 1e-12 when heterogeneous)
        B = sum_t W_t (Sigma_t + eps_t I)
        theta = B A^{-1}
        if heterogeneous:  F = theta + sum_t tau_t (Sigma_t - (1/T) sum_u (Sigma_u + eps_u I))
                           F = U diag(sigma) V^T, k = int(min(m, d) k_frac)
                           theta += mean(sigma[:k]) U_k V_k^T

    Differences from the authors' code: float32 compute (theirs: the checkpoint dtype); B A^{-1}
    by an LU solve of A^T X = B^T (theirs: an explicit inverse, pinv if it fails; a singular A
    falls back to pinv here too); k is at least 1 (their k = 0 gives a NaN mean); with N = 1 the
    variance is undefined and the layer counts as homogeneous (theirs: NaN > 0.3 is False, the
    same outcome). The collective prior c is the code's row vector of column means, which the
    paper writes as an aggregate covariance; we follow the code (what the reported numbers used).
    ACE needs the d x d covariances, so it works on dense task vectors even for LoRA experts.
    """
    dev = resolve_device(device)
    m, d = t.shape
    n = t.num_tasks
    taus = [t.task(i, dev) for i in range(n)]
    norms = torch.tensor([float(x.double().square().sum()) for x in taus], dtype=torch.float64)
    logs = torch.log(norms + 1e-12)
    gamma = float(torch.var(logs) / (logs.mean().square() + 1e-12)) if n > 1 else 0.0
    hetero = gamma > heterogeneity_threshold
    eye = torch.eye(d, dtype=torch.float32, device=dev)
    sigmas, regs = [], []
    a = torch.zeros((d, d), dtype=torch.float32, device=dev)
    b = torch.zeros((m, d), dtype=torch.float32, device=dev)
    for tau in taus:
        w = tau - tau.mean(dim=0, keepdim=True)
        sig = w.T @ w
        tr = float(sig.diagonal().double().sum()) + 1e-12
        eps_t = eps
        if hetero:
            sig = sig / tr
            eps_t = eps / tr
        reg = sig + eps_t * eye
        sigmas.append(sig)
        regs.append(reg)
        b += w @ reg
        a += reg
    prior = sum(sigmas, torch.zeros((d, d), dtype=torch.float32, device=dev)).mean(dim=0, keepdim=True)
    if hetero:
        prior = prior / (float(norms.mean()) + 1e-12)
    a_full = a + prior
    try:
        theta = torch.linalg.solve(a_full.T, b.T).T
    except torch.linalg.LinAlgError:
        log.warning("weight %r: ACE system is singular; using the pseudo-inverse", t.name)
        theta = b @ torch.linalg.pinv(a_full)
    if hetero:
        sigma_mean = a / n
        fused = theta.clone()
        for tau, sig in zip(taus, sigmas, strict=True):
            fused += tau @ (sig - sigma_mean)
        u, s, vh = torch.linalg.svd(fused, full_matrices=False)
        k = max(1, int(min(m, d) * k_frac))
        theta = theta + s[:k].mean() * (u[:, :k] @ vh[:k])
    return theta.cpu()


def svc(theta: torch.Tensor, t: TaskSVDs, alpha: float = 1.0, *, device: Device = "auto") -> torch.Tensor:
    """Singular Value Calibration of a merged theta (authors' code: github.com/lyymuwu/SVC, ``Align``).

    theta = U diag(sigma) V^T. For each direction r and task i, a_r = u_r^T theta = sigma_r v_r^T
    and a_ri = u_r^T tau_i; s_ri = <a_r, a_ri> / max(||a_ri||^2, 1e-12). Where every s_ri > 0 the
    direction is over-counted by eta_r = max(mean_i s_ri, alpha), else eta_r = 1;
    theta' = U diag(sigma / eta) V^T. ``alpha`` (default 1, the code's) floors eta: with alpha >= 1
    SVC only shrinks. Computed from the factors: u_r^T tau_i = (u_r^T U_i) diag(s_i) V_i^T, so
    <a_r, a_ri> = sigma_r sum_j (U^T U_i)_rj s_ij (V^T V_i)_rj and ||a_ri||^2 = sum_j (U^T U_i)_rj^2 s_ij^2.
    Applied to theta before the global scale (as the code calibrates the merged task vector).
    """
    dev = resolve_device(device)
    th = theta.to(device=dev, dtype=torch.float32)
    u, sigma, vh = torch.linalg.svd(th, full_matrices=False)
    v = vh.T
    ratios = []
    for ui, si, vi in zip(t.u, t.s, t.v, strict=True):
        g = u.T @ ui.to(dev)  # [k, k_i]
        h = v.T @ vi.to(dev)
        s_i = si.to(dev)
        num = sigma * ((g * s_i) * h).sum(dim=1)
        den = ((g * s_i) ** 2).sum(dim=1).clamp(min=1e-12)
        ratios.append(num / den)
    s = torch.stack(ratios, dim=1)  # [k, N]
    eta = torch.where((s > 0).all(dim=1), torch.clamp(s.mean(dim=1), min=alpha), torch.ones_like(sigma))
    return ((u * (sigma / eta)) @ vh).cpu()
