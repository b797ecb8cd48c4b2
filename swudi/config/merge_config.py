"""The merge configuration: one validated YAML document per merge.

A config names the base checkpoint, the experts, the method and its parameters, where the merged
model is published and how the work is run. Every field has one meaning; unknown keys are refused
with the valid ones listed, and method parameters are checked against the method registry, so a bad
config fails before any checkpoint is opened. Also refused: a key given twice in the YAML file
(:mod:`swudi.config.strict_yaml`), NaN or infinite numbers, ``true``/``false`` where a number is expected,
empty locations, ``scale: 0`` (it would publish the base), credentials in any URL
(:mod:`swudi.storage.redact`; they belong in ``storage_options`` as secret references), and inputs
that repeat or overlap the output or the work folder (:mod:`swudi.storage.locations`).

Switching the method on the command line (``--method`` or ``--set method=...``) drops the config
file's ``params``: they were chosen for the file's method (``t`` of ``swudi_a`` is not ``t`` of
``swudi``). The dropped names are logged; ``params`` given on the command line must all be valid
for the new method.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from swudi.config.strict_yaml import load_yaml
from swudi.config.validation import StrictModel
from swudi.errors import ConfigError
from swudi.storage.filesystem import is_local_url
from swudi.storage.locations import check_locations
from swudi.storage.redact import url_secret
from swudi.storage.retry import RETRY_KEY
from swudi.units import parse_size

log = logging.getLogger(__name__)

#: A location (path or URL): surrounding blanks stripped, never empty.
Location = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class TaskRunnerConfig(StrictModel):
    """How per-layer tasks run: a bounded thread pool, or Dask (local cluster or a scheduler)."""

    kind: Literal["threads", "dask"] = "threads"
    address: Location | None = Field(None, description="Dask scheduler address; None starts a local cluster")
    n_workers: int = Field(2, ge=1, description="worker processes of a local Dask cluster")
    threads_per_worker: int = Field(1, ge=1)
    cluster_class: str | None = Field(
        None,
        description="a Dask cluster class started for each run, e.g. dask_kubernetes.operator.KubeCluster, "
        "coiled.Cluster, distributed.SSHCluster (instead of address or a local cluster)",
    )
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of cluster_class")
    adapt_kwargs: dict[str, Any] | None = Field(None, description="cluster.adapt(**adapt_kwargs): autoscaling")

    @model_validator(mode="after")
    def _one_cluster(self) -> TaskRunnerConfig:
        if self.address and self.cluster_class:
            raise ValueError("give address (a running scheduler) or cluster_class (a cluster per run), not both")
        if (self.cluster_kwargs or self.adapt_kwargs) and not self.cluster_class:
            raise ValueError("cluster_kwargs and adapt_kwargs need cluster_class")
        if self.cluster_class and not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", self.cluster_class):
            raise ValueError(f"cluster_class must be a dotted 'module.Class' path, got {self.cluster_class!r}")
        return self


class DecompositionConfig(StrictModel):
    """Options of the (cached, hyperparameter-free) decomposition step."""

    max_rank: int | None = Field(None, ge=1, description="store at most this many eigenvectors")
    route: Literal["auto", "eigh", "svd"] = "auto"


class EvaluatorConfig(StrictModel):
    """An evaluator ``module:function(model_path, **options) -> {task: {metric: value}}``.

    With ``relative: true`` it is also run on the base and on every expert (cached by checkpoint
    fingerprint in the work folder) and the report gives, per task, ``gap_closed`` for losses and
    ``normalized`` for accuracies (:mod:`swudi.evaluators.relative`); ``task_experts`` names the
    expert of a task (index in ``experts``, 0-based, or its URL) where the default rule (the only
    expert, else the best one) is not wanted.
    """

    function: str
    options: dict[str, Any] = Field(default_factory=dict)
    relative: bool = Field(False, description="also evaluate the base and each expert; report gap_closed/normalized")
    task_experts: dict[str, int | str] = Field(
        default_factory=dict, description="{task: expert index (0-based) or URL}: the expert of each task"
    )

    @model_validator(mode="after")
    def _task_experts_need_relative(self) -> EvaluatorConfig:
        if self.task_experts and not self.relative:
            raise ValueError("task_experts is only used with relative: true")
        return self

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"evaluator must be 'module:function', got {value!r}")
        return value


class GateConfig(StrictModel):
    """The publish gate: a version becomes ``latest`` only if its objective passes every bound.

    ``objective`` is ``module:function:TASK.METRIC``, the function one of the config's
    ``evaluators`` (:mod:`swudi.evaluators.objective`). With ``minimize: false`` (higher is better)
    the value must be ``>= at_least`` and ``>= reference - tolerance``; with ``minimize: true``
    ``<= at_most`` and ``<= reference + tolerance``. The reference (``no_worse_than``) is the base
    checkpoint's value or that of the version ``latest.json`` names (:mod:`swudi.publish.gate`).
    """

    objective: str = Field(description="module:function:TASK.METRIC, the function one of the config's evaluators")
    minimize: bool = Field(False, description="lower is better (a loss); default: higher is better")
    at_least: float | None = Field(None, description="the value must be at least this (higher is better)")
    at_most: float | None = Field(None, description="the value must be at most this (lower is better)")
    no_worse_than: Literal["base", "latest"] | None = Field(
        None, description="the value must not be worse than the base checkpoint's or the latest version's"
    )
    tolerance: float = Field(0.0, ge=0, description="how much worse than no_worse_than is still accepted")

    @field_validator("objective")
    @classmethod
    def _objective_form(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*:[^.\s]+(\.[^.\s]+)*\.[^.\s]+", value):
            raise ValueError(f"objective must be 'module:function:TASK.METRIC', got {value!r}")
        return value

    @model_validator(mode="after")
    def _some_bound(self) -> GateConfig:
        if self.at_least is None and self.at_most is None and self.no_worse_than is None:
            raise ValueError("a gate needs at least one of at_least, at_most, no_worse_than")
        if self.at_least is not None and self.minimize:
            raise ValueError("at_least is the bound of a score to maximize; with minimize: true give at_most")
        if self.at_most is not None and not self.minimize:
            raise ValueError("at_most is the bound of a loss (minimize: true); for a score give at_least")
        return self


class StorageRetryConfig(StrictModel):
    """How each storage request is retried before the merge fails (:mod:`swudi.storage.retry`).

    One S3 call makes at most ``2 x attempts`` requests, each waiting at most the connect and read
    timeouts, with exponential backoff between them; then the merge stops with a one-line error
    and publishes nothing.
    """

    attempts: int = Field(5, ge=1, le=20, description="requests per call (botocore standard retry mode)")
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="seconds to open a connection")
    read_timeout_s: float = Field(60.0, gt=0, le=3600, description="seconds without a byte of the response")


class ModelCardConfig(StrictModel):
    """Metadata of the model card (``README.md``) written into every published version."""

    base_model: str | None = Field(
        None,
        description="Hub id of the base (front matter base_model); default: the base config.json's "
        "_name_or_path when it is a Hub id, else the base URL",
    )
    title: str | None = Field(None, description="the card's heading; default: 'swudi merge <version>'")
    license: str | None = None
    language: str | list[str] | None = None
    tags: list[str] = Field(default_factory=list, description="added to merge, model-merging, swudi, <method>")


class PushToHubConfig(StrictModel):
    """Upload each published version to a Hugging Face Hub model repository (token: HF_TOKEN)."""

    repo_id: str = Field(description="owner/name of the model repository (created if missing)")
    revision: str = Field("main", description="branch to commit to (created if missing)")
    private: bool = Field(False, description="create the repository as private")

    @field_validator("repo_id")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", value):
            raise ValueError(f"repo_id must be 'owner/name', got {value!r}")
        return value


class MergeConfig(StrictModel):
    """A complete merge: inputs, method, output and execution settings."""

    base: Location = Field(description="base checkpoint: local path or fsspec URL")
    experts: list[Location] = Field(min_length=1, description="fine-tuned checkpoints of the same base")
    method: str = "swudi_a"
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    scale: float = Field(1.0, description="alpha in W = W0 + alpha * theta")
    post: str | None = Field(
        None, description="post-filter of every 2-D weight's theta after the method (`swudi methods`: svc)"
    )
    post_params: dict[str, Any] = Field(default_factory=dict, description="post-filter parameters")
    output: Location = Field(description="where versions are published (with a latest.json pointer)")
    work_dir: Location | None = Field(
        None, description="cache of decompositions and merged tensors; default: OUTPUT/.swudi-work"
    )
    include: list[str] = Field(default_factory=list, description="glob patterns forced to the matrix method")
    exclude: list[str] = Field(
        default_factory=list, description="glob patterns kept out of the matrix method (mean instead)"
    )
    keep_base: list[str] = Field(default_factory=list, description="glob patterns that keep the base value")
    orientation: dict[str, Literal["out_in", "in_out"]] = Field(
        default_factory=dict,
        description="glob pattern -> how its 2-D weights are stored: out_in ([out, in], nn.Linear) or in_out "
        "([in, out], Conv1D); first match wins, before the architecture's own (config.json model_type)",
    )
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
        description="WUDI interference that needs the task vectors (2N products of m x d x min(m, d) per "
        "weight, computed once while they are in memory): spectral methods' per-task values (their total comes "
        "from the decomposition anyway); elementwise methods' per-task values and total (false: none, and the "
        "merge costs what the elementwise rule costs)",
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
    storage_retry: StorageRetryConfig = Field(default_factory=StorageRetryConfig)
    evaluators: list[EvaluatorConfig] = Field(default_factory=list)
    keep_versions: int | None = Field(None, ge=1, description="published versions kept; None keeps all")
    model_card: ModelCardConfig = Field(default_factory=ModelCardConfig)
    push_to_hub: PushToHubConfig | None = Field(None, description="upload each published version to the Hub")
    gate: GateConfig | None = Field(
        None, description="publish gate: the objective a version must pass before latest.json moves to it"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_urls(cls, data: Any) -> Any:
        """A URL holding a credential (``user:password@``, ``?X-Amz-Signature=``, ``sig=``...) would be
        written into the card, the report, logs and Prefect's database: refused, naming the key."""
        if isinstance(data, dict):
            for where, text in _strings(data):
                found = url_secret(text)
                if found is not None:
                    raise ValueError(
                        f"{where}: the URL holds a credential ({found}); remove it and give credentials in "
                        "storage_options as a secret reference, e.g. storage_options: {secret: {from_env: NAME}} "
                        "(or the environment: AWS_ACCESS_KEY_ID, a profile)"
                    )
        return data

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(_size_value(value))

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | None:
        return None if value is None else parse_size(_size_value(value))

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, value: float) -> float:
        if value == 0:
            raise ValueError("scale 0 would publish the base model unchanged; use a non-zero alpha")
        return value

    @model_validator(mode="after")
    def _retry_in_storage_options(self) -> MergeConfig:
        """The retry policy travels with the storage options to every filesystem built from them."""
        options = {**self.storage_options, RETRY_KEY: self.storage_retry.model_dump()}
        object.__setattr__(self, "storage_options", options)
        return self

    @model_validator(mode="after")
    def _method_and_params(self) -> MergeConfig:
        from swudi.methods import validate_params

        object.__setattr__(self, "params", validate_params(self.method, self.params))
        if self.post is not None:
            from swudi.methods import validate_post_params

            object.__setattr__(self, "post_params", validate_post_params(self.post, self.post_params))
        elif self.post_params:
            raise ValueError("post_params given without a post-filter (set `post`, e.g. post: svc)")
        if self.gate is not None:  # its evaluator must be one of the evaluators (a typo fails here)
            from swudi.evaluators.objective import parse_objective

            parse_objective(self.gate.objective, self.evaluators, self.gate.minimize, where="gate.objective")
        check_locations(self.base, self.experts, self.output, self.resolved_work_dir)
        return self

    @model_validator(mode="after")
    def _task_experts_exist(self) -> MergeConfig:
        for evaluator in self.evaluators:
            for task, ref in evaluator.task_experts.items():
                if isinstance(ref, int) and not 0 <= ref < len(self.experts):
                    raise ValueError(
                        f"evaluator {evaluator.function}: task_experts.{task} is {ref}, "
                        f"not an expert index (0 to {len(self.experts) - 1})"
                    )
                if isinstance(ref, str) and ref not in self.experts:
                    raise ValueError(
                        f"evaluator {evaluator.function}: task_experts.{task} {ref!r} is not one of experts"
                    )
        return self

    @property
    def resolved_work_dir(self) -> str:
        """The work folder: ``work_dir`` or ``OUTPUT/.swudi-work``."""
        if self.work_dir:
            return self.work_dir
        return self.output.rstrip("/") + "/.swudi-work"


