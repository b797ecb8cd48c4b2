"""The method registry: name -> kind, validated parameters, and the merge entry points.

Kinds:

- ``"spectral"``: computed from a :class:`~swudi.decomposition.Decomposition` by a filter
  (``pinv``, ``swudi_soft``, ``swudi``, ``swudi_a``): decompose once, filter many.
- ``"iterative"``: needs the task vectors themselves (``wudi``, ``optmerge``).
- ``"elementwise"``: any tensor shape (``task_arithmetic``, ``mean``, ``ties``).

Spectral and iterative methods apply to 2-D weights only; other tensors get the mean
(:func:`merge_elementwise`). Adding a method means one ``MethodSpec`` entry here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from swudi import baselines
from swudi.decomposition import Decomposition, _decompose
from swudi.device import resolve_device
from swudi.errors import ConfigError
from swudi.rank import check_rank_rule, rank_ceil, select_rank
from swudi.spectral import apply_filter, exponential_filter, pinv_filter, truncation_filter
from swudi.task_vectors import check_task_vectors, is_all_zero, squared_norms

__all__ = [
    "ALGORITHM_VERSION",
    "MethodKind",
    "MethodSpec",
    "METHODS",
    "get_method",
    "validate_params",
    "spectral_filter",
    "merge_matrix",
    "merge_decomposition",
    "merge_elementwise",
]

logger = logging.getLogger(__name__)

#: Bump when any method's numbers change, so caches keyed on it are recomputed.
ALGORITHM_VERSION = "1"

MethodKind = Literal["spectral", "iterative", "elementwise"]
InitMode = Literal["sum", "mean", "zero"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskArithmeticParams(_Params):
    """theta = scale * sum_i tau_i."""

    scale: float = 0.3


class MeanParams(_Params):
    """theta = mean_i tau_i (no parameters)."""


class TiesParams(_Params):
    """TIES: keep the top ``density`` fraction per task, elect signs, disjoint mean, ``scale``."""

    density: float = Field(0.2, ge=0.0, le=1.0)
    scale: float = 1.0


class WudiParams(_Params):
    """Adam on the WUDI loss from the sum of task vectors."""

    iterations: int = Field(300, ge=0)
    lr: float = Field(1e-5, gt=0.0)


class OptMergeParams(WudiParams):
    """WUDI on rank-K truncated task vectors; ``rank`` None -> floor(min(m, d) / N)."""

    rank: int | None = Field(None, ge=1)


class PinvParams(_Params):
    """theta = D C^+ (f = 1 above rtol * lambda_max); ``init`` only matters on the null space."""

    init: InitMode = "zero"
    rtol: float | None = Field(None, ge=0.0)


class SwudiSoftParams(_Params):
    """Exponential filter f = 1 - exp(-t lambda), full rank."""

    t: float = Field(300.0, ge=0.0)
    init: InitMode = "sum"


class SwudiParams(_Params):
    """Exponential filter on the top K = ceil(rank_ratio * d) eigendirections, 0 elsewhere."""

    t: float = Field(1300.0, ge=0.0)
    rank_ratio: float = Field(0.65, gt=0.0, le=1.0)
    init: InitMode = "sum"


class SwudiAParams(_Params):
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


Shape = tuple[int, int]
FilterFn = Callable[[torch.Tensor, Shape, Any], torch.Tensor]
MergeFn = Callable[[torch.Tensor, Any], torch.Tensor]


def _filter_pinv(lam: torch.Tensor, shape: Shape, p: PinvParams) -> torch.Tensor:
    return pinv_filter(lam, p.rtol)


def _filter_swudi_soft(lam: torch.Tensor, shape: Shape, p: SwudiSoftParams) -> torch.Tensor:
    return exponential_filter(lam, p.t)


def _filter_swudi(lam: torch.Tensor, shape: Shape, p: SwudiParams) -> torch.Tensor:
    d = int(lam.shape[0])
    k = min(d, max(1, rank_ceil(p.rank_ratio * d)))
    return exponential_filter(lam, p.t) * truncation_filter(lam, k)


def _filter_swudi_a(lam: torch.Tensor, shape: Shape, p: SwudiAParams) -> torch.Tensor:
    k = select_rank(lam, p.rank_rule, shape, min_rank=p.min_rank, max_rank_ratio=p.max_rank_ratio)
    f = truncation_filter(lam, k)
    return f if p.t is None else f * exponential_filter(lam, p.t)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: ``filter`` for spectral methods, ``merge`` for the others."""

    name: str
    kind: MethodKind
    params_model: type[BaseModel]
    description: str
    filter: FilterFn | None = None
    merge: MergeFn | None = None

    def validate(self, params: Mapping[str, Any] | None = None) -> BaseModel:
        """Validated parameters (defaults filled); :class:`ConfigError` on unknown or bad ones."""
        params = dict(params or {})
        valid = list(self.params_model.model_fields)
        try:
            return self.params_model(**params)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = ".".join(str(part) for part in err.get("loc", ())) or "?"
                if err.get("type") == "extra_forbidden":
                    problems.append(f"unknown parameter {field!r}")
                else:
                    problems.append(f"parameter {field!r}: {err.get('msg')} (got {err.get('input')!r})")
            raise ConfigError(
                f"method {self.name!r}: {'; '.join(problems)}. "
                f"Valid parameters: {', '.join(valid) if valid else '(none)'}"
            ) from None
        except ConfigError as exc:  # raised by a field validator (e.g. an unknown rank rule)
            raise ConfigError(f"method {self.name!r}: {exc}") from None

    def defaults(self) -> dict[str, Any]:
        """The default parameters."""
        return self.params_model().model_dump()


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "task_arithmetic",
            "elementwise",
            TaskArithmeticParams,
            "theta = scale * sum of task vectors",
            merge=lambda tv, p: baselines.task_arithmetic(tv, p.scale),
        ),
        MethodSpec(
            "mean", "elementwise", MeanParams, "theta = mean of task vectors", merge=lambda tv, p: baselines.mean(tv)
        ),
        MethodSpec(
            "ties",
            "elementwise",
            TiesParams,
            "TIES: trim, elect sign, disjoint mean",
            merge=lambda tv, p: baselines.ties(tv, p.density, p.scale),
        ),
        MethodSpec(
            "wudi",
            "iterative",
            WudiParams,
            "iterative WUDI: Adam on the WUDI loss (reference baseline)",
            merge=lambda tv, p: baselines.wudi(tv, p.iterations, p.lr),
        ),
        MethodSpec(
            "optmerge",
            "iterative",
            OptMergeParams,
            "OptMerge: WUDI on rank-floor(min(m,d)/N) truncated task vectors",
            merge=lambda tv, p: baselines.optmerge(tv, p.iterations, p.lr, p.rank),
        ),
        MethodSpec("pinv", "spectral", PinvParams, "closed-form minimiser D C^+", filter=_filter_pinv),
        MethodSpec(
            "swudi_soft",
            "spectral",
            SwudiSoftParams,
            "exponential filter 1 - exp(-t lambda), full rank",
            filter=_filter_swudi_soft,
        ),
        MethodSpec(
            "swudi",
            "spectral",
            SwudiParams,
            "exponential filter on the top ceil(rank_ratio d) directions",
            filter=_filter_swudi,
        ),
        MethodSpec(
            "swudi_a", "spectral", SwudiAParams, "hard truncation at a per-weight adaptive rank", filter=_filter_swudi_a
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """The registered method; :class:`ConfigError` naming the valid methods otherwise."""
    if isinstance(name, MethodSpec):
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}") from None


