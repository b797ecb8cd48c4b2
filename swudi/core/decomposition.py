"""The expensive, hyperparameter-free part of merging one 2-D weight ("decompose once, filter many").

For stacked task vectors ``tau`` ``[N, m, d]``, with ``w_i = 1 / max(||tau_i||_F^2, 1e-12)``::

    X = stack(sqrt(w_i) tau_i)            [N*m, d]
    C = X^T X = sum_i w_i tau_i^T tau_i   [d, d]  = Q diag(lambda) Q^T
    D = sum_i w_i tau_i tau_i^T tau_i     [m, d]  (only D Q is kept)

Every spectral method (any t, rank ratio, rank rule, init, scale) is computed from a
:class:`Decomposition` alone, for the price of one ``[m, r] x [r, d]`` product.

How it is computed (float32, no ``[N, d, d]`` intermediate): when ``m < d``, C is one GEMM over X
and D Q takes the cheapest of several product orders (``_dq_costs``); when ``m >= d``, D is formed
as sum_i c_i X_i (X_i^T X_i) and the same per-task Grams, summed, give C (no extra GEMM); when
``N*m < d`` the thin SVD of X replaces eigh (``route="auto"``), lambda = sigma^2.

A *factored* decomposition (:mod:`swudi.core.lowrank`, LoRA experts tau_i = B_i A_i) stores every
eigenvector of C's range (r = its rank bound, sum_i r_i) and no ``sum_tv``: S's rows lie in that
range, so S = (S Q) Q^T and nothing of size m x d or d x d is stored.

Directions beyond the stored rank ``r`` are outside the range of C (or were cut by ``max_rank``):
every filter treats them as ``f = 0``, i.e. they keep ``theta0``. Both routes (eigh of C, thin SVD
of X) store the same quantities, so they give the same merged weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swudi.core.device import resolve_device
from swudi.core.task_vectors import ZERO_NORM_SQ, check_task_vectors, is_all_zero, squared_norms
from swudi.errors import ConfigError, InputError

__all__ = [
    "EIGENVALUE_FLOOR",
    "DECOMPOSITION_FORMAT",
    "DECOMPOSITION_FORMAT_VERSION",
    "ROUTES",
    "Decomposition",
    "decompose",
    "init_coefficient",
]

logger = logging.getLogger(__name__)

#: Eigenvalues of C are floored here (protects 1/lambda; reference value).
EIGENVALUE_FLOOR = 1e-8
DECOMPOSITION_FORMAT = "swudi.decomposition"
DECOMPOSITION_FORMAT_VERSION = "1"
ROUTES = ("auto", "eigh", "svd")
INIT_MODES = ("sum", "mean", "zero")
_TENSOR_FIELDS = ("eigenvalues", "eigenvectors", "sum_tv", "sum_q", "dq")
_FACTORED_FIELDS = ("eigenvalues", "eigenvectors", "sum_q", "dq")


def init_coefficient(init: str, num_tasks: int) -> float:
    """theta0 = c * sum_i tau_i with c = 1 ("sum"), 1/N ("mean") or 0 ("zero")."""
    if init == "sum":
        return 1.0
    if init == "mean":
        return 1.0 / num_tasks
    if init == "zero":
        return 0.0
    raise ConfigError(f"unknown init {init!r}; valid: {', '.join(INIT_MODES)}")


@dataclass(eq=False)
class Decomposition:
    """Cached spectral pieces of one 2-D weight (all tensors float32 on the CPU).

    Fields (``m, d`` = out, in; ``r`` = stored rank <= min(d, N*m, max_rank)):

    - ``eigenvalues`` ``[d]``: all eigenvalues of C, descending, floored at 1e-8
      (SVD route: sigma^2 padded with the floor). They sum to the number of non-zero tasks.
    - ``eigenvectors`` ``[d, r]``: Q, the top r eigenvectors (sign fixed: largest entry positive).
    - ``sum_tv`` ``[m, d]``: S = sum_i tau_i (None when ``factored``: then S = (S Q) Q^T).
      ``sum_q`` ``[m, r]``: S Q.  ``dq`` ``[m, r]``: D Q.
    - ``objective_const``: sum_i w_i ||tau_i tau_i^T||_F^2, so that
      L(theta) = tr(theta C theta^T) - 2 <theta, D> + const.
    - ``num_tasks`` N, ``all_zero`` (every task vector near zero: methods return the mean),
      ``dtype`` of the input task vectors, ``name`` of the weight, ``route`` ("eigh", "svd",
      "factors", "none").
    - ``factored``: Q spans the whole range of C (its rank is at most r) and S lies in it, so
      ``sum_tv`` is not stored (built from low-rank factors, :func:`swudi.core.lowrank.decompose_factors`).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    sum_tv: torch.Tensor | None
    sum_q: torch.Tensor
    dq: torch.Tensor
    objective_const: float
    num_tasks: int
    all_zero: bool
    dtype: torch.dtype = torch.float32
    name: str = ""
    route: str = "eigh"
    factored: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(m, d) = (out, in) of the weight."""
        return (int(self.sum_q.shape[0]), int(self.eigenvalues.shape[0]))

    @property
    def rank(self) -> int:
        """Number of stored eigenvectors r."""
        return int(self.eigenvectors.shape[1])

    @property
    def full_rank(self) -> int:
        """The most eigenvectors C can have with a non-zero eigenvalue: min(d, N*m), or the stored
        rank of a factored decomposition (which holds C's whole range)."""
        m, d = self.shape
        if self.all_zero:
            return 0
        return self.rank if self.factored else min(d, self.num_tasks * m)

    def sum_of_task_vectors(self) -> torch.Tensor:
        """S = sum_i tau_i ``[m, d]`` (formed as (S Q) Q^T for a factored decomposition)."""
        if self.sum_tv is not None:
            return self.sum_tv
        return self.sum_q @ self.eigenvectors.T

    def theta0(self, init: str = "sum") -> torch.Tensor:
        """The initial point c * S for ``init`` in {"sum", "mean", "zero"}."""
        return self.sum_of_task_vectors() * init_coefficient(init, self.num_tasks)

    def objective(self, theta: torch.Tensor, *, device: str | torch.device = "auto") -> float:
        """WUDI loss L(theta) = sum_i w_i ||(theta - tau_i) tau_i^T||_F^2 from the stored pieces.

        Computed as sum_k lambda_k ||theta q_k||^2 - 2 <theta Q, D Q> + const (D's rows lie in the
        range of C). Exact when r = full_rank; with a ``max_rank`` cut the discarded directions are
        left out. theta Q runs in float32 on ``device``, the sums in float64.
        """
        m, d = self.shape
        if tuple(theta.shape) != (m, d):
            raise InputError(f"weight {self.name!r}: theta has shape {tuple(theta.shape)}, expected {(m, d)}")
        if self.all_zero or self.rank == 0:
            return float(self.objective_const)  # C = 0 and D = 0 on every direction we know of
        dev = resolve_device(device)
        return self.objective_of_projection(theta.to(device=dev, dtype=torch.float32) @ self.eigenvectors.to(dev))

    def objective_of_projection(self, theta_q: torch.Tensor) -> float:
        """L(theta) from theta Q ``[m, r]`` alone: sum_k lambda_k ||theta q_k||^2 - 2 <theta Q, D Q> + const.

        Costs O(m r): the diagnostics of a filtered merge need no product with a full weight.
        """
        m, _ = self.shape
        if tuple(theta_q.shape) != (m, self.rank):
            raise InputError(
                f"weight {self.name!r}: theta Q has shape {tuple(theta_q.shape)}, expected {(m, self.rank)}"
            )
        if self.all_zero or self.rank == 0:
            return float(self.objective_const)
        tq = theta_q.double()
        lam = self.eigenvalues[: self.rank].to(tq.device).double()
        quad = (tq.square().sum(dim=0) * lam).sum()
        lin = (tq * self.dq.to(tq.device).double()).sum()
        return float((quad - 2.0 * lin).item() + self.objective_const)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for a safetensors file: contiguous CPU tensors and str metadata."""
        fields = _FACTORED_FIELDS if self.factored else _TENSOR_FIELDS
        tensors = {k: getattr(self, k).detach().to("cpu").contiguous() for k in fields}
        m, d = self.shape
        metadata = {
            "format": DECOMPOSITION_FORMAT,
            "format_version": DECOMPOSITION_FORMAT_VERSION,
            "name": self.name,
            "shape": f"{m},{d}",
            "num_tasks": str(self.num_tasks),
            "all_zero": "true" if self.all_zero else "false",
            "objective_const": repr(float(self.objective_const)),
            "dtype": str(self.dtype).removeprefix("torch."),
            "route": self.route,
            "factored": "true" if self.factored else "false",
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Decomposition:
        """Inverse of :meth:`to_tensors`; validates the format and every shape."""
        meta = dict(metadata or {})
        what = f"decomposition {meta.get('name', '')!r}"
        if meta.get("format") != DECOMPOSITION_FORMAT:
            raise InputError(f"{what}: metadata 'format' is {meta.get('format')!r}, expected {DECOMPOSITION_FORMAT!r}")
        if meta.get("format_version") != DECOMPOSITION_FORMAT_VERSION:
            raise InputError(
                f"{what}: format_version {meta.get('format_version')!r} is not supported "
                f"(this swudi reads {DECOMPOSITION_FORMAT_VERSION!r}); recompute the decomposition"
            )
        factored = meta.get("factored", "false") == "true"
        fields = _FACTORED_FIELDS if factored else _TENSOR_FIELDS
        missing = [k for k in fields if k not in tensors]
        missing += [k for k in ("shape", "num_tasks", "all_zero", "objective_const", "dtype") if k not in meta]
        if missing:
            raise InputError(f"{what}: missing entries {missing}")
        try:
            m, d = (int(v) for v in meta["shape"].split(","))
            num_tasks = int(meta["num_tasks"])
            objective_const = float(meta["objective_const"])
        except ValueError as exc:
            raise InputError(f"{what}: unreadable metadata ({exc})") from exc
        dtype = getattr(torch, meta["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"{what}: unknown dtype {meta['dtype']!r}")
        if meta["all_zero"] not in ("true", "false"):
            raise InputError(f"{what}: all_zero must be 'true' or 'false', got {meta['all_zero']!r}")
        t = {k: tensors[k] for k in fields}
        r = t["eigenvectors"].shape[1] if t["eigenvectors"].ndim == 2 else -1
        expected = {
            "eigenvalues": (d,),
            "eigenvectors": (d, r),
            "sum_tv": (m, d),
            "sum_q": (m, r),
            "dq": (m, r),
        }
        for k, shape in expected.items():
            if k not in t:
                continue
            if tuple(t[k].shape) != shape or r < 0:
                raise InputError(f"{what}: tensor {k!r} has shape {tuple(t[k].shape)}, expected {shape}")
            if t[k].dtype != torch.float32:
                raise InputError(f"{what}: tensor {k!r} has dtype {t[k].dtype}, expected float32")
        if num_tasks < 1 or r > min(d, num_tasks * m):
            raise InputError(f"{what}: inconsistent num_tasks={num_tasks} / rank={r} for shape {(m, d)}")
        return cls(
            eigenvalues=t["eigenvalues"],
            eigenvectors=t["eigenvectors"],
            sum_tv=t.get("sum_tv"),
            sum_q=t["sum_q"],
            dq=t["dq"],
            objective_const=objective_const,
            num_tasks=num_tasks,
            all_zero=meta["all_zero"] == "true",
            dtype=dtype,
            name=meta.get("name", ""),
            route=meta.get("route", "eigh"),
            factored=factored,
        )


def decompose(
    task_vectors: torch.Tensor,
    *,
    name: str = "",
    max_rank: int | None = None,
    device: str | torch.device = "auto",
    route: str = "auto",
) -> Decomposition:
    """Decompose the WUDI quadratic of one 2-D weight (see the module docstring).

    ``task_vectors``: ``[N, m, d]`` (or a sequence of ``[m, d]`` tensors). ``route``: "eigh"
    (eigendecomposition of C), "svd" (thin SVD of X, cheaper when N*m < d) or "auto" (SVD when
    N*m < d). ``max_rank`` caps the stored eigenvectors (filters then keep theta0 beyond it).
    Computes in float32 on ``device``; the result lives on the CPU.
    """
    return _decompose(task_vectors, name=name, max_rank=max_rank, device=device, route=route)


def _decompose(
    task_vectors: torch.Tensor,
    *,
    name: str = "",
    max_rank: int | None = None,
    device: str | torch.device = "auto",
    route: str = "auto",
    rank_fn: Callable[[torch.Tensor], int] | None = None,
    checked: bool = False,
) -> Decomposition:
    """:func:`decompose`, with ``rank_fn(eigenvalues) -> r`` to store only what a known filter needs."""
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 0):
        raise ConfigError(f"max_rank must be a non-negative integer or None, got {max_rank!r}")
    tv = task_vectors if checked else check_task_vectors(task_vectors, name, ndim=3)
    dev = resolve_device(device)
    n_tasks, m, d = (int(s) for s in tv.shape)
    in_dtype = tv.dtype

    x = tv.to(device=dev, dtype=torch.float32)
    owns_x = x.data_ptr() != tv.data_ptr()
    sq = squared_norms(x)
    sum_tv = x.sum(dim=0)
    if m == 0 or d == 0 or is_all_zero(sq):
        logger.debug("weight %r: all task vectors are (near) zero; methods fall back to the mean", name)
        return Decomposition(
            eigenvalues=torch.full((d,), EIGENVALUE_FLOOR, dtype=torch.float32),
            eigenvectors=torch.zeros((d, 0), dtype=torch.float32),
            sum_tv=sum_tv.cpu(),
            sum_q=torch.zeros((m, 0), dtype=torch.float32),
            dq=torch.zeros((m, 0), dtype=torch.float32),
            objective_const=0.0,
            num_tasks=n_tasks,
            all_zero=True,
            dtype=in_dtype,
            name=name,
            route="none",
        )

    # X_i = tau_i / c_i with c_i = 1/sqrt(w_i); then w_i tau_i tau_i^T tau_i = c_i X_i X_i^T X_i.
    c = sq.clamp(min=ZERO_NORM_SQ).sqrt()
    c32 = c.to(torch.float32)
    inv_c = (1.0 / c).to(torch.float32)
    full_rank = min(d, n_tasks * m)
    chosen = "svd" if route == "svd" or (route == "auto" and n_tasks * m < d) else "eigh"

    u_sigma = None
    d_full = None
    xs = None
    if chosen == "eigh" and m >= d:
        # D needs each task's Gram X_i^T X_i anyway (the cheaper order when m >= d): summing them
        # gives C for free, one task at a time, and no scaled copy of all task vectors is needed.
        gram, d_full, const = _fused_c_d(x, inv_c, c32)
    else:
        xs = x.mul_(inv_c.view(n_tasks, 1, 1)) if owns_x else x * inv_c.view(n_tasks, 1, 1)
        flat = xs.reshape(n_tasks * m, d)
    del x
    if chosen == "eigh":
        if d_full is None:
            gram = flat.T @ flat  # C: one GEMM, [d, d]
        evals_asc, evecs_asc = _eigh(gram, name)
        del gram
        evals = evals_asc.flip(0)[:full_rank]
    else:
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        evals = s.square()
        u_sigma = u.mul_(s)  # X Q = U Sigma, [N*m, full_rank]
        del u

    eigenvalues = torch.full((d,), EIGENVALUE_FLOOR, dtype=torch.float32, device=dev)
    eigenvalues[:full_rank] = evals.clamp(min=EIGENVALUE_FLOOR)
    eigenvalues = eigenvalues.cpu()

    r = full_rank if max_rank is None else min(full_rank, max_rank)
    if rank_fn is not None:
        r = min(r, int(rank_fn(eigenvalues)))
    # Q: the top r eigenvectors, largest first, copied once
    if chosen == "eigh":
        q = evecs_asc[:, d - r :].flip(1).contiguous()
        del evecs_asc
    else:
        q = vh[:r].T.contiguous()
        del vh
    signs = _sign_fix(q)
    q.mul_(signs)
    if d_full is not None:
        dq = d_full @ q
    else:
        assert xs is not None  # the scaled task vectors exist whenever D was not fused with C
        if u_sigma is not None:
            u_sigma[:, :r].mul_(signs)  # keep X Q = U Sigma consistent with the sign-fixed Q
        dq, const = _dq_and_const(xs, c32, q, u_sigma=u_sigma)
    sum_q = sum_tv @ q
    return Decomposition(
        eigenvalues=eigenvalues,
        eigenvectors=q.cpu(),
        sum_tv=sum_tv.cpu(),
        sum_q=sum_q.cpu(),
        dq=dq.cpu(),
        objective_const=const,
        num_tasks=n_tasks,
        all_zero=False,
        dtype=in_dtype,
        name=name,
        route=chosen,
    )


def _eigh(gram: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs of a symmetric matrix, ascending (float64 retry if float32 fails)."""
    try:
        return torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        logger.warning("weight %r: float32 eigh did not converge; retrying in float64", name)
        evals, evecs = torch.linalg.eigh(gram.double())
        return evals.float(), evecs.float()


def _sign_fix(vectors: torch.Tensor) -> torch.Tensor:
    """Signs that make the largest-magnitude entry of each column positive (reproducible Q)."""
    if vectors.shape[1] == 0:
        return torch.ones(0, dtype=vectors.dtype, device=vectors.device)
    idx = vectors.abs().argmax(dim=0)
    picked = vectors.gather(0, idx.view(1, -1)).flatten()
    return torch.where(picked < 0, -1.0, 1.0).to(vectors.dtype)


def _fused_c_d(x: torch.Tensor, inv_c: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """C = sum_i X_i^T X_i, D = sum_i c_i X_i (X_i^T X_i) and the objective constant in one pass.

    ``x`` holds the unscaled task vectors; X_i = x_i / c_i is formed one task at a time.
    """
    n, m, d = x.shape
    gram_c = torch.zeros((d, d), dtype=torch.float32, device=x.device)
    d_full = torch.zeros((m, d), dtype=torch.float32, device=x.device)
    const = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(n):
        xi, ci = x[i] * inv_c[i], float(c[i])
        h = xi.T @ xi
        gram_c.add_(h)
        d_full.addmm_(xi, h, alpha=ci)
        const += ci * ci * torch.linalg.vector_norm(h).double().square()
    return gram_c, d_full, float(const.item())


def _dq_costs(n: int, m: int, d: int, r: int, full_rank: int, svd: bool) -> dict[str, float]:
    """Multiply-add counts of the ways to get D Q and the objective constant."""
    g = m * d * min(m, d)  # the smaller Gram matrix of one task (also gives the constant)
    costs = {
        "chain": n * (3.0 * m * d * r + g),  # X (X^T (X Q)), constant from the Gram matrix
        "gram_left": n * (m * m * d + m * d * r + m * m * r),  # (X X^T) (X Q)
        "gram_right": n * (m * d * d + d * d * r + m * d * r),  # X ((X^T X) Q)
        "full_d": n * 2.0 * g + m * d * r,  # D in full ([m, d], cheaper order per task), then D Q
    }
    if svd:
        costs["svd_factors"] = n * 2.0 * m * full_rank * full_rank  # P_i (P_i^T P_i), P = U Sigma
    return costs


def _dq_and_const(
    xs: torch.Tensor, c: torch.Tensor, q: torch.Tensor, *, u_sigma: torch.Tensor | None
) -> tuple[torch.Tensor, float]:
    """D Q = sum_i c_i X_i X_i^T X_i Q and const = sum_i c_i^2 ||X_i X_i^T||_F^2, cheapest order.

    One task at a time: no [N, d, d] (or [N, m, m]) intermediate is ever formed.
    """
    n, m, d = xs.shape
    r = q.shape[1]
    full_rank = min(d, n * m)
    costs = _dq_costs(n, m, d, r, full_rank, u_sigma is not None)
    order = min(costs, key=costs.__getitem__)
    return _dq_with_order(xs, c, q, order, u_sigma=u_sigma)


def _dq_with_order(
    xs: torch.Tensor, c: torch.Tensor, q: torch.Tensor, order: str, *, u_sigma: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    n, m, d = xs.shape
    r = q.shape[1]
    dev = xs.device
    const = torch.zeros((), dtype=torch.float64, device=dev)
    if order == "svd_factors":
        if u_sigma is None:
            raise ValueError("svd_factors needs the SVD factors")
        p = u_sigma.reshape(n, m, -1)
        dq_full = torch.zeros((m, p.shape[2]), dtype=torch.float32, device=dev)
        for i in range(n):
            pp = p[i].T @ p[i]  # = V^T X_i^T X_i V, same Frobenius norm as X_i^T X_i
            dq_full.addmm_(p[i], pp, alpha=float(c[i]))
            const += float(c[i]) ** 2 * torch.linalg.vector_norm(pp).double().square()
        return dq_full[:, :r].contiguous(), float(const.item())
    dq = torch.zeros((m, r), dtype=torch.float32, device=dev)
    d_full = torch.zeros((m, d), dtype=torch.float32, device=dev) if order == "full_d" else None
    for i in range(n):
        xi, ci = xs[i], float(c[i])
        if order == "gram_left":
            gram = xi @ xi.T
            dq.addmm_(gram, xi @ q, alpha=ci)
        elif order == "gram_right":
            gram = xi.T @ xi
            dq.addmm_(xi, gram @ q, alpha=ci)
        elif order == "chain":
            dq.addmm_(xi, xi.T @ (xi @ q), alpha=ci)
            gram = xi @ xi.T if m <= d else xi.T @ xi
        elif order == "full_d":
            assert d_full is not None
            if m <= d:
                gram = xi @ xi.T
                d_full.addmm_(gram, xi, alpha=ci)
            else:
                gram = xi.T @ xi
                d_full.addmm_(xi, gram, alpha=ci)
        else:
            raise ValueError(f"unknown order {order!r}")
        const += ci * ci * torch.linalg.vector_norm(gram).double().square()
    if d_full is not None:
        dq = d_full @ q
    return dq, float(const.item())
