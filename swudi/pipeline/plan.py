"""The merge plan: what happens to every tensor, decided from checkpoint headers alone.

``build_plan(config)`` opens the base and every expert (headers only), checks that they fit
together, routes each tensor (matrix method, mean, or base value) and groups the small tensors,
so that a bad input fails here, before any weight is read. The plan is a small, picklable record:
it carries each tensor's byte location in every checkpoint, so later steps read exactly the bytes
they need without reopening a checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from swudi.config.merge_config import MergeConfig
from swudi.core.routing import Route, matches_any, route_tensor
from swudi.errors import CheckpointError, ConfigError
from swudi.io.adapter import (
    ExpertInput,
    LoraAdapter,
    LoraFactors,
    expert_input,
    input_fingerprint,
    input_nbytes,
    open_expert,
    verify_base_layers,
)
from swudi.io.checkpoint import Checkpoint, TensorLocation
from swudi.io.fingerprint import digest
from swudi.io.header import torch_dtype
from swudi.io.validate import validate_checkpoints
from swudi.io.vocab import VocabPlan, base_vocab_size, plan_vocab, vocab_tensor_names
from swudi.io.writer import files_to_copy
from swudi.methods import get_method
from swudi.pipeline.code_version import merge_code
from swudi.storage.filesystem import resolve

log = logging.getLogger(__name__)

#: Small tensors (biases, norms, 1-D) are merged in groups of at most this many bytes per task,
#: so that a model with hundreds of them does not pay the per-task overhead hundreds of times.
GROUP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TensorJob:
    """One tensor of the merged model: its route and where its inputs are (per expert: the
    fine-tuned tensor, LoRA factors, or None when the expert leaves it at the base value)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the base checkpoint's safetensors dtype
    route: Route
    base: TensorLocation
    experts: tuple[ExpertInput, ...]

    @property
    def is_matrix(self) -> bool:
        """True for a 2-D weight merged by the method on its own (one layer task)."""
        return self.route == "method" and len(self.shape) == 2

    @property
    def input_key(self) -> str:
        """Digest of the exact inputs: the content fingerprints of this tensor in every checkpoint."""
        return digest(self.name, list(self.shape), self.base.fingerprint, [input_fingerprint(x) for x in self.experts])

    @property
    def lora_ranks(self) -> tuple[int | None, ...]:
        """Per expert: the LoRA rank of its update (0: unchanged), None for a full tensor."""
        return tuple(0 if x is None else x.rank if isinstance(x, LoraFactors) else None for x in self.experts)

    @property
    def factor_rank(self) -> int | None:
        """R = sum of the experts' LoRA ranks when this 2-D weight can be decomposed in factor
        space (every expert's update is LoRA factors or nothing, and R < min(m, d)); else None
        (the dense path: a full-tensor expert, or R >= min(m, d))."""
        ranks = self.lora_ranks
        if len(self.shape) != 2 or any(r is None for r in ranks):
            return None
        total = sum(r for r in ranks if r is not None)
        return total if total < min(self.shape) else None

    @property
    def nbytes(self) -> int:
        return self.base.nbytes


