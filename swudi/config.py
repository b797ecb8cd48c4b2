"""The merge configuration: one validated YAML document per merge.

A config names the base checkpoint, the experts, the method and its parameters, where the merged
model is published and how the work is run. Every field has one meaning; unknown keys are refused
with the valid ones listed, and method parameters are checked against the method registry, so a bad
config fails before any checkpoint is opened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swudi.checkpoint.storage import is_local_url
from swudi.checkpoint.writer import parse_size
from swudi.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskRunnerConfig(_Strict):
    """How per-layer tasks run: a bounded thread pool, or Dask (local cluster or a scheduler)."""

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = Field(None, description="Dask scheduler address; None starts a local cluster")
    n_workers: int = Field(2, ge=1, description="worker processes of a local Dask cluster")
    threads_per_worker: int = Field(1, ge=1)


class DecompositionConfig(_Strict):
    """Options of the (cached, hyperparameter-free) decomposition step."""

    max_rank: int | None = Field(None, ge=1, description="store at most this many eigenvectors")
    route: Literal["auto", "eigh", "svd"] = "auto"


class EvaluatorConfig(_Strict):
    """A user evaluator ``module:function(model_path, **options) -> {task: {metric: value}}``."""

    function: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"evaluator must be 'module:function', got {value!r}")
        return value


class MergeConfig(_Strict):
    """A complete merge: inputs, method, output and execution settings."""

    base: str = Field(description="base checkpoint: local path or fsspec URL")
    experts: list[str] = Field(min_length=1, description="fine-tuned checkpoints of the same base")
    method: str = "swudi_a"
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    scale: float = Field(1.0, description="alpha in W = W0 + alpha * theta")
    output: str = Field(description="where versions are published (with a latest.json pointer)")
    work_dir: str | None = Field(
        None, description="cache of decompositions and merged tensors; default: OUTPUT/.swudi-work"
    )
    include: list[str] = Field(default_factory=list, description="glob patterns forced to the matrix method")
    exclude: list[str] = Field(
        default_factory=list, description="glob patterns kept out of the matrix method (mean instead)"
    )
    keep_base: list[str] = Field(default_factory=list, description="glob patterns that keep the base value")
    output_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    output_format: Literal["model", "adapter"] = Field(
        "model",
        description="model: the merged model (HF layout); adapter: also VERSION/adapter/, the merged update as a "
        "PEFT LoRA adapter of rank <= sum r_i (LoRA experts, spectral methods, factor-space layers only)",
    )
    max_shard_size: int = Field(5 * 10**9, description="bytes per output shard ('5GB' accepted)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(2, ge=1, description="parallel per-layer tasks")
    per_task_diagnostics: bool = Field(
        True,
        description="per-task WUDI interference of spectral merges, computed while the task vectors are in "
        "memory (2N products of m x d x min(m, d) per layer); the total comes from the decomposition anyway",
    )
    memory_budget: int | None = Field(
        None, description="bytes the merge tasks may hold at once ('16GB' accepted): bounds the tasks in flight"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker; None: available cores // workers"
    )
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig)
    decomposition: DecompositionConfig = Field(default_factory=DecompositionConfig)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for remote URLs")
    evaluators: list[EvaluatorConfig] = Field(default_factory=list)
    keep_versions: int | None = Field(None, ge=1, description="published versions kept; None keeps all")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_size(value)

    @field_validator("experts")
    @classmethod
    def _distinct_experts(cls, value: list[str]) -> list[str]:
        seen = set()
        for url in value:
            if url in seen:
                raise ValueError(f"expert {url!r} is listed twice")
            seen.add(url)
        return value

    @model_validator(mode="after")
    def _method_and_params(self) -> MergeConfig:
        from swudi.methods import validate_params  # the registry owns the parameter models

        object.__setattr__(self, "params", validate_params(self.method, self.params))
        return self

    @property
    def resolved_work_dir(self) -> str:
        """The work folder: ``work_dir`` or ``OUTPUT/.swudi-work``."""
        if self.work_dir:
            return self.work_dir
        return self.output.rstrip("/") + "/.swudi-work"


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            model = _model_at(item["loc"][:-1])
            valid = ", ".join(sorted(model.model_fields)) if model else "?"
            lines.append(f"unknown key {where!r}; valid keys here: {valid}")
        elif item["type"] == "missing":
            lines.append(f"missing required key {where!r}")
        else:
            lines.append(f"{where}: {item['msg']}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = MergeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        inner = getattr(annotation, "__args__", (annotation,))
        candidates = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    merged = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(merged, key.strip(), yaml.safe_load(raw))
    return merged


def config_from_mapping(data: dict[str, Any], source: str = "<mapping>") -> MergeConfig:
    """Validate a raw mapping into a :class:`MergeConfig`; raise :class:`ConfigError` on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate it.

    Relative local paths in ``base``, ``experts``, ``output`` and ``work_dir`` are resolved against
    the config file's folder, so a config means the same thing from any working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    data = _resolve_local_paths(data, path.parent.resolve())
    return config_from_mapping(data, str(path))


def _resolve_local_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    def fix(url: Any) -> Any:
        if isinstance(url, str) and is_local_url(url) and not Path(url).is_absolute():
            return str((root / url).resolve())
        return url

    fixed = dict(data)
    for key in ("base", "output", "work_dir"):
        if key in fixed:
            fixed[key] = fix(fixed[key])
    if isinstance(fixed.get("experts"), list):
        fixed["experts"] = [fix(url) for url in fixed["experts"]]
    return fixed