def _strings(value: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string of a raw config value with its dotted key (``experts[1]``, ``storage_options.endpoint_url``)."""
    if isinstance(value, str):
        return [(where or "(top level)", value)]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _strings(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [pair for i, item in enumerate(value) for pair in _strings(item, f"{where}[{i}]")]
    return []


def _size_value(value: Any) -> Any:
    """A size must be a whole number of bytes or a string such as '5GB' (not a boolean or a fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size in bytes or a string such as '5GB', got {value!r}")
    return value


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
            message = str(item["msg"]).removeprefix("Value error, ")
            lines.append(message if not item["loc"] else f"{where}: {message}")
    if len(lines) == 1:  # one problem, one line
        return f"invalid config {source}: {lines[0]}"
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
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping.

    A value that is not valid YAML, or a key given twice among the overrides, is a
    :class:`ConfigError` naming the override.
    """
    merged = dict(data)
    given: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted keys, e.g. params.t=300)")
        if key in given:
            raise ConfigError(f"--set {key} is given twice; give each key once")
        given.add(key)
        _set_dotted(merged, key, load_yaml(raw, f"--set {item!r}: the value") if raw.strip() else None)
    return merged


def _switch_method(file_data: dict[str, Any], data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Drop the file's ``params`` when the overrides change the method (module doc)."""
    if data.get("method", "swudi_a") == file_data.get("method", "swudi_a"):
        return data
    file_params = file_data.get("params") or {}
    from_overrides = apply_overrides({}, [o for o in overrides if o.split("=", 1)[0].strip().startswith("params.")])
    kept = from_overrides.get("params", {})
    if isinstance(data.get("params"), dict) and not any(o.split("=", 1)[0].strip() == "params" for o in overrides):
        dropped = sorted(set(file_params) - set(kept)) if isinstance(file_params, dict) else []
        if dropped:
            log.warning(
                "method switched from %s to %s on the command line: the config file's params %s are dropped "
                "(they belong to %s); give the new method's params with --set params.NAME=VALUE",
                file_data.get("method", "swudi_a"),
                data.get("method"),
                ", ".join(dropped),
                file_data.get("method", "swudi_a"),
            )
        data = {**data, "params": kept}
    return data


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
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {path} cannot be read: {error}") from None
    file_data = load_yaml(text, f"config {path}") or {}
    if not isinstance(file_data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(file_data, overrides or [])
    data = _switch_method(file_data, data, overrides or [])
    data = _resolve_local_paths(data, path.parent.resolve())
    return config_from_mapping(data, str(path))


def _resolve_local_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    def fix(url: Any) -> Any:
        if isinstance(url, str) and url.strip() and is_local_url(url) and not Path(url).is_absolute():
            return str((root / url).resolve())
        return url

    fixed = dict(data)
    for key in ("base", "output", "work_dir"):
        if key in fixed:
            fixed[key] = fix(fixed[key])
    if isinstance(fixed.get("experts"), list):
        fixed["experts"] = [fix(url) for url in fixed["experts"]]
    if isinstance(fixed.get("evaluators"), list):  # task_experts may name experts by their (relative) path
        fixed["evaluators"] = [_resolve_task_experts(e, fix) for e in fixed["evaluators"]]
    return fixed


def _resolve_task_experts(evaluator: Any, fix: Any) -> Any:
    if not isinstance(evaluator, dict) or not isinstance(evaluator.get("task_experts"), dict):
        return evaluator
    mapping = {task: fix(ref) if isinstance(ref, str) else ref for task, ref in evaluator["task_experts"].items()}
    return {**evaluator, "task_experts": mapping}