@dataclass(frozen=True)
class MergePlan:
    """Every tensor's job, in the base checkpoint's order, plus what identifies the inputs."""

    base_url: str
    expert_urls: tuple[str, ...]
    base_fingerprint: str
    expert_fingerprints: tuple[str, ...]
    jobs: tuple[TensorJob, ...]
    extra_files: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    header_bytes: tuple[int, ...] = field(default=())  # read to open (base, expert 0, ...)
    vocab: VocabPlan | None = None  # experts with more vocab rows than the base (:mod:`swudi.io.vocab`)

    def output_shape(self, job: TensorJob) -> tuple[int, ...]:
        """The shape of the tensor in the merged model: the job's, with the output vocabulary's
        rows for a vocab tensor of vocab-extended experts."""
        if self.vocab is not None and job.name in self.vocab.tensors:
            return (self.vocab.rows, *job.shape[1:])
        return job.shape

    @property
    def layer_jobs(self) -> list[TensorJob]:
        """2-D weights merged one task each (decomposition, rank, filter)."""
        return [job for job in self.jobs if job.is_matrix]

    @property
    def group_jobs(self) -> list[list[TensorJob]]:
        """The other merged tensors (mean, or an elementwise method), in groups of <= GROUP_BYTES."""
        groups: list[list[TensorJob]] = []
        size = 0
        for job in self.jobs:
            if job.is_matrix or job.route == "base":
                continue
            if not groups or size + job.nbytes > GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(job)
            size += job.nbytes
        return groups

    @property
    def inputs_fingerprint(self) -> str:
        """Digest of every input checkpoint's content fingerprint (order matters: expert order)."""
        return digest(self.base_fingerprint, list(self.expert_fingerprints))

    def counts(self) -> dict[str, int]:
        """Number of tensors per treatment."""
        out = {"layers": len(self.layer_jobs), "mean_or_elementwise": 0, "base": 0}
        for job in self.jobs:
            if job.route == "base":
                out["base"] += 1
            elif not job.is_matrix:
                out["mean_or_elementwise"] += 1
        return out


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def block_of(name: str) -> str:
    """The transformer block of a tensor: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``); a name without one is its own block."""
    match = _BLOCK.match(name)
    return match.group(1) if match else name


def layer_cost(job: TensorJob, num_experts: int) -> float:
    """Rough multiply-adds of merging one 2-D weight: C (or the thin SVD) plus its eigensolver."""
    m, d = job.shape
    if job.factor_rank is not None:
        return factor_space_cost(job.shape, job.factor_rank, num_experts)
    k = min(d, num_experts * m)
    return 2.0 * num_experts * m * d * k + 9.0 * k**3


def factor_space_cost(shape: tuple[int, ...], rank: int, num_experts: int) -> float:
    """Rough multiply-adds of a factor-space decomposition (:mod:`swudi.core.lowrank`): the QR of the
    stacked A's, the per-task Grams and products, the R x R eigensolver."""
    m, d = shape
    return 2.0 * d * rank**2 + 4.0 * m * rank**2 + 3.0 * num_experts * rank**3 + 9.0 * rank**3


def batch_blocks(jobs: list[TensorJob], num_experts: int, workers: int, per_worker: int = 4) -> list[list[TensorJob]]:
    """The 2-D weights to merge, as task batches: whole transformer blocks (:func:`block_of`), and
    consecutive blocks packed together until a batch reaches 1 / (``per_worker`` x ``workers``) of
    the total cost (so about ``per_worker`` tasks per worker). Large layers get one task per block; a
    model of tiny layers gets a handful of tasks instead of one per block, so orchestration stays a
    small part of the wall time. Resuming is per weight whatever the batching (each weight is its own
    artefact)."""
    blocks: dict[str, list[TensorJob]] = {}
    for job in jobs:
        blocks.setdefault(block_of(job.name), []).append(job)
    costs = {name: sum(layer_cost(job, num_experts) for job in block) for name, block in blocks.items()}
    target = sum(costs.values()) / max(1, per_worker * workers)
    batches: list[list[TensorJob]] = []
    cost = 0.0
    for name, block in blocks.items():
        if not batches or cost >= target:
            batches.append([])
            cost = 0.0
        batches[-1].extend(block)
        cost += costs[name]
    return batches


def task_svd_bytes(job: TensorJob) -> int:
    """Upper bound of the bytes of a weight's stored per-task SVDs (:mod:`swudi.core.task_svd`):
    4 (m + d + 1) k_i per expert, k_i = its LoRA rank, or min(m, d) for a full tensor (the numerical
    rank of a dense update is usually min(m, d)); 0 for an expert that leaves the weight unchanged."""
    m, d = job.shape[0], job.shape[1]
    ranks = [min(m, d) if r is None else r for r in job.lora_ranks]
    return 4 * (m + d + 1) * sum(ranks)


