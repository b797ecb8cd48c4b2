"""The merge methods (one declaration each) and the merge entry points.

Kinds (:class:`~swudi.methods.registry.MethodSpec`):

- ``"spectral"``: computed from a :class:`~swudi.core.decomposition.Decomposition` by a filter
  (``swudi_a``, ``swudi``, ``swudi_soft``, ``pinv``): decompose once, filter many.
- ``"iterative"``: needs the task vectors themselves (``wudi``, ``optmerge``).
- ``"elementwise"``: any tensor shape (``task_arithmetic``, ``ties``, ``mean``); those that only
  depend on the sum of the task vectors declare ``from_sum`` and also merge from a decomposition.
- ``"subspace"``: computed from the per-task SVDs of a 2-D weight (:mod:`swudi.core.task_svd`,
  maths in :mod:`swudi.core.subspace`): ``iso_c``, ``iso_cts``, ``tsv_m``, ``cart``, ``ace``.

Post-filters (``svc``) transform the merged theta of every 2-D weight after any method, from the
same per-task SVDs: :func:`apply_post_filter`, config ``post`` / ``post_params``.

Spectral and iterative methods apply to 2-D weights only; other tensors get the mean
(:func:`merge_elementwise`).

Adding a method is one declaration: a parameter model (a :class:`MethodParams` subclass, every
field with a default) and a decorated function. :func:`merge_matrix`, :func:`merge_decomposition`,
:func:`~swudi.core.state_dict.merge_state_dicts`, the config validation, ``swudi plan``,
``swudi methods``, the ``--method`` help and the README table all read the registry::

    from swudi.methods import MethodParams, spectral_method
    from swudi.core.spectral import truncation_filter

    class TopKParams(MethodParams):
        k: int = 8

    @spectral_method("top_k", TopKParams, "hard truncation at a fixed rank k")
    def top_k(eigenvalues, shape, p):          # f_k per eigenvalue (descending), length d
        return truncation_filter(eigenvalues, min(p.k, eigenvalues.shape[0]))

``@iterative_method(name, Params, description)`` decorates ``merge(task_vectors [N, m, d], params)``
and ``@elementwise_method(name, Params, description, from_sum=...)`` decorates
``merge(task_vectors [N, ...], params)``; both return theta (float32, shape ``[m, d]`` / ``[...]``).
:func:`~swudi.methods.registry.register_method` takes a ready :class:`MethodSpec`; ``replace=True``
overrides a name; :func:`~swudi.methods.registry.registered_method` registers for a ``with`` block.

Methods in your own module: registration happens when the module is imported, so import it
before the merge (``import mypkg.merge_methods`` in the script that calls ``run_merge`` or
``merge_state_dicts``). For the ``swudi`` command line and for worker processes (a Dask task
runner), name the module in ``SWUDI_METHOD_MODULES=mypkg.merge_methods`` (comma-separated):
:func:`get_method` imports those modules before looking a name up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from swudi.core import baselines, subspace
from swudi.core.decomposition import Decomposition, _decompose
from swudi.core.device import resolve_device
from swudi.core.rank import check_rank_rule, rank_ceil, select_rank
from swudi.core.spectral import apply_filter, exponential_filter, pinv_filter, truncation_filter
from swudi.core.task_svd import TaskSVDs, task_svds
from swudi.core.task_vectors import check_task_vectors, is_all_zero, squared_norms
from swudi.errors import ConfigError
from swudi.methods.registry import (
    METHODS,
    MethodKind,
    MethodParams,
    MethodSpec,
    Shape,
    elementwise_method,
    get_post_filter,
    import_method_modules,
    iterative_method,
    method_choices,
    methods_markdown,
    post_filter,
    register_method,
    registered_method,
    spectral_method,
    subspace_method,
    unregister_method,
)

__all__ = [
    "MethodKind",
    "MethodParams",
    "MethodSpec",
    "METHODS",
    "apply_post_filter",
    "elementwise_method",
    "get_method",
    "merge_task_svds",
    "iterative_method",
    "merge_decomposition",
    "merge_elementwise",
    "merge_matrix",
    "method_choices",
    "methods_markdown",
    "register_method",
    "registered_method",
    "spectral_filter",
    "spectral_method",
    "unregister_method",
    "validate_params",
    "validate_post_params",
]

logger = logging.getLogger(__name__)


InitMode = Literal["sum", "mean", "zero"]

_SWUDI_SOURCE = "Closed-Form Spectral Regularization for Multi-Task Model Merging, 2026, arXiv 2606.07289"
_WUDI_SOURCE = "Cheng et al., Whoever Started the Interference Should End It (WUDI), ICML 2025, arXiv 2503.08099"


# --------------------------------------------------------------------------- spectral methods
class SwudiAParams(MethodParams):
    """Hard truncation at a rank chosen per weight by ``rank_rule``; optional exponential filter t."""

    rank_rule: str = "participation_sqrt"
    min_rank: int = Field(1, ge=0)
    max_rank_ratio: float = Field(1.0, gt=0.0, le=1.0)
    t: float | None = Field(None, ge=0.0)
    init: InitMode = "sum"

    @field_validator("rank_rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        check_rank_rule(value)
        return value


@spectral_method("swudi_a", SwudiAParams, "hard truncation at a per-weight adaptive rank", source=_SWUDI_SOURCE)
def _filter_swudi_a(lam: torch.Tensor, shape: Shape, p: SwudiAParams) -> torch.Tensor:
    """f = 1 on the top K = rank_rule(lambda) directions (times 1 - exp(-t lambda) if t is set)."""
    k = select_rank(lam, p.rank_rule, shape, min_rank=p.min_rank, max_rank_ratio=p.max_rank_ratio)
    f = truncation_filter(lam, k)
    return f if p.t is None else f * exponential_filter(lam, p.t)


class SwudiParams(MethodParams):
    """Exponential filter on the top K = ceil(rank_ratio * d) eigendirections, 0 elsewhere."""

    t: float = Field(1300.0, ge=0.0)
    rank_ratio: float = Field(0.65, gt=0.0, le=1.0)
    init: InitMode = "sum"


@spectral_method(
    "swudi", SwudiParams, "exponential filter on the top ceil(rank_ratio d) directions", source=_SWUDI_SOURCE
)
def _filter_swudi(lam: torch.Tensor, shape: Shape, p: SwudiParams) -> torch.Tensor:
    """f_k = 1 - exp(-t lambda_k) for k < K = ceil(rank_ratio d), 0 beyond."""
    d = int(lam.shape[0])
    k = min(d, max(1, rank_ceil(p.rank_ratio * d)))
    return exponential_filter(lam, p.t) * truncation_filter(lam, k)


class SwudiSoftParams(MethodParams):
    """Exponential filter f = 1 - exp(-t lambda), full rank."""

    t: float = Field(300.0, ge=0.0)
    init: InitMode = "sum"


@spectral_method(
    "swudi_soft", SwudiSoftParams, "exponential filter 1 - exp(-t lambda), full rank", source=_SWUDI_SOURCE
)
def _filter_swudi_soft(lam: torch.Tensor, shape: Shape, p: SwudiSoftParams) -> torch.Tensor:
    """f_k = 1 - exp(-t lambda_k)."""
    return exponential_filter(lam, p.t)


class PinvParams(MethodParams):
    """theta = D C^+ (f = 1 above rtol * lambda_max); ``init`` only matters on the null space."""

    init: InitMode = "zero"
    rtol: float | None = Field(None, ge=0.0)


@spectral_method("pinv", PinvParams, "closed-form minimiser D C^+", source=_WUDI_SOURCE)
def _filter_pinv(lam: torch.Tensor, shape: Shape, p: PinvParams) -> torch.Tensor:
    """f_k = 1 where lambda_k > rtol * lambda_max, else 0."""
    return pinv_filter(lam, p.rtol)


# -------------------------------------------------------------------------- iterative methods
class WudiParams(MethodParams):
    """Adam on the WUDI loss from the sum of task vectors."""

    iterations: int = Field(300, ge=0)
    lr: float = Field(1e-5, gt=0.0)


@iterative_method("wudi", WudiParams, "iterative WUDI: Adam on the WUDI loss (reference baseline)", source=_WUDI_SOURCE)
def _merge_wudi(tv: torch.Tensor, p: WudiParams) -> torch.Tensor:
    """Adam on L(theta) = sum_i w_i ||(theta - tau_i) tau_i^T||_F^2 from theta = sum_i tau_i."""
    return baselines.wudi(tv, p.iterations, p.lr)


class OptMergeParams(WudiParams):
    """WUDI on rank-K truncated task vectors; ``rank`` None -> floor(min(m, d) / N)."""

    rank: int | None = Field(None, ge=1)


@iterative_method("optmerge", OptMergeParams, "OptMerge: WUDI on rank-floor(min(m,d)/N) truncated task vectors")
def _merge_optmerge(tv: torch.Tensor, p: OptMergeParams) -> torch.Tensor:
    """WUDI with each tau_i replaced in the loss by its rank-K truncation."""
    return baselines.optmerge(tv, p.iterations, p.lr, p.rank)


# ------------------------------------------------------------------------ elementwise methods
class TaskArithmeticParams(MethodParams):
    """theta = scale * sum_i tau_i."""

    scale: float = 0.3


@elementwise_method(
    "task_arithmetic",
    TaskArithmeticParams,
    "theta = scale * sum of task vectors",
    from_sum=lambda s, n, p: s * float(p.scale),
    source="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv 2212.04089",
)
def _merge_task_arithmetic(tv: torch.Tensor, p: TaskArithmeticParams) -> torch.Tensor:
    """theta = scale * sum_i tau_i."""
    return baselines.task_arithmetic(tv, p.scale)


class TiesParams(MethodParams):
    """TIES: keep the top ``density`` fraction per task, elect signs, disjoint mean, ``scale``.

    Conventions (:func:`swudi.core.baselines.ties`; mergekit's in brackets): ``trim`` exact_k
    [exact k], ``zero_sign`` zero [positive], ``empty_trim`` keep_one [error]. Defaults that differ
    from mergekit's: ``density`` 0.2, the paper's [1.0: no trimming].
    """

    density: float = Field(0.2, ge=0.0, le=1.0)
    scale: float = 1.0
    trim: Literal["exact_k", "keep_tied"] = "exact_k"
    zero_sign: Literal["zero", "positive"] = "zero"
    empty_trim: Literal["keep_one", "base", "error"] = "keep_one"


@elementwise_method(
    "ties",
    TiesParams,
    "TIES: trim, elect sign, disjoint mean",
    source="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv 2306.01708",
)
def _merge_ties(tv: torch.Tensor, p: TiesParams) -> torch.Tensor:
    """Trim each tau_i to its top ``density`` magnitudes, elect signs, disjoint mean, times scale."""
    return baselines.ties(tv, p.density, p.scale, trim=p.trim, zero_sign=p.zero_sign, empty_trim=p.empty_trim)


class MeanParams(MethodParams):
    """theta = mean_i tau_i (no parameters)."""


@elementwise_method("mean", MeanParams, "theta = mean of task vectors", from_sum=lambda s, n, p: s / n)
def _merge_mean(tv: torch.Tensor, p: MeanParams) -> torch.Tensor:
    """theta = (1/N) sum_i tau_i."""
    return baselines.mean(tv)


# ------------------------------------------------------------------------ subspace methods
_ISO_SOURCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025, arXiv 2502.04959"
)


class IsoCParams(MethodParams):
    """Iso-C has no parameter (the paper tunes the global scale alpha on validation data)."""


@subspace_method(
    "iso_c",
    IsoCParams,
    "Iso-C: SVD of the sum of task vectors, every singular value replaced by their mean",
    source=_ISO_SOURCE,
)
def _merge_iso_c(t: TaskSVDs, p: IsoCParams, device: str | torch.device) -> torch.Tensor:
    """theta = mean(sigma) U V^T for sum_i tau_i = U diag(sigma) V^T."""
    return subspace.iso_c(t, device=device)


class IsoCTSParams(MethodParams):
    """Iso-CTS: ``common_space_fraction`` of min(m, d) from the sum, the rest task-specific."""

    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0)


@subspace_method(
    "iso_cts",
    IsoCTSParams,
    "Iso-CTS: common subspace of the sum plus each task's top orthogonal directions, isotropic spectrum",
    source=_ISO_SOURCE,
)
def _merge_iso_cts(t: TaskSVDs, p: IsoCTSParams, device: str | torch.device) -> torch.Tensor:
    """Common + task-specific singular vectors, orthogonalised, every singular value their mean."""
    return subspace.iso_cts(t, p.common_space_fraction, device=device)


class TsvMParams(MethodParams):
    """TSV-M has no parameter (the paper uses alpha = 1.0: the global scale)."""


@subspace_method(
    "tsv_m",
    TsvMParams,
    "TSV-M: each task's top floor(min(m,d)/N) singular vectors, orthogonalised (polar), summed",
    source="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025, "
    "arXiv 2412.00081",
)
def _merge_tsv_m(t: TaskSVDs, p: TsvMParams, device: str | torch.device) -> torch.Tensor:
    """theta = polar(U) diag(s) polar(V)^T over the stacked per-task top singular triplets."""
    return subspace.tsv_m(t, device=device)


class CartParams(MethodParams):
    """CART: theta = mean + prior * mean_i SVD_k(tau_i - mean), k = max(1, int(rank_ratio min(m, d)))."""

    prior: float = 2.0
    rank_ratio: float = Field(0.12, gt=0.0, le=1.0)


@subspace_method(
    "cart",
    CartParams,
    "CART: mean of task vectors + prior x mean of the rank-k SVDs of the centred task vectors",
    source="Choi et al., Revisiting Weight Averaging for Model Merging, 2024, arXiv 2412.12153",
)
def _merge_cart(t: TaskSVDs, p: CartParams, device: str | torch.device) -> torch.Tensor:
    """theta = tau_bar + prior * (1/N) sum_i SVD_k(tau_i - tau_bar)."""
    return subspace.cart(t, p.prior, p.rank_ratio, device=device)


class AceParams(MethodParams):
    """ACE-Merging, the authors' code defaults: ridge ``eps``, flattened fraction ``k_frac``, and
    the log-norm dispersion above which tasks count as heterogeneous."""

    eps: float = Field(1e-2, gt=0.0)
    k_frac: float = Field(0.3, gt=0.0, le=1.0)
    heterogeneity_threshold: float = Field(0.3, ge=0.0)


@subspace_method(
    "ace",
    AceParams,
    "ACE-Merging: covariances from the task vectors, regularised closed-form solve, top-k isotropic refinement",
    source="Xu et al., ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation, CVPR 2026, "
    "arXiv 2603.02945",
    dense_reason="ACE solves a d x d system with each task's covariance + eps I (full rank whatever the LoRA rank)",
)
def _merge_ace(t: TaskSVDs, p: AceParams, device: str | torch.device) -> torch.Tensor:
    """See :func:`swudi.core.subspace.ace` (and its list of differences from the authors' code)."""
    return subspace.ace(t, p.eps, p.k_frac, p.heterogeneity_threshold, device=device)


# ------------------------------------------------------------------------------ post-filters
class SvcParams(MethodParams):
    """SVC: ``alpha`` floors the over-counting factor eta (authors' default 1: only shrink)."""

    alpha: float = Field(1.0, ge=0.0)


@post_filter(
    "svc",
    SvcParams,
    "Singular Value Calibration: divide each singular value of theta by its over-counting across tasks",
    source="Li et al., When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging, ICML 2026, "
    "arXiv 2602.05536",
)
def _post_svc(theta: torch.Tensor, t: TaskSVDs, p: SvcParams, device: str | torch.device) -> torch.Tensor:
    """sigma_r / max(mean_i s_ri, alpha) where every task's s_ri > 0 (:func:`swudi.core.subspace.svc`)."""
    return subspace.svc(theta, t, p.alpha, device=device)


# ------------------------------------------------------------------------------ look-ups
def get_method(name: str | MethodSpec) -> MethodSpec:
    """The registered method; :class:`ConfigError` naming the valid methods otherwise.

    Modules named in ``$SWUDI_METHOD_MODULES`` are imported first (their methods register).
    """
    if isinstance(name, MethodSpec):
        return name
    import_method_modules()
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}") from None


def validate_params(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's full parameter dict (defaults filled in); :class:`ConfigError` if invalid."""
    return get_method(method).validate(params).model_dump()


def validate_post_params(post: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The post-filter's full parameter dict (defaults filled in); :class:`ConfigError` if invalid."""
    return get_post_filter(post).validate(params).model_dump()


def _init_mode(p: BaseModel) -> str:
    """theta0 of a spectral method: its ``init`` parameter, ``"sum"`` when it has none."""
    return str(getattr(p, "init", "sum"))


def _shape2(shape: Sequence[int]) -> Shape:
    m, d = (int(s) for s in shape)
    return (m, d)


def _checked(theta: torch.Tensor, spec: MethodSpec, shape: Sequence[int], what: str) -> torch.Tensor:
    """``theta`` as float32 after checking the method returned a tensor of ``shape``."""
    if not isinstance(theta, torch.Tensor) or tuple(theta.shape) != tuple(shape):
        got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ConfigError(f"method {spec.name!r}: its {what} returned {got}, expected a tensor of shape {tuple(shape)}")
    return theta.to(torch.float32)


def _filter(spec: MethodSpec, eigenvalues: torch.Tensor, shape: Shape, p: BaseModel) -> torch.Tensor:
    assert spec.filter is not None  # guaranteed by MethodSpec for spectral methods
    return _checked(spec.filter(eigenvalues, shape, p), spec, eigenvalues.shape, "filter")


def spectral_filter(eigenvalues: torch.Tensor, shape: Sequence[int], method: str, **params: Any) -> torch.Tensor:
    """The filter f ``[d]`` a spectral method applies to eigenvalues (descending) of a weight.

    ``int(f.count_nonzero())`` is the number of eigendirections the method uses (its rank).
    """
    spec = get_method(method)
    if spec.kind != "spectral":
        raise ConfigError(f"method {spec.name!r} is {spec.kind}, not spectral: it has no spectral filter")
    p = spec.validate(params)
    return _filter(spec, torch.as_tensor(eigenvalues, dtype=torch.float32).cpu(), _shape2(shape), p)


# ------------------------------------------------------------------------- merge entry points
def merge_decomposition(
    dec: Decomposition, method: str, *, device: str | torch.device = "auto", **params: Any
) -> torch.Tensor:
    """Merged theta ``[m, d]`` float32 (CPU) from a decomposition: filter + two matrix products.

    Spectral methods: theta = theta0 - theta0 Q diag(f) Q^T + D Q diag(f / lambda) Q^T (the mean
    when the decomposition is all zero). Methods declaring ``from_sum``: ``from_sum(S, N, params)``.
    Any other method needs the task vectors: :class:`ConfigError` (use :func:`merge_matrix`).
    """
    spec = get_method(method)
    p = spec.validate(params)
    if spec.kind == "spectral":
        if dec.all_zero:
            return dec.theta0("mean")
        return apply_filter(dec, _filter(spec, dec.eigenvalues, dec.shape, p), _init_mode(p), device=device)
    if spec.from_sum is not None:
        return _checked(spec.from_sum(dec.sum_of_task_vectors(), dec.num_tasks, p), spec, dec.shape, "from_sum")
    raise ConfigError(
        f"method {spec.name!r} ({spec.kind}) needs the task vectors themselves, not a decomposition "
        f"(it declares no from_sum); use merge_matrix(task_vectors, {spec.name!r}, ...)"
    )


def merge_matrix(
    task_vectors: torch.Tensor | Sequence[torch.Tensor],
    method: str,
    *,
    name: str = "",
    device: str | torch.device = "auto",
    **params: Any,
) -> torch.Tensor:
    """Merged task vector theta of one 2-D weight (before the global scale), in the input dtype.

    ``task_vectors`` is ``[N, out, in]`` (or a sequence of ``[out, in]``). Float32 compute on
    ``device`` ("auto": CUDA when available); the result is on the input's device. Spectral
    methods decompose and filter; iterative methods run their optimiser; elementwise methods
    apply their rule. All-zero task vectors give the mean (except for elementwise methods).
    """
    spec = get_method(method)
    p = spec.validate(params)
    if spec.kind == "elementwise":
        return merge_elementwise(task_vectors, spec.name, name=name, **params)
    tv = check_task_vectors(task_vectors, name, ndim=3)
    theta = _merge_matrix_f32(tv, spec, p, name=name, device=device)
    return theta.to(device=tv.device, dtype=tv.dtype)


def _merge_matrix_f32(
    tv: torch.Tensor, spec: MethodSpec, p: BaseModel, *, name: str, device: str | torch.device
) -> torch.Tensor:
    """theta as float32 for a validated ``[N, m, d]`` stack (CPU or the compute device)."""
    if spec.kind == "spectral":
        m, d = int(tv.shape[1]), int(tv.shape[2])

        def needed_rank(eigenvalues: torch.Tensor) -> int:
            nonzero = torch.nonzero(_filter(spec, eigenvalues, (m, d), p)).flatten()
            return 0 if nonzero.numel() == 0 else int(nonzero[-1]) + 1

        dec = _decompose(tv, name=name, device=device, rank_fn=needed_rank, checked=True)
        if dec.all_zero:
            return dec.theta0("mean")
        return apply_filter(dec, _filter(spec, dec.eigenvalues, dec.shape, p), _init_mode(p), device=device)
    if spec.kind == "subspace":
        if is_all_zero(squared_norms(tv)):
            return baselines.mean(tv.to(torch.float32))
        return merge_task_svds(task_svds(tv, name=name, device=device), spec.name, device=device, **p.model_dump())
    if spec.kind == "iterative":
        x = tv.to(device=resolve_device(device), dtype=torch.float32)
        if is_all_zero(squared_norms(x)):
            return baselines.mean(x)
        return _run_merge(spec, x, p)
    return _run_merge(spec, tv, p)


def _run_merge(spec: MethodSpec, tv: torch.Tensor, p: BaseModel) -> torch.Tensor:
    """A non-spectral method's theta (float32, shape ``tv.shape[1:]``): ``merge``, else ``from_sum``."""
    x = tv.to(torch.float32)
    if spec.merge is not None:
        return _checked(spec.merge(x, p), spec, tv.shape[1:], "merge")
    assert spec.from_sum is not None  # MethodSpec guarantees one of the two
    return _checked(spec.from_sum(x.sum(dim=0), int(tv.shape[0]), p), spec, tv.shape[1:], "from_sum")


def merge_elementwise(
    task_vectors: torch.Tensor | Sequence[torch.Tensor], method: str, *, name: str = "", **params: Any
) -> torch.Tensor:
    """theta for a tensor of any shape ``[N, ...]``, in the input dtype and on its device.

    Elementwise methods apply their own rule; spectral and iterative methods (which only define
    a rule for 2-D weights) give the mean of the task vectors, as the reference does for biases,
    norms and other tensors. Parameters are still validated against ``method``.
    """
    spec = get_method(method)
    p = spec.validate(params)
    tv = check_task_vectors(task_vectors, name)
    return _merge_elementwise_f32(tv, spec, p).to(tv.dtype)


def _merge_elementwise_f32(tv: torch.Tensor, spec: MethodSpec, p: BaseModel) -> torch.Tensor:
    """theta as float32 for a validated ``[N, ...]`` stack: the method's rule, or the mean."""
    if spec.kind == "elementwise":
        return _run_merge(spec, tv, p)
    return baselines.mean(tv)


def merge_task_svds(t: TaskSVDs, method: str, *, device: str | torch.device = "auto", **params: Any) -> torch.Tensor:
    """theta ``[m, d]`` float32 (CPU) of a subspace method from a weight's per-task SVDs."""
    spec = get_method(method)
    if spec.kind != "subspace" or spec.from_svds is None:
        raise ConfigError(f"method {spec.name!r} is {spec.kind}, not a subspace method (it needs no task SVDs)")
    p = spec.validate(params)
    if sum(t.ranks) == 0:
        return torch.zeros(t.shape, dtype=torch.float32)
    return _checked(spec.from_svds(t, p, device), spec, t.shape, "from_svds")


def apply_post_filter(
    theta: torch.Tensor, t: TaskSVDs, post: str, *, device: str | torch.device = "auto", **params: Any
) -> torch.Tensor:
    """theta after the post-filter ``post`` (float32, CPU); ``t``: the weight's per-task SVDs."""
    spec = get_post_filter(post)
    p = spec.validate(params)
    out = spec.apply(theta.to(torch.float32), t, p, device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(theta.shape):
        raise ConfigError(f"post-filter {post!r} returned a result of another shape than theta {tuple(theta.shape)}")
    return out.to(torch.float32).cpu()
