"""The merge-method registry: :class:`MethodSpec`, the :data:`METHODS` table and how methods join it.

A method is declared once, next to its function, with one of the decorators

- :func:`spectral_method` on a filter ``filter(eigenvalues, (m, d), params) -> f``;
- :func:`iterative_method` on ``merge(task_vectors [N, m, d], params) -> theta``;
- :func:`elementwise_method` on ``merge(task_vectors [N, ...], params) -> theta``, optionally with
  ``from_sum(sum_tv, num_tasks, params) -> theta`` when theta only depends on the sum of the task
  vectors (then a stored decomposition is enough to merge with it);
- :func:`subspace_method` on ``from_svds(task_svds, params, device) -> theta``: a 2-D weight merged
  from the per-task SVDs (:class:`~swudi.core.task_svd.TaskSVDs`), stored once per weight;

or with :func:`register_method` on a :class:`MethodSpec`. Everything that needs a method (the merge
entry points of :mod:`swudi.methods`, :func:`swudi.merge_state_dicts`, the config validation, the
``swudi`` command line and the README's table) reads it from :data:`METHODS`.

Post-filters (:class:`PostFilterSpec`, :data:`POST_FILTERS`, :func:`post_filter`) transform the
merged theta of a 2-D weight after any method, from the same per-task SVDs (config ``post``).

A spec is checked when it is built: a bad declaration fails at import time, not in the middle of a
merge. Registering a name twice is an error unless ``replace=True``; :func:`unregister_method` and
the context manager :func:`registered_method` remove a method again (tests, experiments).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import torch
from pydantic import BaseModel, ValidationError

from swudi.config.validation import StrictModel
from swudi.errors import ConfigError

__all__ = [
    "METHODS",
    "METHOD_MODULES_ENV",
    "POST_FILTERS",
    "PostFilterSpec",
    "MethodKind",
    "MethodParams",
    "MethodSpec",
    "elementwise_method",
    "import_method_modules",
    "iterative_method",
    "method_choices",
    "method_rows",
    "methods_markdown",
    "get_post_filter",
    "post_filter",
    "subspace_method",
    "register_method",
    "registered_method",
    "spectral_method",
    "unregister_method",
]

logger = logging.getLogger(__name__)

MethodKind = Literal["spectral", "iterative", "elementwise", "subspace"]
KINDS: tuple[str, ...] = get_args(MethodKind)

#: Environment variable: comma-separated modules imported before a method is looked up, so that
#: methods registered there are known to the command line and to worker processes.
METHOD_MODULES_ENV = "SWUDI_METHOD_MODULES"

Shape = tuple[int, int]
#: ``filter(eigenvalues [d] float32 CPU descending, (m, d), params) -> f [d]``, f_k in [0, 1].
FilterFn = Callable[[torch.Tensor, Shape, Any], torch.Tensor]
#: ``merge(task_vectors [N, ...], params) -> theta [...]`` (float32 compute).
MergeFn = Callable[[torch.Tensor, Any], torch.Tensor]
#: ``from_sum(sum_tv [...] float32, num_tasks, params) -> theta [...]``.
FromSumFn = Callable[[torch.Tensor, int, Any], torch.Tensor]
#: ``from_svds(task_svds: TaskSVDs, params, device) -> theta [m, d]`` (float32, CPU).
FromSvdsFn = Callable[[Any, Any, Any], torch.Tensor]
#: ``apply(theta [m, d] float32, task_svds: TaskSVDs, params, device) -> theta [m, d]``.
PostFn = Callable[[torch.Tensor, Any, Any, Any], torch.Tensor]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


class MethodParams(StrictModel):
    """Base of the parameter models: unknown keys are errors, values are immutable, no NaN, no
    infinity, no boolean for a number (:class:`~swudi.config.validation.StrictModel`).

    Every field needs a default (a method must run with ``params: {}``).
    """


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its name, kind, parameter model, one-line description and function(s).

    - ``"spectral"``: ``filter`` gives f per eigenvalue of C; theta = theta0 - theta0 Q diag(f) Q^T +
      D Q diag(f / lambda) Q^T, theta0 from the parameter ``init`` (``"sum"`` when the model has no
      such field). Merges from a decomposition alone.
    - ``"iterative"``: ``merge`` runs on the ``[N, m, d]`` task vectors of 2-D weights.
    - ``"elementwise"``: ``merge`` runs on ``[N, ...]`` task vectors of any shape.
    - ``"subspace"``: ``from_svds`` runs on the per-task SVDs of a 2-D weight (stored once per
      weight, so another subspace method or a post-filter reads no expert again).

    ``source`` names where the method comes from (paper, year, arXiv id). ``dense_reason`` (subspace
    methods): why the maths needs dense m x d / d x d matrices even for LoRA experts (shown by
    ``swudi plan``); None when it works on the factors.

    A non-spectral method may declare ``from_sum`` (theta from S = sum_i tau_i and N alone); it is
    then also computable from a decomposition, and ``merge`` may be omitted (it becomes
    ``from_sum(tv.sum(0), N, params)``).
    """

    name: str
    kind: MethodKind
    params_model: type[BaseModel]
    description: str
    filter: FilterFn | None = None
    merge: MergeFn | None = None
    from_sum: FromSumFn | None = None
    from_svds: FromSvdsFn | None = None
    source: str = ""
    dense_reason: str | None = None

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(f"invalid merge method declaration {self.name!r}: {'; '.join(problems)}")

    def _problems(self) -> Iterator[str]:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            yield "the name must start with a letter and use letters, digits, '_', '.', '-' only"
        if self.kind not in KINDS:
            yield f"kind {self.kind!r} is not one of {', '.join(KINDS)}"
        if not isinstance(self.description, str) or not self.description.strip() or "\n" in self.description:
            yield "the description must be one non-empty line"
        yield from _params_model_problems(self.params_model)
        if not isinstance(self.source, str) or "\n" in self.source:
            yield "the source must be one line"
        for field in ("filter", "merge", "from_sum", "from_svds"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                yield f"{field} must be callable, got {type(value).__name__}"
        if self.kind == "spectral":
            if self.filter is None:
                yield "a spectral method needs a filter(eigenvalues, shape, params)"
            if self.merge is not None or self.from_sum is not None or self.from_svds is not None:
                yield "a spectral method is defined by its filter alone (no merge / from_sum)"
        elif self.kind == "subspace":
            if self.from_svds is None:
                yield "a subspace method needs from_svds(task_svds, params, device)"
            if self.filter is not None or self.merge is not None or self.from_sum is not None:
                yield "a subspace method is defined by its from_svds alone"
        else:
            if self.from_svds is not None:
                yield f"an {self.kind} method has no from_svds; declare it as subspace"
            if self.filter is not None:
                yield f"an {self.kind} method has no spectral filter; declare it as spectral"
            if self.merge is None and self.from_sum is None:
                yield f"an {self.kind} method needs merge(task_vectors, params) or from_sum(sum, n, params)"

    @property
    def needs_task_vectors(self) -> bool:
        """True when a decomposition (C, D, sum of task vectors) is not enough to merge."""
        return self.kind != "spectral" and self.from_sum is None

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


def _params_model_problems(model: Any) -> Iterator[str]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        yield f"params_model must be a pydantic model class, got {model!r}"
        return
    if model.model_config.get("extra") != "forbid":
        yield "params_model must reject unknown keys (subclass swudi.methods.MethodParams)"
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    if required:
        yield f"every parameter needs a default; no default for {', '.join(required)}"


# ----------------------------------------------------------------------------------- registry
#: name -> spec, in registration order. Change it through the functions below, not directly.
METHODS: dict[str, MethodSpec] = {}
_LOCK = threading.RLock()


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS`; a name already taken is a :class:`ConfigError` unless ``replace``."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    with _LOCK:
        if spec.name in METHODS and not replace:
            raise ConfigError(
                f"merge method {spec.name!r} is already registered ({METHODS[spec.name].kind}); "
                "pick another name or pass replace=True"
            )
        METHODS[spec.name] = spec
    logger.debug("registered merge method %r (%s)", spec.name, spec.kind)
    return spec


def unregister_method(name: str) -> MethodSpec:
    """Remove and return the method ``name``; :class:`ConfigError` if it is not registered."""
    with _LOCK:
        try:
            return METHODS.pop(name)
        except KeyError:
            raise ConfigError(f"merge method {name!r} is not registered") from None


@contextmanager
def registered_method(spec: MethodSpec, *, replace: bool = False) -> Iterator[MethodSpec]:
    """Register ``spec`` for the duration of a ``with`` block; the previous entry (if replaced) comes back."""
    with _LOCK:
        previous = METHODS.get(spec.name)
        register_method(spec, replace=replace)
    try:
        yield spec
    finally:
        with _LOCK:
            if METHODS.get(spec.name) is spec:
                del METHODS[spec.name]
            if previous is not None:
                METHODS[spec.name] = previous


F = TypeVar("F", bound=Callable[..., torch.Tensor])


def spectral_method(
    name: str, params_model: type[BaseModel], description: str, *, replace: bool = False, source: str = ""
) -> Callable[[F], F]:
    """Decorator: register the decorated ``filter(eigenvalues, (m, d), params) -> f`` as a spectral method."""

    def declare(fn: F) -> F:
        register_method(
            MethodSpec(name, "spectral", params_model, description, filter=fn, source=source), replace=replace
        )
        return fn

    return declare


def iterative_method(
    name: str, params_model: type[BaseModel], description: str, *, replace: bool = False, source: str = ""
) -> Callable[[F], F]:
    """Decorator: register the decorated ``merge(task_vectors [N, m, d], params) -> theta`` (2-D weights)."""

    def declare(fn: F) -> F:
        register_method(
            MethodSpec(name, "iterative", params_model, description, merge=fn, source=source), replace=replace
        )
        return fn

    return declare


def elementwise_method(
    name: str,
    params_model: type[BaseModel],
    description: str,
    *,
    from_sum: FromSumFn | None = None,
    replace: bool = False,
    source: str = "",
) -> Callable[[F], F]:
    """Decorator: register the decorated ``merge(task_vectors [N, ...], params) -> theta`` (any shape).

    ``from_sum(sum_tv, num_tasks, params)`` declares that theta depends on the task vectors only
    through their sum (it must equal ``merge``); such a method also merges from a decomposition.
    """

    def declare(fn: F) -> F:
        spec = MethodSpec(name, "elementwise", params_model, description, merge=fn, from_sum=from_sum, source=source)
        register_method(spec, replace=replace)
        return fn

    return declare


def subspace_method(
    name: str,
    params_model: type[BaseModel],
    description: str,
    *,
    source: str = "",
    dense_reason: str | None = None,
    replace: bool = False,
) -> Callable[[F], F]:
    """Decorator: register the decorated ``from_svds(task_svds, params, device) -> theta`` (2-D weights).

    ``dense_reason``: why the method needs dense matrices even for LoRA experts (None: factor space).
    """

    def declare(fn: F) -> F:
        spec = MethodSpec(
            name, "subspace", params_model, description, from_svds=fn, source=source, dense_reason=dense_reason
        )
        register_method(spec, replace=replace)
        return fn

    return declare


# ------------------------------------------------------------------------------ post-filters
@dataclass(frozen=True)
class PostFilterSpec:
    """A transformation of the merged theta of every 2-D weight, after any method (config ``post``).

    ``apply(theta [m, d] float32, task_svds, params, device) -> theta`` gets the weight's per-task
    SVDs (:class:`~swudi.core.task_svd.TaskSVDs`), stored once per weight like a decomposition.
    """

    name: str
    params_model: type[BaseModel]
    description: str
    apply: PostFn
    source: str = ""

    def __post_init__(self) -> None:
        problems = list(_params_model_problems(self.params_model))
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            problems.append("the name must start with a letter and use letters, digits, '_', '.', '-' only")
        if not callable(self.apply):
            problems.append("apply must be callable")
        if not isinstance(self.description, str) or not self.description.strip() or "\n" in self.description:
            problems.append("the description must be one non-empty line")
        if problems:
            raise ConfigError(f"invalid post-filter declaration {self.name!r}: {'; '.join(problems)}")

    def validate(self, params: Mapping[str, Any] | None = None) -> BaseModel:
        """Validated parameters (defaults filled); :class:`ConfigError` naming the filter otherwise."""
        try:
            return self.params_model(**dict(params or {}))
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in err.get('loc', ())) or '?'}: {err.get('msg')}" for err in exc.errors()
            ]
            valid = ", ".join(self.params_model.model_fields) or "(none)"
            raise ConfigError(f"post-filter {self.name!r}: {'; '.join(problems)}. Valid parameters: {valid}") from None


#: name -> post-filter, in registration order.
POST_FILTERS: dict[str, PostFilterSpec] = {}


def post_filter(
    name: str, params_model: type[BaseModel], description: str, *, source: str = "", replace: bool = False
) -> Callable[[F], F]:
    """Decorator: register ``apply(theta, task_svds, params, device) -> theta`` as a post-filter."""

    def declare(fn: F) -> F:
        spec = PostFilterSpec(name, params_model, description, fn, source)
        with _LOCK:
            if name in POST_FILTERS and not replace:
                raise ConfigError(f"post-filter {name!r} is already registered; pick another name or pass replace=True")
            POST_FILTERS[name] = spec
        return fn

    return declare


def get_post_filter(name: str) -> PostFilterSpec:
    """The registered post-filter; :class:`ConfigError` naming the valid ones otherwise."""
    try:
        return POST_FILTERS[name]
    except KeyError:
        raise ConfigError(f"unknown post-filter {name!r}; valid: {', '.join(POST_FILTERS) or '(none)'}") from None


# ------------------------------------------------------------------------------ user modules
_imported_from_env: str | None = None


def import_method_modules(modules: str | None = None) -> list[str]:
    """Import the modules (comma-separated) that register methods; default: ``$SWUDI_METHOD_MODULES``.

    Called by :func:`swudi.methods.get_method`, so a method registered at import time of a module
    named there is known everywhere the variable is set (command line, Dask workers). Returns the
    module names; :class:`ConfigError` if one cannot be imported.
    """
    global _imported_from_env
    from_env = modules is None
    if from_env:
        modules = os.environ.get(METHOD_MODULES_ENV, "")
        if modules == _imported_from_env:
            return [m for m in (part.strip() for part in modules.split(",")) if m]
    names = [m for m in (part.strip() for part in (modules or "").split(",")) if m]
    for module in names:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            where = f" (from ${METHOD_MODULES_ENV})" if from_env else ""
            raise ConfigError(f"cannot import merge-method module {module!r}{where}: {exc}") from exc
    if from_env:
        _imported_from_env = modules
    return names


# -------------------------------------------------------------------------------- description
def _format_value(value: Any) -> str:
    """A default as it would be written in the YAML config."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _parameters(spec: MethodSpec) -> list[str]:
    return [f"{key}={_format_value(value)}" for key, value in spec.defaults().items()]


def method_rows() -> list[dict[str, Any]]:
    """One row per registered method, in registration order.

    Keys: ``name``, ``kind``, ``description``, ``source`` (str) and ``parameters`` (list of
    ``key=default``). Post-filters follow, with kind ``post-filter``.
    """
    with _LOCK:
        specs = list(METHODS.values())
        posts = list(POST_FILTERS.values())
    rows = [
        {
            "name": s.name,
            "kind": s.kind,
            "description": s.description.strip(),
            "source": s.source,
            "parameters": _parameters(s),
        }
        for s in specs
    ]
    rows += [
        {
            "name": p.name,
            "kind": "post-filter",
            "description": p.description.strip(),
            "source": p.source,
            "parameters": [f"{k}={_format_value(v)}" for k, v in p.params_model().model_dump().items()],
        }
        for p in posts
    ]
    return rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_markdown() -> str:
    """The methods as a Markdown table (the README's, between its ``methods`` markers)."""
    lines = ["| method | kind | description | source | parameters (defaults) |", "|---|---|---|---|---|"]
    for row in method_rows():
        params = ", ".join(f"`{p}`" for p in row["parameters"]) or "–"  # noqa: RUF001 - the table's empty-cell mark
        source = _md_cell(row["source"]) or "–"  # noqa: RUF001 - the table's empty-cell mark
        lines.append(
            f"| `{row['name']}` | {row['kind']} | {_md_cell(row['description'])} | {source} | {_md_cell(params)} |"
        )
    return "\n".join(lines)


def method_choices() -> str:
    """The registered names for help texts: ``"swudi_a | swudi | ..."``."""
    with _LOCK:
        return " | ".join(METHODS)