def task_memory_bytes(job: TensorJob, num_experts: int) -> int:
    """Rough peak bytes of merging one 2-D weight in a task: its raw inputs twice (this weight and
    the next one, read ahead), the float32 task vectors, C's eigen-pieces (3 x k x d floats,
    k = min(d, N m)) and a few m x d float32 results (S, D, theta, W)."""
    m, d = job.shape
    if job.factor_rank is not None:  # the factors, their float64 copies, and S, theta, W
        return 2 * (job.base.nbytes + 3 * (m + d) * job.factor_rank * 8) + 4 * 4 * m * d
    raw = (num_experts + 1) * job.base.nbytes
    k = min(d, num_experts * m)
    return 2 * raw + 4 * (num_experts * m * d + 3 * k * d + 4 * m * d)


#: Largest working set of one row chunk of a streamed tensor (inputs, float32 sums, results).
MAX_CHUNK_BYTES = 512 * 2**20


def row_chunks(shape: Sequence[int], bytes_per_row: int, max_bytes: int = MAX_CHUNK_BYTES) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges (dim 0) covering a tensor of ``shape``, each with a working set
    of at most ``max_bytes`` (``bytes_per_row`` per row; at least one row per chunk). A 0-d tensor,
    or one without rows, is a single chunk ``(0, 0)`` meaning "the whole tensor"."""
    rows = shape[0] if len(shape) else 0
    if rows == 0:
        return [(0, 0)]
    step = max(1, max_bytes // max(bytes_per_row, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def chunk_budget(config: MergeConfig) -> int:
    """Working-set bytes of one row chunk: half of ``memory_budget`` shared by the ``workers`` in
    flight, at most :data:`MAX_CHUNK_BYTES` and at least 1 MiB."""
    if config.memory_budget is None:
        return MAX_CHUNK_BYTES
    return max(2**20, min(MAX_CHUNK_BYTES, config.memory_budget // (2 * max(1, config.workers))))


def group_row_bytes(job: TensorJob, num_experts: int) -> int:
    """Working-set bytes per row of merging a group tensor: the row in every checkpoint (raw dtype)
    plus the merged row, and eight float32 rows (base, running sum, an expert and its task vector,
    theta, and the temporaries of W = W0 + scale * theta)."""
    rows = job.shape[0] if job.shape else 1
    raw = job.base.nbytes // max(rows, 1)
    elems = job.base.numel // max(rows, 1)
    return (num_experts + 2) * raw + 8 * 4 * elems


def workers_within_budget(plan: MergePlan, config: MergeConfig) -> int:
    """``workers``, lowered so that the tasks in flight fit ``memory_budget`` (never below 1).

    A group streams its tensors in row chunks (:func:`chunk_budget`), whatever their size.
    """
    if config.memory_budget is None:
        return config.workers
    n = len(plan.expert_urls)
    peaks = [task_memory_bytes(job, n) for job in plan.layer_jobs]
    # a group streams its tensors in row chunks: its peak is one chunk's working set
    peaks += [
        min(chunk_budget(config), group_row_bytes(job, n) * max(1, job.shape[0] if job.shape else 1))
        for group in plan.group_jobs
        for job in group
    ]
    peak = max(peaks, default=0)
    if peak > config.memory_budget:
        log.warning(
            "memory_budget %d B is below the largest task's estimate (%d B): one task at a time",
            config.memory_budget,
            peak,
        )
    fit = max(1, config.memory_budget // max(peak, 1))
    return min(config.workers, fit)


def check_inputs_exist(config: MergeConfig) -> None:
    """Fail fast, naming every checkpoint URL of the config that does not exist."""
    missing = []
    for role, url in [("base", config.base), *((f"expert {i}", u) for i, u in enumerate(config.experts))]:
        fs, path = resolve(url, config.storage_options)
        if not fs.exists(path):
            missing.append(f"{role}: {url}")
    if missing:
        raise CheckpointError("checkpoint(s) not found: " + "; ".join(missing))


def open_checkpoints(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint | LoraAdapter]]:
    """Open base and experts (full checkpoints or PEFT LoRA adapters) from their headers."""
    base = Checkpoint.open(config.base, config.storage_options)
    experts = [open_expert(url, config.storage_options) for url in config.experts]
    return base, experts


def build_plan(
    config: MergeConfig, checkpoints: tuple[Checkpoint, list[Checkpoint | LoraAdapter]] | None = None
) -> MergePlan:
    """Validate base + experts from their headers and route every tensor.

    Raises :class:`~swudi.errors.CheckpointMismatchError` listing every mismatch at once. A tensor
    that no expert changes (every expert a LoRA adapter that does not name it) keeps the base value
    (unless ``output_dtype`` asks for a cast: then it is merged, as zeros).
    """
    base, experts = checkpoints or open_checkpoints(config)
    names = _vocab_candidates(base, experts)
    warnings = validate_checkpoints(base, experts, names)
    vocab = plan_vocab(base, experts, names)
    verify_base_layers(base, experts, chunk_budget(config))
    jobs = []
    for name, loc in base.tensors.items():
        inputs = tuple(expert_input(expert, name) for expert in experts)
        if vocab is not None and name in vocab.tensors:  # the base's rows merge as any tensor does
            inputs = tuple(_base_rows(x, vocab.base_rows) for x in inputs)
        if config.output_dtype == "auto" and all(x is None for x in inputs):
            jobs.append(TensorJob(name, tuple(loc.shape), loc.dtype, "base", loc, inputs))
            continue
        route = route_tensor(
            name,
            loc.shape,
            torch_dtype(loc.dtype, base.url),
            config.method,
            config.include,
            config.exclude,
            config.keep_base,
        )
        jobs.append(TensorJob(name, tuple(loc.shape), loc.dtype, route, loc, inputs))
    warnings = [*warnings, *check_patterns(config, jobs)]
    plan = MergePlan(
        base.url,
        tuple(e.url for e in experts),
        base.fingerprint,
        tuple(e.fingerprint for e in experts),
        tuple(jobs),
        files_to_copy(base),  # the copy policy; a link out of the base folder is refused here
        tuple(warnings),
        tuple(c.header_bytes for c in (base, *experts)),
        vocab,
    )
    if config.output_format == "adapter" and (problems := adapter_output_problems(plan, config)):
        raise ConfigError(
            f"output_format: adapter: {len(problems)} tensor(s) cannot be written as a merged LoRA adapter:\n  "
            + "\n  ".join(problems)
        )
    log.info("plan: %d tensors (%s) from %d experts", len(jobs), plan.counts(), len(experts))
    return plan


def check_patterns(config: MergeConfig, jobs: Sequence[TensorJob]) -> list[str]:
    """Refuse routing patterns that leave the model unchanged or silently change the method.

    - ``keep_base`` covering every floating tensor: the version would be the base (refused as
      ``scale: 0`` is);
    - ``include`` / ``exclude`` leaving no tensor to the method (every tensor gets the plain mean of
      the task vectors, which the method did not ask for), unless the method is ``mean``;
    - a pattern of ``include``, ``exclude`` or ``keep_base`` that matches no tensor: named in the
      refusals above; otherwise a warning (returned, and logged) when another pattern matches.
    """
    names = [job.name for job in jobs]
    floating = [job for job in jobs if torch_dtype(job.dtype).is_floating_point]
    unmatched = [
        f"{key}: {pattern!r}"
        for key in ("include", "exclude", "keep_base")
        for pattern in getattr(config, key)
        if not any(matches_any(name, (pattern,)) for name in names)
    ]
    hint = f" ({'; '.join(unmatched)} matches no tensor: a typo?)" if unmatched else ""
    if config.keep_base and floating and all(job.route == "base" for job in floating):
        raise ConfigError(
            f"keep_base {config.keep_base} covers every tensor: the version would be the base model unchanged"
            f"{hint}; narrow keep_base"
        )
    if (
        (config.include or config.exclude)
        and config.method != "mean"
        and floating
        and not any(job.route == "method" for job in floating)
    ):
        raise ConfigError(
            f"include {config.include} / exclude {config.exclude} leave no tensor to {config.method}: every "
            f"tensor would get the plain mean of the task vectors{hint}; fix the patterns (tensor names look "
            f"like {names[0]!r}) or use method: mean"
        )
    patterns = len(config.include) + len(config.exclude) + len(config.keep_base)
    found = []
    if unmatched and len(unmatched) < patterns:
        found = [f"routing pattern {item} matches no tensor (the other patterns do): a typo?" for item in unmatched]
    elif unmatched:
        found = [f"routing pattern {item} matches no tensor: a typo?" for item in unmatched]
    for warning in found:
        log.warning("%s", warning)
    return found


def _vocab_candidates(base: Checkpoint, experts: Sequence[Checkpoint | LoraAdapter]) -> frozenset[str]:
    """The vocab tensors (:func:`swudi.io.vocab.vocab_tensor_names`) when a full-checkpoint expert
    has more rows in one of them than the base (the base's ``config.json`` is read only then), else
    none."""
    names = vocab_tensor_names(base, None)
    grown = any(
        isinstance(e, Checkpoint) and name in e.tensors and e.tensors[name].shape[:1] > base.tensors[name].shape[:1]
        for e in experts
        for name in names
    )
    return vocab_tensor_names(base, base_vocab_size(base)) if grown else frozenset()


def _base_rows(item: ExpertInput, rows: int) -> ExpertInput:
    """An expert's vocab tensor cut to the base's ``rows`` (LoRA inputs have the base's shape)."""
    if isinstance(item, TensorLocation) and item.shape[0] > rows:
        return item.rows(0, rows)
    return item


def output_dtype(config: MergeConfig, job: TensorJob) -> str:
    """The safetensors dtype a merged tensor is written in: the config's, or the base's ("auto").

    Integer and boolean tensors always keep the base dtype (they are never merged).
    """
    if config.output_dtype == "auto" or job.route == "base":
        return job.dtype
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[config.output_dtype]


def version_id(config: MergeConfig, plan: MergePlan, tune_id: str | None = None) -> str:
    """Identity of a merged model: inputs + method + parameters + treatment + the merge code.

    The same inputs merged with the same settings always get the same id, so a refresh with nothing
    changed finds its version already published. The evaluators (function and options) are part of
    the identity when there are any: their results are in the version's report, so adding one to an
    unchanged config publishes a version that carries them (the merged tensors are reused).
    So are the gate (a version refused by one gate may pass another) and, for the winner of
    ``swudi tune``, the tune's id (``tune_id``): its report carries the tuning table.
    """
    settings = {
        "method": config.method,
        "params": config.params,
        "scale": config.scale,
        "include": config.include,
        "exclude": config.exclude,
        "keep_base": config.keep_base,
        "output_dtype": config.output_dtype,
        "max_shard_size": config.max_shard_size,
        "max_rank": config.decomposition.max_rank,
    }
    if config.evaluators:  # the version's report holds their results: another set is another version
        # the relative settings only when used: ids of versions without them stay as they were
        settings["evaluators"] = [
            e.model_dump(exclude=None if e.relative else {"relative", "task_experts"}) for e in config.evaluators
        ]
    if config.output_format != "model":  # the version holds more files (keeps earlier ids unchanged)
        settings["output_format"] = config.output_format
    if config.post is not None:  # another merged update (keeps earlier ids unchanged)
        settings["post"] = {"name": config.post, "params": config.post_params}
    if config.gate is not None:  # its result is in the report (keeps earlier ids unchanged)
        settings["gate"] = config.gate.model_dump()
    if tune_id is not None:
        settings["tune"] = tune_id
    return digest(merge_code(config.method), plan.inputs_fingerprint, settings)[:16]


class TensorRow(TypedDict):
    """One tensor's row of :func:`describe_plan`; the last four only with LoRA experts."""

    name: str
    shape: list[int]
    dtype: str
    treatment: str  # "layer" (a 2-D weight merged by the method), a group route, or "base ..."
    adapter_ranks: NotRequired[list[int | None]]  # per expert; None: a full tensor
    path: NotRequired[str]  # "factor space" or "dense"
    decomposition_gflop: NotRequired[float]
    path_reason: NotRequired[str]  # why the dense path
    task_svd_bytes: NotRequired[int]  # per-task SVDs stored for a subspace method or a post-filter
    rows: NotRequired[dict[str, int]]  # vocab tensors of vocab-extended experts: merged, appended, padding


class PlanDescription(TypedDict):
    """:func:`describe_plan`: what a merge of this config would do, from headers alone (JSON-able)."""

    base: str
    experts: list[str]
    method: str
    params: dict[str, Any]
    scale: float
    counts: dict[str, int]  # tensors per treatment
    estimated_read_bytes: int
    estimated_decomposition_gflop: float
    post: str | None  # the post-filter (svc) applied after the method, if any
    post_params: dict[str, Any]
    estimated_task_svd_bytes: int  # per-task SVDs stored for subspace methods / post-filters (upper bound)
    warnings: list[str]
    vocab: NotRequired[dict[str, Any]]  # vocab-extended experts (VocabPlan.describe)
    tensors: list[TensorRow]


def describe_plan(config: MergeConfig, plan: MergePlan) -> PlanDescription:
    """A JSON-able summary of the plan: counts, estimated work and the per-tensor routes."""
    spec = get_method(config.method)
    n = len(plan.expert_urls)
    flops = 0.0
    read_bytes = 0
    svd_bytes = 0
    for job in plan.jobs:
        read_bytes += job.nbytes + sum(input_nbytes(x) for x in job.experts) if job.route != "base" else job.nbytes
        if job.is_matrix and spec.kind == "spectral":
            flops += layer_cost(job, n)  # C (or thin SVD) + eigensolver, or the factor-space work
        if job.is_matrix and (spec.kind == "subspace" or config.post is not None):
            svd_bytes += task_svd_bytes(job)
    described: PlanDescription = {
        "base": plan.base_url,
        "experts": list(plan.expert_urls),
        "method": config.method,
        "params": config.params,
        "scale": config.scale,
        "counts": plan.counts(),
        "estimated_read_bytes": read_bytes,
        "estimated_decomposition_gflop": round(flops / 1e9, 3),
        "post": config.post,
        "post_params": config.post_params,
        # the per-task SVDs a subspace method or a post-filter stores in WORK/task_svds (upper bound)
        "estimated_task_svd_bytes": svd_bytes,
        "warnings": list(plan.warnings),
        "tensors": [_describe_job(job, config, spec.kind, n, plan.vocab) for job in plan.jobs],
    }
    if plan.vocab is not None:
        described["vocab"] = plan.vocab.describe(plan.expert_urls)
    return described


def adapter_output_problems(plan: MergePlan, config: MergeConfig) -> list[str]:
    """Why the merged update cannot be a LoRA adapter of rank <= sum r_i (empty: it can)."""
    problems = []
    if plan.vocab is not None:
        problems.append(
            f"vocab-extended experts: the merged model has {plan.vocab.rows} vocab rows, the base "
            f"{plan.vocab.base_rows}; a LoRA adapter cannot add rows (use output_format: model)"
        )
    if get_method(config.method).kind != "spectral":
        problems.append(f"method {config.method!r} is not spectral: its merged update is not of low rank")
    if config.post is not None:
        problems.append(f"post-filter {config.post!r}: the merged update is not written from the decomposition")
    for job in plan.jobs:
        if job.route == "base":
            continue
        lora = any(isinstance(x, LoraFactors) for x in job.experts)
        if job.is_matrix and lora and not uses_factor_space(job, config):
            problems.append(
                f"{job.name}: merged on the dense path (a full tensor among the experts, or sum r_i too large)"
            )
        elif lora and not job.is_matrix:
            problems.append(f"{job.name}: a LoRA update merged as a group ({job.route}); include it or leave it out")
        elif job.is_matrix and not lora:
            problems.append(f"{job.name}: no expert gives LoRA factors (a full checkpoint among the experts?)")
    return problems


def uses_factor_space(job: TensorJob, config: MergeConfig) -> bool:
    """True when a spectral merge decomposes this weight in factor space (:mod:`swudi.core.lowrank`):
    LoRA factors (or nothing) from every expert, sum of ranks R < min(m, d), and no ``max_rank``
    below R (a cut decomposition is not factored)."""
    rank = job.factor_rank
    max_rank = config.decomposition.max_rank
    return job.is_matrix and rank is not None and (max_rank is None or max_rank >= rank)


def dense_path_reason(job: TensorJob, config: MergeConfig) -> str | None:
    """Why a 2-D weight with LoRA experts is merged densely (on B A), or None when it is not
    (factor space, or no LoRA expert at all).

    Spectral methods decompose in factor space when the sum of ranks is below min(m, d); subspace
    methods take each expert's SVD from its factors (any rank), unless a full tensor is among the
    experts or the method's maths needs dense matrices (its ``dense_reason``, e.g. ACE's d x d solve).
    """
    ranks = job.lora_ranks
    if not job.is_matrix or all(r is None for r in ranks):
        return None
    spec = get_method(config.method)
    if spec.kind == "subspace":
        if any(r is None for r in ranks):
            return "a full checkpoint or modules_to_save tensor among the experts"
        return spec.dense_reason
    if uses_factor_space(job, config):
        return None
    total = sum(r or 0 for r in ranks)
    if any(r is None for r in ranks):
        return "a full checkpoint or modules_to_save tensor among the experts"
    if total >= min(job.shape):
        return f"sum of ranks {total} >= min(m, d) = {min(job.shape)}"
    return f"decomposition.max_rank {config.decomposition.max_rank} < sum of ranks {total}"


def _describe_job(
    job: TensorJob, config: MergeConfig, kind: str, num_experts: int, vocab: VocabPlan | None = None
) -> TensorRow:
    """One tensor's row of the plan; with LoRA experts, their ranks and the decomposition path;
    for a vocab tensor of vocab-extended experts, its rows merged, appended and padding."""
    row: TensorRow = {
        "name": job.name,
        "shape": list(job.shape),
        "dtype": job.dtype,
        "treatment": "layer" if job.is_matrix else job.route,
    }
    if vocab is not None and job.name in vocab.tensors:
        row["shape"] = [vocab.rows, *job.shape[1:]]
        row["rows"] = {
            "merged": vocab.base_rows,
            "appended": sum(vocab.named),
            "padding": len(vocab.named) - sum(vocab.named),
        }
    ranks = job.lora_ranks
    if any(r is not None for r in ranks):
        row["adapter_ranks"] = list(ranks)  # per expert; None: a full tensor
        if job.route == "base" and all(x is None for x in job.experts):
            row["treatment"] = "base (no expert changes it)"
        elif job.is_matrix and kind in ("spectral", "subspace"):
            reason = dense_path_reason(job, config)
            row["path"] = "dense" if reason else "factor space"
            if kind == "spectral":
                row["decomposition_gflop"] = round(layer_cost(job, num_experts) / 1e9, 6)
            if reason:
                row["path_reason"] = reason
    if job.is_matrix and (kind == "subspace" or config.post is not None):
        row["task_svd_bytes"] = task_svd_bytes(job)
    return row