def validate_params(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's full parameter dict (defaults filled in); :class:`ConfigError` if invalid."""
    return get_method(method).validate(params).model_dump()


def spectral_filter(eigenvalues: torch.Tensor, shape: Sequence[int], method: str, **params: Any) -> torch.Tensor:
    """The filter f ``[d]`` a spectral method applies to eigenvalues (descending) of a weight.

    ``int(f.count_nonzero())`` is the number of eigendirections the method uses (its rank).
    """
    spec = get_method(method)
    if spec.kind != "spectral":
        raise ConfigError(f"method {spec.name!r} is {spec.kind}, not spectral: it has no spectral filter")
    p = spec.validate(params)
    return spec.filter(torch.as_tensor(eigenvalues, dtype=torch.float32).cpu(), _shape2(shape), p)


def _shape2(shape: Sequence[int]) -> Shape:
    m, d = (int(s) for s in shape)
    return (m, d)


def merge_decomposition(
    dec: Decomposition, method: str, *, device: str | torch.device = "auto", **params: Any
) -> torch.Tensor:
    """Merged theta ``[m, d]`` float32 (CPU) from a decomposition: filter + two matrix products.

    Spectral methods, plus ``mean`` and ``task_arithmetic`` (they only need the sum of task
    vectors). An all-zero decomposition gives the mean for every method.
    """
    spec = get_method(method)
    p = spec.validate(params)
    if spec.kind == "iterative" or spec.name == "ties":
        raise ConfigError(
            f"method {spec.name!r} needs the task vectors themselves; use merge_matrix(task_vectors, ...)"
        )
    if dec.all_zero or spec.name == "mean":
        return dec.sum_tv / dec.num_tasks
    if spec.name == "task_arithmetic":
        return dec.sum_tv * float(p.scale)
    f = spec.filter(dec.eigenvalues, dec.shape, p)
    return apply_filter(dec, f, p.init, device=device)


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
    apply their rule. All-zero task vectors give the mean.
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
            f = spec.filter(eigenvalues, (m, d), p)
            nonzero = torch.nonzero(f).flatten()
            return 0 if nonzero.numel() == 0 else int(nonzero[-1]) + 1

        dec = _decompose(tv, name=name, device=device, rank_fn=needed_rank, checked=True)
        if dec.all_zero:
            return dec.sum_tv / dec.num_tasks
        return apply_filter(dec, spec.filter(dec.eigenvalues, dec.shape, p), p.init, device=device)
    if spec.kind == "iterative":
        dev = resolve_device(device)
        x = tv.to(device=dev, dtype=torch.float32)
        if is_all_zero(squared_norms(x)):
            return baselines.mean(x)
        return spec.merge(x, p)
    return spec.merge(tv, p)


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
    if spec.kind == "elementwise":
        return spec.merge(tv, p)
    return baselines.mean(tv)
