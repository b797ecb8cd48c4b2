"""The steps of a merge, as plain functions over small records (no Prefect here).

A step is done when its artefact exists and is complete; the artefact is the only cache. Every
artefact is one safetensors file under the work folder, named by its key (a content digest of the
step's inputs, the settings it depends on and the code that computes it,
:mod:`swudi.code_version`), with its record in the file's metadata:

- ``WORK/decompositions/<key>.safetensors``: a :class:`~swudi.decomposition.Decomposition` of one
  2-D weight (spectral methods). Hyperparameter-free: every t, rank rule, init and scale reuses it.
- ``WORK/deltas/<key>.safetensors``: merged task vectors theta (float32, before the scale) of the
  tensors that are not filtered from a decomposition: groups of tensors outside the matrix method
  (mean, elementwise methods; embeddings and lm_head stream through in row chunks) and the 2-D
  weights of iterative and elementwise methods.
- ``WORK/merged/<key>.safetensors``: the merged tensors ``W = W0 + scale * theta`` in the output
  dtype, plus the :class:`MergedRecord` (ranks, diagnostics, bytes read) in the metadata.

The read floor: a first merge reads each input tensor of each checkpoint once (one range read),
in the step that builds the decomposition or delta; the merged tensor is made from the task
vectors still in memory. A later merge that changes only method parameters, the rank rule or the
scale reads the stored decomposition (or delta) and the base weight, and no expert tensor.
A missing or damaged artefact is recomputed, never handed on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from swudi.checkpoint import Checkpoint, TensorLocation, join_url, read_tensor, save_tensors
from swudi.checkpoint.adapter import ExpertInput, LoraFactors, input_nbytes
from swudi.checkpoint.artifacts import exists as artefact_exists
from swudi.checkpoint.fingerprint import digest
from swudi.checkpoint.header import torch_dtype
from swudi.checkpoint.storage import is_local, is_local_url, resolve
from swudi.checkpoint.writer import TensorData, TensorSpec, safetensors_stream
from swudi.code_version import decomposition_code, merge_code
from swudi.config import MergeConfig
from swudi.decomposition import Decomposition, decompose
from swudi.diagnostics import interference_from_decomposition, interference_from_factors, interference_vs_sum
from swudi.errors import CheckpointError, InputError
from swudi.lowrank import decompose_factors
from swudi.methods import get_method, merge_elementwise, merge_matrix, spectral_filter
from swudi.plan import (
    TensorJob,
    chunk_budget,
    dense_path_reason,
    group_row_bytes,
    output_dtype,
    row_chunks,
    uses_factor_space,
)
from swudi.spectral import apply_filter
from swudi.task_vectors import ExpertValue, LowRank, MeanAccumulator, merged_weight, stack_task_vectors

log = logging.getLogger(__name__)

DECOMPOSITIONS, DELTAS, MERGED = "decompositions", "deltas", "merged"
ARTEFACT_KINDS = (DECOMPOSITIONS, DELTAS, MERGED)
MERGED_FORMAT, DELTA_FORMAT, RECORD_FORMAT_VERSION = "swudi.merged", "swudi.delta", "1"


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class MergedRecord:
    """Merged tensors written to one artefact (a 2-D weight, or a group of small tensors).

    ``bytes_read`` counts the tensor bytes this step read from (base, expert 0, ..., expert N-1);
    ``work_bytes_read`` the bytes of stored decompositions and deltas it read. A record loaded from
    an existing artefact keeps the figures of the run that computed it (``computed_in``).
    """

    key: str
    url: str
    names: tuple[str, ...]
    method: str
    rank: int | None = None
    kept_mass: float | None = None
    interference: float | None = None  # L(theta) / L(sum of task vectors), WUDI loss
    task_interference: tuple[float | None, ...] | None = None  # the same ratio per task
    decomposition_url: str | None = None
    decomposed: bool = False  # this step read the experts and built the decomposition / delta
    seconds: float = 0.0
    decompose_seconds: float = 0.0
    bytes_read: tuple[int, ...] = ()
    work_bytes_read: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)
    computed_in: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergedRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("not a merged record")
        for name in ("names", "bytes_read", "task_interference"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


@dataclass(frozen=True)
class RankChoice:
    """What a spectral method keeps of one weight: its filter, the rank (non-zero f_k) and their
    share of trace(C). The merge applies exactly this filter."""

    filter: torch.Tensor
    rank: int
    kept_mass: float


#: The phases a step's time is split into (``MergedRecord.phases``).
PHASES = ("read", "decompose", "merge", "diagnostics", "write")


@dataclass
class _Cost:
    """What one step costs: tensor bytes read per input checkpoint, artefact bytes read, and
    seconds per phase (:data:`PHASES`)."""

    inputs: list[int]
    work: int = 0
    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def tensor(self, index: int, location: Any, storage_options: Mapping[str, Any]) -> torch.Tensor:
        self.inputs[index] += location.nbytes
        with self.phase("read"):
            return read_tensor(location, storage_options)

    def expert(self, index: int, item: ExpertInput, storage_options: Mapping[str, Any]) -> ExpertValue:
        """Expert ``index``'s value of a tensor (checkpoint index ``index + 1``)."""
        if item is None:
            return None
        if isinstance(item, LoraFactors):
            a, b = self.tensors([item.a, item.b], storage_options, owners=[index + 1] * 2)
            return lora_update(item, a, b)
        return self.tensor(index + 1, item, storage_options)

    def inputs_of(self, job: TensorJob, storage_options: Mapping[str, Any]) -> tuple[torch.Tensor, list[ExpertValue]]:
        """(base tensor, each expert's value) of one tensor: all its range reads issued together."""
        locations: list[TensorLocation] = [job.base]
        owners = [0]
        for i, item in enumerate(job.experts):
            parts = [item.a, item.b] if isinstance(item, LoraFactors) else [] if item is None else [item]
            locations += parts
            owners += [i + 1] * len(parts)
        read = iter(self.tensors(locations, storage_options, owners))
        base = next(read)
        values: list[ExpertValue] = []
        for item in job.experts:
            if item is None:
                values.append(None)
            elif isinstance(item, LoraFactors):
                a, b = next(read), next(read)
                values.append(lora_update(item, a, b))
            else:
                values.append(next(read))
        return base, values

    def tensors(
        self, locations: Sequence[Any], storage_options: Mapping[str, Any], owners: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """One tensor from each checkpoint (base first; ``owners``: the checkpoint index of each
        location when not one each): remote reads run concurrently, one range request each, so
        reading a weight from N + 1 checkpoints costs about one round trip."""
        for index, location in zip(owners or range(len(locations)), locations, strict=True):
            self.inputs[index] += location.nbytes
        with self.phase("read"):
            if all(is_local_url(location.shard_url) for location in locations):
                return [read_tensor(location, storage_options) for location in locations]  # local: pread
            return list(_READ_POOL.map(lambda location: read_tensor(location, storage_options), locations))


def lora_update(factors: LoraFactors, a: torch.Tensor, b: torch.Tensor) -> LowRank:
    """tau = scaling * B @ A as float32 factors (the scaling folded into B; transposed layers and
    embeddings: tau = (scaling * B @ A)^T = A^T (scaling * B)^T)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32) * factors.scaling
    if factors.transposed:
        return LowRank(a32.T.contiguous(), b32.T.contiguous())
    return LowRank(b32, a32)


#: Concurrent range reads of remote tensors (shared by the tasks of a process; I/O bound).
_READ_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="swudi-read")


# ------------------------------------------------------------------------------------------ keys
def decomposition_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of a decomposition: the layer's inputs, the decomposition options and code."""
    return digest(
        "decompose", decomposition_code(), job.input_key, config.decomposition.max_rank, config.decomposition.route
    )


def _rule(jobs: Sequence[TensorJob], config: MergeConfig) -> Any:
    """What decides theta of these tensors: the method and its parameters, or the mean."""
    if any(job.route == "method" for job in jobs):
        return [config.method, config.params]
    return "mean"


def delta_key(jobs: Sequence[TensorJob], config: MergeConfig) -> str:
    """Identity of merged task vectors theta (before the scale): inputs, rule and code."""
    return digest("delta", merge_code(config.method), [(j.input_key, j.route) for j in jobs], _rule(jobs, config))


def layer_merge_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of one merged 2-D weight: inputs, method, parameters, scale, output dtype and code."""
    return digest(
        "merge-layer",
        merge_code(config.method),
        job.input_key,
        config.method,
        config.params,
        config.scale,
        output_dtype(config, job),
        config.decomposition.max_rank,
        config.decomposition.route,
    )


def group_merge_key(jobs: Sequence[TensorJob], config: MergeConfig) -> str:
    """Identity of a merged group of small tensors."""
    return digest(
        "merge-group",
        merge_code(config.method),
        [(j.input_key, j.route, output_dtype(config, j)) for j in jobs],
        _rule(jobs, config),
        config.scale,
    )


def artefact_url(config: MergeConfig, kind: str, key: str) -> str:
    """``WORK/<kind>/<key>.safetensors``."""
    return join_url(config.resolved_work_dir, kind, f"{key}.safetensors")


# ----------------------------------------------------------------------------------- artefacts
def _open_artefact(url: str, config: MergeConfig, fmt: str | None, key: str) -> Checkpoint | None:
    """The artefact at ``url`` opened from its header; None if missing or damaged (logged)."""
    try:
        artefact = Checkpoint.open(url, config.storage_options)
    except CheckpointError as error:
        if "not found" not in str(error) and "no such checkpoint" not in str(error):
            log.warning("damaged artefact %s is recomputed: %s", url, error)
        return None
    meta = artefact.metadata
    if meta.get("key") != key or (
        fmt is not None and (meta.get("format"), meta.get("format_version")) != (fmt, RECORD_FORMAT_VERSION)
    ):
        log.warning("artefact %s is not the %s with key %s; it is recomputed", url, fmt or "artefact", key)
        return None
    return artefact


def load_merged_record(url: str, key: str, config: MergeConfig) -> MergedRecord | None:
    """The record of a complete merged artefact (header read only), or None if it must be computed."""
    artefact = _open_artefact(url, config, MERGED_FORMAT, key)
    if artefact is None:
        return None
    try:
        record = MergedRecord.from_json(artefact.metadata["record"])
    except (KeyError, ValueError, TypeError) as error:
        log.warning("artefact %s has an unreadable record (%s); it is recomputed", url, error)
        return None
    if record.key != key or set(record.names) != set(artefact.tensors):
        log.warning("artefact %s does not hold the tensors its record names; it is recomputed", url)
        return None
    return dataclasses.replace(record, url=url)


def list_artefacts(config: MergeConfig, kind: str) -> dict[str, dict[str, Any]]:
    """``{key: {"size": bytes, "mtime": seconds or None}}`` of one kind of artefact (one listing)."""
    fs, path = resolve(join_url(config.resolved_work_dir, kind), config.storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not name.endswith(".safetensors"):
            continue
        when = entry.get("mtime", entry.get("LastModified"))
        out[name.removesuffix(".safetensors")] = {
            "size": int(entry.get("size") or 0),
            "mtime": when.timestamp() if hasattr(when, "timestamp") else (float(when) if when else None),
        }
    return out


def find_merged(keys: Iterable[str], config: MergeConfig) -> dict[str, MergedRecord]:
    """Records of the merged artefacts that already exist for ``keys`` (one listing, then headers).

    This is what makes a re-run cheap: work whose artefact is complete is never submitted.
    """
    wanted = set(keys)
    present = [key for key in list_artefacts(config, MERGED) if key in wanted]
    if not present:
        return {}

    def load(key: str) -> tuple[str, MergedRecord | None]:
        return key, load_merged_record(artefact_url(config, MERGED, key), key, config)

    fs, _ = resolve(config.resolved_work_dir, config.storage_options)
    workers = 1 if is_local(fs) else 16
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(pool.map(load, present))
    return {key: record for key, record in found.items() if record is not None}


def _save_merged(record: MergedRecord, tensors: Mapping[str, torch.Tensor], config: MergeConfig) -> None:
    metadata = {
        "format": MERGED_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "key": record.key,
        "record": record.to_json(),
    }
    save_tensors(record.url, tensors, metadata, config.storage_options)


def _load_decomposition(url: str, key: str, config: MergeConfig, reads: _Cost) -> Decomposition | None:
    artefact = _open_artefact(url, config, None, key)
    if artefact is None:
        return None
    try:
        with reads.phase("read"):
            tensors = artefact.state_dict()
        reads.work += sum(loc.nbytes for loc in artefact.tensors.values())
        return Decomposition.from_tensors(tensors, dict(artefact.metadata))
    except (CheckpointError, InputError) as error:
        log.warning("damaged decomposition %s is recomputed: %s", url, error)
        return None


def _open_delta(url: str, key: str, names: Sequence[str], config: MergeConfig) -> Checkpoint | None:
    """The delta artefact at ``url`` opened from its header, if complete and holding ``names``."""
    artefact = _open_artefact(url, config, DELTA_FORMAT, key)
    if artefact is not None and set(artefact.tensors) != set(names):
        log.warning("delta %s does not hold the expected tensors; it is recomputed", url)
        return None
    return artefact


def _load_delta(
    url: str, key: str, names: Sequence[str], config: MergeConfig, reads: _Cost
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    artefact = _open_delta(url, key, names, config)
    if artefact is None:
        return None
    try:
        info = json.loads(artefact.metadata.get("diagnostics", "{}"))
        with reads.phase("read"):
            tensors = artefact.state_dict()
    except (CheckpointError, ValueError) as error:
        log.warning("damaged delta %s is recomputed: %s", url, error)
        return None
    reads.work += sum(loc.nbytes for loc in artefact.tensors.values())
    return tensors, info


# ------------------------------------------------------------------------------------------ reads
def sources_of(job: TensorJob) -> tuple[str, ...]:
    """The files holding ``job``'s tensor: base first, then each expert (named in input errors)."""
    return (job.base.shard_url, *(_source(item) for item in job.experts))


def _source(item: ExpertInput) -> str:
    if item is None:
        return "(an adapter that leaves this weight unchanged)"
    return item.a.shard_url if isinstance(item, LoraFactors) else item.shard_url


def read_task_vectors(
    job: TensorJob, config: MergeConfig, reads: _Cost | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, task vectors ``[N, ...]`` float32): one range read per checkpoint (two for
    LoRA factors), concurrent for remote checkpoints; LoRA updates are formed densely here."""
    reads = reads or _Cost([0] * (len(job.experts) + 1))
    base, experts = reads.inputs_of(job, config.storage_options)
    return base, stack_task_vectors(base, experts, job.name, sources=sources_of(job))


# ------------------------------------------------------------------------------------------ steps
def rank_choice(dec: Decomposition, config: MergeConfig) -> RankChoice:
    """The spectral method's filter for one weight, the rank it keeps and that rank's eigenvalue mass."""
    f = spectral_filter(dec.eigenvalues, dec.shape, config.method, **config.params)
    kept = f > 0
    total = float(dec.eigenvalues.sum())
    kept_mass = float(dec.eigenvalues[kept].sum()) / total if total > 0 else 0.0
    return RankChoice(f, 0 if dec.all_zero else int(kept.sum()), kept_mass)


def decompose_layer(
    job: TensorJob,
    config: MergeConfig,
    reads: _Cost,
    prefetched: tuple[torch.Tensor, list[ExpertValue]] | None = None,
) -> tuple[Decomposition, str, tuple[torch.Tensor, torch.Tensor | list[LowRank]] | None, float]:
    """The layer's decomposition: the stored one, or read the inputs once, decompose and store it.

    ``prefetched``: (base, each expert's value), already read (:func:`merge_layers`). LoRA experts
    whose factors fit (:func:`~swudi.plan.uses_factor_space`) are decomposed in factor space
    (:func:`~swudi.lowrank.decompose_factors`), never forming their dense task vectors.
    Returns (decomposition, its URL, (base, task vectors or their factors) when they were read,
    seconds spent).
    """
    key = decomposition_key(job, config)
    url = artefact_url(config, DECOMPOSITIONS, key)
    dec = _load_decomposition(url, key, config, reads)
    if dec is not None:
        return dec, url, None, 0.0
    start = time.perf_counter()
    base, experts = prefetched if prefetched is not None else reads.inputs_of(job, config.storage_options)
    task_vectors: torch.Tensor | list[LowRank]
    if uses_factor_space(job, config):
        m, d = job.shape
        # uses_factor_space: every expert gives LoRA factors or leaves the weight unchanged
        task_vectors = [x if isinstance(x, LowRank) else LowRank(torch.zeros(m, 0), torch.zeros(0, d)) for x in experts]
        with reads.phase("decompose"):
            dec = decompose_factors(task_vectors, name=job.name, device=config.device)
    else:
        if reason := dense_path_reason(job, config):
            log.info("%s: LoRA experts merged on the dense path: %s", job.name, reason)
        task_vectors = stack_task_vectors(base, experts, job.name, sources=sources_of(job))
        with reads.phase("decompose"):
            dec = decompose(
                task_vectors,
                name=job.name,
                max_rank=config.decomposition.max_rank,
                device=config.device,
                route=config.decomposition.route,
            )
    tensors, metadata = dec.to_tensors()
    with reads.phase("write"):
        save_tensors(url, tensors, {**metadata, "key": key}, config.storage_options)
    return dec, url, (base, task_vectors), time.perf_counter() - start


@dataclass
class _Prefetched:
    """A weight read from every checkpoint ahead of its turn, with what reading it cost."""

    cost: _Cost
    inputs: tuple[torch.Tensor, list[ExpertValue]]


def _prefetch(job: TensorJob, config: MergeConfig) -> _Prefetched | None:
    """Read the weight from every checkpoint if its merge will need the inputs (spectral method,
    neither the merged tensor nor the decomposition stored); None otherwise."""
    if get_method(config.method).kind != "spectral":
        return None
    for url in (
        artefact_url(config, MERGED, layer_merge_key(job, config)),
        artefact_url(config, DECOMPOSITIONS, decomposition_key(job, config)),
    ):
        if artefact_exists(url, config.storage_options):
            return None
    cost = _Cost([0] * (len(job.experts) + 1))
    return _Prefetched(cost, cost.inputs_of(job, config.storage_options))


def merge_layers(jobs: Sequence[TensorJob], config: MergeConfig, run_id: str = "") -> list[MergedRecord]:
    """:func:`merge_layer` for each weight, in order, reading the next weight's inputs while the
    current one is decomposed and merged (one weight ahead: at most two weights' inputs in memory)."""
    records: list[MergedRecord] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="swudi-prefetch") as pool:
        ahead = pool.submit(_prefetch, jobs[0], config) if jobs else None
        for i, job in enumerate(jobs):
            prefetched = ahead.result() if ahead is not None else None
            ahead = pool.submit(_prefetch, jobs[i + 1], config) if i + 1 < len(jobs) else None
            records.append(merge_layer(job, config, run_id, prefetched))
    return records


def merge_layer(
    job: TensorJob, config: MergeConfig, run_id: str = "", prefetched: _Prefetched | None = None
) -> MergedRecord:
    """Merge one 2-D weight: W = W0 + scale * theta, stored in the output dtype (see the module doc).

    Spectral methods: decompose (or load the decomposition), select the rank, apply that filter;
    the total interference comes from the decomposition. Other methods: theta from the task
    vectors (or the stored delta). Per-task interference is computed when the task vectors are in
    memory anyway (the step that read them), never by a second read.
    """
    key = layer_merge_key(job, config)
    url = artefact_url(config, MERGED, key)
    done = load_merged_record(url, key, config)
    if done is not None:
        return done
    reads = prefetched.cost if prefetched is not None else _Cost([0] * (len(job.experts) + 1))
    # a prefetched weight was read while the previous one was computed: its time is its read phase
    # plus what happens from here on, not the wait since the read was queued
    started = time.perf_counter() - (reads.phases.get("read", 0.0) if prefetched is not None else 0.0)
    spec = get_method(config.method)
    rank: RankChoice | None = None
    dec_url: str | None = None
    decompose_seconds = 0.0
    inputs: tuple[torch.Tensor, torch.Tensor | list[LowRank] | None] | None  # (base, task vectors) when in memory
    interference: dict[str, Any]  # {"total": float | None, "per_task": list[float | None] | None}
    if spec.kind == "spectral":
        dec, dec_url, inputs, decompose_seconds = decompose_layer(
            job, config, reads, prefetched.inputs if prefetched is not None else None
        )
        init = str(config.params.get("init", "sum"))
        with reads.phase("merge"):
            rank = rank_choice(dec, config)
            theta = apply_filter(dec, rank.filter, init, device=config.device)
        with reads.phase("diagnostics"):
            interference = {
                "total": interference_from_decomposition(dec, rank.filter, init, config.device),
                "per_task": None,
            }
    else:
        delta = _delta(job, config, reads)
        theta, interference = delta.theta, dict(delta.diagnostics)
        inputs = (delta.base, delta.task_vectors) if delta.base is not None else None
    if (
        config.per_task_diagnostics
        and inputs is not None
        and inputs[1] is not None
        and interference.get("per_task") is None
    ):
        # the per-task values need the task vectors: only while they are in memory; the total
        # stays the decomposition's, so a layer reports the same total however it was computed
        with reads.phase("diagnostics"):
            if isinstance(inputs[1], list):  # LoRA factors: per task in factor space
                assert rank is not None
                init = str(config.params.get("init", "sum"))
                found = interference_from_factors(dec, rank.filter, init, inputs[1], config.device)
            else:
                found = interference_vs_sum(theta, inputs[1], config.device)
            interference["per_task"] = found["per_task"]
    base = inputs[0] if inputs is not None else reads.tensor(0, job.base, config.storage_options)
    with reads.phase("merge"):
        merged = merged_weight(base, theta, config.scale, torch_dtype(output_dtype(config, job)), name=job.name)
    per_task = interference.get("per_task")
    record = MergedRecord(
        key,
        url,
        (job.name,),
        config.method,
        rank=rank.rank if rank else None,
        kept_mass=rank.kept_mass if rank else None,
        interference=interference.get("total"),
        task_interference=tuple(per_task) if per_task is not None else None,
        decomposition_url=dec_url,
        decomposed=inputs is not None,
        seconds=time.perf_counter() - started,
        decompose_seconds=decompose_seconds,
        bytes_read=tuple(reads.inputs),
        work_bytes_read=reads.work,
        phases=reads.phases,
        computed_in=run_id,
    )
    with reads.phase("write"):
        _save_merged(record, {job.name: merged}, config)
    return record


@dataclass
class _Delta:
    """theta of one 2-D weight (float32, before the scale), and the inputs still in memory when
    they were just read (None when theta was loaded from storage)."""

    theta: torch.Tensor
    diagnostics: dict[str, Any]  # interference of the weight
    base: torch.Tensor | None = None
    task_vectors: torch.Tensor | None = None


def _delta(job: TensorJob, config: MergeConfig, reads: _Cost) -> _Delta:
    """theta of a 2-D weight under a non-spectral method: the stored delta, or computed and stored."""
    key = delta_key([job], config)
    url = artefact_url(config, DELTAS, key)
    stored = _load_delta(url, key, [job.name], config, reads)
    if stored is not None:
        tensors, info = stored
        return _Delta(tensors[job.name], info)
    base, task_vectors = read_task_vectors(job, config, reads)
    with reads.phase("merge"):
        theta = merge_matrix(task_vectors, config.method, name=job.name, device=config.device, **config.params)
        theta = theta.to(torch.float32).contiguous()
    with reads.phase("diagnostics"):
        diagnostics = interference_vs_sum(theta, task_vectors, config.device)
    metadata = {
        "format": DELTA_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "key": key,
        "diagnostics": json.dumps(diagnostics),
    }
    with reads.phase("write"):
        save_tensors(url, {job.name: theta}, metadata, config.storage_options)
    return _Delta(theta, diagnostics, base, task_vectors)


def _group_theta_rows(
    job: TensorJob, config: MergeConfig, reads: _Cost, stored: Checkpoint | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base rows, theta rows float32) of one group tensor, row chunk by row chunk.

    Route "mean": theta = (1/N) sum_i (E_i - W0), computed per row chunk (exact: the rule is
    elementwise), so a tensor of any size (embeddings, lm_head) and any N streams through a bounded
    working set (:func:`swudi.plan.chunk_budget`). Route "method" (an elementwise method's own rule,
    which may look at the whole tensor, e.g. TIES' magnitude threshold): one chunk, the whole tensor.
    ``stored``: the group's delta artefact, whose theta rows are read instead of the experts.
    """
    n = len(job.experts)
    if job.route == "mean":
        chunks = row_chunks(job.shape, group_row_bytes(job, n), chunk_budget(config))
    else:
        chunks = [(0, 0)]

    def rows(location: TensorLocation, start: int, stop: int) -> TensorLocation:
        return location if stop == 0 else location.rows(start, stop)

    # LoRA experts of this tensor (e.g. an embedding adapter): their factors are small, read once;
    # each chunk takes the rows of B (tau[rows] = B[rows] A)
    factors: dict[int, LowRank] = {}
    for i, item in enumerate(job.experts):
        if stored is None and isinstance(item, LoraFactors):
            a, b = reads.tensors([item.a, item.b], config.storage_options, owners=[i + 1, i + 1])
            factors[i] = lora_update(item, a, b)

    for start, stop in chunks:
        if stored is not None:
            base = reads.tensor(0, rows(job.base, start, stop), config.storage_options)
            where = rows(stored.location(job.name), start, stop)
            reads.work += where.nbytes
            with reads.phase("read"):
                theta = read_tensor(where, config.storage_options)
            yield base, theta
            continue
        dense = [(i, item) for i, item in enumerate(job.experts) if isinstance(item, TensorLocation)]
        base, *got = reads.tensors(
            [rows(job.base, start, stop), *(rows(item, start, stop) for _, item in dense)],
            config.storage_options,
            owners=[0, *(i + 1 for i, _ in dense)],
        )
        experts: list[ExpertValue] = [None] * n  # None: an adapter that leaves the tensor unchanged
        for (i, _), tensor in zip(dense, got, strict=True):
            experts[i] = tensor
        for i, update in factors.items():
            experts[i] = update if stop == 0 else LowRank(update.b[start:stop], update.a)
        del got
        with reads.phase("merge"):
            if job.route == "mean":
                acc = MeanAccumulator(base, job.name, sources=sources_of(job))
                for i, expert in enumerate(experts):
                    acc.add(i, expert)
                theta = acc.mean()
            else:
                task_vectors = stack_task_vectors(base, experts, job.name, sources=sources_of(job))
                theta = merge_elementwise(task_vectors, config.method, name=job.name, **config.params)
        del experts
        yield base, theta.to(torch.float32).contiguous()


def merge_group(jobs: Sequence[TensorJob], config: MergeConfig, run_id: str = "") -> MergedRecord:
    """Merge a group of tensors that are not 2-D layer weights (biases, norms, embeddings, lm_head,
    excluded weights): W = W0 + scale * theta per tensor, in the output dtype.

    theta: route "mean" gives the mean of the task vectors; route "method" (elementwise methods
    only) the method's own rule. Each tensor streams in row chunks (:func:`_group_theta_rows`):
    theta goes to the group's delta artefact and W to its merged artefact as they are computed, so
    memory is bounded whatever the vocabulary or the number of experts. A stored delta is reused: a
    new scale reads no expert tensor. Both files appear only when complete (delta first).

    The stored record is written in the merged artefact's header, before its data: it carries what
    was read, not the seconds spent (the record this function returns has both).
    """
    key = group_merge_key(jobs, config)
    url = artefact_url(config, MERGED, key)
    done = load_merged_record(url, key, config)
    if done is not None:
        return done
    n = len(jobs[0].experts)
    reads = _Cost([0] * (n + 1))
    names = [job.name for job in jobs]
    dkey = delta_key(jobs, config)
    durl = artefact_url(config, DELTAS, dkey)
    stored = _open_delta(durl, dkey, names, config)
    planned = [sum(job.base.nbytes for job in jobs)] + [
        0 if stored is not None else sum(input_nbytes(job.experts[i]) for job in jobs) for i in range(n)
    ]
    planned_work = sum(loc.nbytes for loc in stored.tensors.values()) if stored is not None else 0
    record = MergedRecord(
        key,
        url,
        tuple(names),
        config.method,
        decomposed=stored is None,
        bytes_read=tuple(planned),
        work_bytes_read=planned_work,
        computed_in=run_id,
    )
    merged_metadata = {
        "format": MERGED_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "key": key,
        "record": record.to_json(),
    }
    by_name = {job.name: job for job in jobs}
    out_specs = [TensorSpec(job.name, output_dtype(config, job), job.shape) for job in jobs]
    with contextlib.ExitStack() as files:
        fs, path = resolve(url, config.storage_options)
        merged_file = files.enter_context(safetensors_stream(fs, path, out_specs, merged_metadata, url))
        delta_file = None
        if stored is None:  # entered last, so it is complete (closed) before the merged file
            dfs, dpath = resolve(durl, config.storage_options)
            delta_specs = [TensorSpec(spec.name, "F32", spec.shape) for spec in merged_file.order]
            delta_meta = {"format": DELTA_FORMAT, "format_version": RECORD_FORMAT_VERSION, "key": dkey}
            delta_file = files.enter_context(safetensors_stream(dfs, dpath, delta_specs, delta_meta, durl))
        for spec in merged_file.order:
            job = by_name[spec.name]
            dtype = torch_dtype(spec.dtype)
            for base, theta in _group_theta_rows(job, config, reads, stored):
                with reads.phase("merge"):
                    merged = merged_weight(base, theta, config.scale, dtype, name=job.name)
                with reads.phase("write"):
                    if delta_file is not None:
                        delta_file.write(job.name, theta)
                    merged_file.write(job.name, merged)
                del base, theta, merged
            if delta_file is not None:
                delta_file.finish_tensor(job.name)
            merged_file.finish_tensor(job.name)
        if tuple(reads.inputs) != record.bytes_read or reads.work != record.work_bytes_read:  # before the commit
            raise CheckpointError(f"{url}: read {reads.inputs} + {reads.work} B, planned {planned} + {planned_work} B")
    return dataclasses.replace(record, seconds=time.perf_counter() - reads.started, phases=reads.phases)


# ------------------------------------------------------------------------------------ publishing
class MergedTensorReader:
    """``read(name) -> Tensor or its row chunks`` over the merged artefacts, falling back to the base
    tensor.

    Artefacts are opened from their headers once and read one tensor at a time, a large tensor
    (embeddings, lm_head) in row chunks, so publishing holds at most one chunk in memory.
    ``base_bytes_read`` counts the base tensors read (those kept at the base value);
    ``work_bytes_read`` the merged tensors.
    """

    def __init__(self, records: Sequence[MergedRecord], jobs: Sequence[TensorJob], config: MergeConfig):
        self._where = {name: record.url for record in records for name in record.names}
        self._base = {job.name: job.base for job in jobs}
        self._options = config.storage_options
        self._chunk = chunk_budget(config)
        self._opened: dict[str, Checkpoint] = {}
        self.base_bytes_read = 0
        self.work_bytes_read = 0

    def __call__(self, name: str) -> TensorData:
        url = self._where.get(name)
        if url is None:
            self.base_bytes_read += self._base[name].nbytes
            location = self._base[name]
            data = _read_rows(location, self._options, self._chunk)
            if isinstance(data, torch.Tensor):
                return _finite_base(data, location)
            return (_finite_base(chunk, location) for chunk in data)
        if url not in self._opened:
            try:
                self._opened[url] = Checkpoint.open(url, self._options)
            except CheckpointError as error:
                raise CheckpointError(
                    f"merged artefact of {name!r} is missing or damaged ({error}); run the merge again to recompute it"
                ) from None
        location = self._opened[url].location(name)
        self.work_bytes_read += location.nbytes
        return _read_rows(location, self._options, self._chunk)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (its row chunks joined)."""
        data = self(name)
        return data if isinstance(data, torch.Tensor) else torch.cat(list(data))


def _read_rows(location: TensorLocation, storage_options: Mapping[str, Any], max_bytes: int) -> TensorData:
    """The tensor at ``location``: whole, or as row chunks of at most ``max_bytes``."""
    rows = location.shape[0] if location.shape else 0
    chunks = row_chunks(location.shape, location.nbytes // max(1, rows), max_bytes)
    if len(chunks) == 1:
        return read_tensor(location, storage_options)
    return (read_tensor(location.rows(start, stop), storage_options) for start, stop in chunks)


def _finite_base(tensor: torch.Tensor, location: Any) -> torch.Tensor:
    """A tensor kept at the base value, unless it holds NaN or inf (:class:`InputError` naming it)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError(
            f"tensor {location.name!r} (kept at the base value): the base checkpoint holds non-finite values "
            f"(NaN or inf) in {location.shard_url}; repair the base checkpoint"
        )
    return tensor


def summarize_layers(merged: Sequence[MergedRecord]) -> dict[str, Any]:
    """Data-free diagnostics over the merged layers: ranks, kept eigenvalue mass, interference.

    The per-task means (``mean_interference_vs_sum_per_task``) are given only when every layer has
    per-task values: a resumed run reuses layers whose task vectors it never read, and a mean over
    the rest would describe a different set of weights than an uninterrupted run's (empty list
    then; ``layers_with_per_task_interference`` says how many layers had them, and each layer's
    own values stay under ``per_layer``).
    """
    layers = [r for r in merged if r.rank is not None or r.interference is not None]
    ranks = [r.rank for r in layers if r.rank is not None]
    masses = [r.kept_mass for r in layers if r.kept_mass is not None]
    inter = [r.interference for r in layers if r.interference is not None]

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    per_task = [list(r.task_interference) for r in layers if r.task_interference]
    num_tasks = max((len(t) for t in per_task), default=0)
    task_means = [mean([v for t in per_task if (v := t[i]) is not None]) for i in range(num_tasks)]
    if len(per_task) < len(layers):
        task_means = []  # not every layer: not the model's per-task interference

    return {
        "layers": len(layers),
        "mean_rank": mean(ranks),
        "mean_kept_mass": mean(masses),
        "mean_interference_vs_sum": mean(inter),
        "mean_interference_vs_sum_per_task": task_means,
        "layers_with_per_task_interference": len(per_task),
        "per_layer": {
            r.names[0]: {
                "rank": r.rank,
                "kept_mass": r.kept_mass,
                "interference_vs_sum": r.interference,
                "interference_vs_sum_per_task": list(r.task_interference or ()),
                "decomposition": r.decomposition_url,
            }
            for r in layers
        },
    }


def bytes_read(records: Sequence[MergedRecord], run_id: str, num_experts: int) -> dict[str, Any]:
    """Tensor bytes read in run ``run_id`` per input checkpoint, and artefact bytes, from the records."""
    inputs = [0] * (num_experts + 1)
    work = 0
    for record in records:
        if record.computed_in != run_id:
            continue  # found complete: nothing was read for it in this run
        for i, n in enumerate(record.bytes_read):
            inputs[i] += n
        work += record.work_bytes_read
    return {"base": inputs[0], "experts": inputs[1:], "work": work}


def artefact_keys(
    layers: Sequence[TensorJob], groups: Sequence[Sequence[TensorJob]], config: MergeConfig
) -> dict[str, set[str]]:
    """Every artefact key a merge of these layers and groups uses, per kind (what garbage
    collection must keep for this setting)."""
    spectral = get_method(config.method).kind == "spectral"
    keys: dict[str, set[str]] = {kind: set() for kind in ARTEFACT_KINDS}
    for job in layers:
        keys[MERGED].add(layer_merge_key(job, config))
        if spectral:
            keys[DECOMPOSITIONS].add(decomposition_key(job, config))
        else:
            keys[DELTAS].add(delta_key([job], config))
    for group in groups:
        keys[MERGED].add(group_merge_key(group, config))
        keys[DELTAS].add(delta_key(group, config))
    return keys
