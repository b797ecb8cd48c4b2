"""The steps of a merge, as plain functions over small records (no Prefect here).

Each step reads exactly the tensors it needs (one range read per tensor per checkpoint), writes its
heavy result as a safetensors artefact under the work folder, and returns a small record. Each
step's ``*_key`` function is the identity of its result: the content fingerprints of its inputs,
the parameters it depends on and :data:`~swudi.methods.ALGORITHM_VERSION`. The Prefect tasks use
these keys as cache keys and the artefact names, so a finished step is never computed twice.

Artefacts:

- ``WORK/decompositions/<key>.safetensors``: a :class:`~swudi.decomposition.Decomposition`;
- ``WORK/merged/<key>.safetensors``: merged tensors in their output dtype (one layer, or a group).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swudi.checkpoint import Checkpoint, join_url, load_tensors, read_tensor, save_tensors
from swudi.checkpoint.fingerprint import digest
from swudi.checkpoint.header import torch_dtype
from swudi.config import MergeConfig
from swudi.decomposition import Decomposition, decompose
from swudi.diagnostics import interference_vs_sum
from swudi.methods import ALGORITHM_VERSION, get_method, merge_decomposition, merge_elementwise, merge_matrix
from swudi.methods import spectral_filter
from swudi.plan import TensorJob, output_dtype
from swudi.task_vectors import stack_task_vectors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecompositionRecord:
    """A stored decomposition of one layer."""

    name: str
    key: str
    url: str
    shape: tuple[int, int]
    stored_rank: int
    all_zero: bool
    seconds: float
    computed_in: str = ""  # id of the run that computed it (a cached record keeps its first run's id)


@dataclass(frozen=True)
class RankRecord:
    """How many eigendirections a spectral method keeps for one layer, and their share of trace(C)."""

    name: str
    rank: int
    kept_mass: float


@dataclass(frozen=True)
class MergedRecord:
    """Merged tensors written to one artefact (a layer, or a group of small tensors)."""

    key: str
    url: str
    names: tuple[str, ...]
    method: str
    rank: int | None = None
    kept_mass: float | None = None
    interference: float | None = None  # L(theta) / L(sum of task vectors), WUDI loss
    task_interference: tuple[float | None, ...] | None = None  # the same ratio per task
    decomposition_url: str | None = None
    seconds: float = 0.0
    computed_in: str = ""


# ------------------------------------------------------------------------------------------ keys
def decomposition_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of a decomposition: the layer's inputs and the decomposition options only."""
    return digest("decompose", ALGORITHM_VERSION, job.input_key,
                  config.decomposition.max_rank, config.decomposition.route)


def rank_key(dec: DecompositionRecord, config: MergeConfig) -> str:
    """Identity of a rank choice: the decomposition, the method and its parameters."""
    return digest("rank", ALGORITHM_VERSION, dec.key, config.method, config.params)


def layer_merge_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of one merged layer: inputs, method, parameters, scale and output dtype."""
    return digest("merge-layer", ALGORITHM_VERSION, job.input_key, config.method, config.params,
                  config.scale, output_dtype(config, job), config.decomposition.max_rank,
                  config.decomposition.route)


def group_merge_key(jobs: Sequence[TensorJob], config: MergeConfig) -> str:
    """Identity of a merged group of small tensors."""
    own_rule = any(job.route == "method" for job in jobs)  # else every tensor gets the mean
    return digest("merge-group", ALGORITHM_VERSION, [(j.input_key, j.route, output_dtype(config, j))
                                                      for j in jobs],
                  (config.method, config.params) if own_rule else "mean", config.scale)


def artefact_url(config: MergeConfig, kind: str, key: str) -> str:
    """``WORK/<kind>/<key>.safetensors``."""
    return join_url(config.resolved_work_dir, kind, f"{key}.safetensors")


# ------------------------------------------------------------------------------------------ reads
def read_task_vectors(job: TensorJob, config: MergeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight as float32, task vectors ``[N, ...]`` float32), one range read per checkpoint."""
    base = read_tensor(job.base, config.storage_options)
    experts = [read_tensor(loc, config.storage_options) for loc in job.experts]
    return base.to(torch.float32), stack_task_vectors(base, experts, job.name)


def _finish(job: TensorJob, base: torch.Tensor, theta: torch.Tensor, config: MergeConfig) -> torch.Tensor:
    """W = W0 + scale * theta in float32, cast to the output dtype."""
    merged = base.to(torch.float32) + config.scale * theta.to(torch.float32)
    return merged.to(torch_dtype(output_dtype(config, job))).contiguous()


# ------------------------------------------------------------------------------------------ steps
def decompose_layer(job: TensorJob, config: MergeConfig) -> DecompositionRecord:
    """Read one weight from every checkpoint, decompose its task vectors, store the result."""
    start = time.perf_counter()
    key = decomposition_key(job, config)
    _, task_vectors = read_task_vectors(job, config)
    dec = decompose(task_vectors, name=job.name, max_rank=config.decomposition.max_rank,
                    device=config.device, route=config.decomposition.route)
    url = artefact_url(config, "decompositions", key)
    tensors, metadata = dec.to_tensors()
    save_tensors(url, tensors, metadata, config.storage_options)
    m, d = dec.shape
    return DecompositionRecord(job.name, key, url, (m, d), dec.rank, dec.all_zero,
                               time.perf_counter() - start)


def select_rank(dec: DecompositionRecord, config: MergeConfig) -> RankRecord:
    """The number of eigendirections the spectral method keeps, from the eigenvalues alone."""
    eigenvalues = Checkpoint.open(dec.url, config.storage_options).read("eigenvalues")
    f = spectral_filter(eigenvalues, dec.shape, config.method, **config.params)
    kept = f > 0
    total = float(eigenvalues.sum())
    kept_mass = float(eigenvalues[kept].sum()) / total if total > 0 else 0.0
    rank = 0 if dec.all_zero else int(kept.sum())
    return RankRecord(dec.name, rank, kept_mass)


def merge_layer(job: TensorJob, config: MergeConfig, dec: DecompositionRecord | None = None,
                rank: RankRecord | None = None) -> MergedRecord:
    """Merge one 2-D weight and store W = W0 + scale * theta in the output dtype.

    Spectral methods filter the stored decomposition; other methods run on the task vectors. Both
    report the WUDI interference of theta relative to the sum of task vectors, per task and in total
    (:mod:`swudi.diagnostics`).
    """
    start = time.perf_counter()
    spec = get_method(config.method)
    base, task_vectors = read_task_vectors(job, config)
    if spec.kind == "spectral":
        if dec is None:
            raise ValueError(f"{job.name}: method {config.method!r} needs a decomposition")
        decomposition = Decomposition.from_tensors(*load_tensors(dec.url, config.storage_options))
        theta = merge_decomposition(decomposition, config.method, device=config.device, **config.params)
    else:
        theta = merge_matrix(task_vectors, config.method, name=job.name, device=config.device,
                             **config.params)
    interference = interference_vs_sum(theta, task_vectors, config.device)
    key = layer_merge_key(job, config)
    url = artefact_url(config, "merged", key)
    save_tensors(url, {job.name: _finish(job, base, theta, config)}, {"key": key}, config.storage_options)
    return MergedRecord(key, url, (job.name,), config.method,
                        rank=rank.rank if rank else None, kept_mass=rank.kept_mass if rank else None,
                        interference=interference["total"],
                        task_interference=tuple(interference["per_task"]),
                        decomposition_url=dec.url if dec else None,
                        seconds=time.perf_counter() - start)


def merge_group(jobs: Sequence[TensorJob], config: MergeConfig) -> MergedRecord:
    """Merge a group of tensors that are not 2-D layer weights (biases, norms, excluded weights).

    Route "mean" gives the mean of the task vectors; route "method" (elementwise methods only)
    applies the method's own rule.
    """
    start = time.perf_counter()
    merged: dict[str, torch.Tensor] = {}
    for job in jobs:
        base, task_vectors = read_task_vectors(job, config)
        method = config.method if job.route == "method" else "mean"
        params = config.params if job.route == "method" else {}
        theta = merge_elementwise(task_vectors, method, name=job.name, **params)
        merged[job.name] = _finish(job, base, theta, config)
    key = group_merge_key(jobs, config)
    url = artefact_url(config, "merged", key)
    save_tensors(url, merged, {"key": key}, config.storage_options)
    return MergedRecord(key, url, tuple(merged), config.method, seconds=time.perf_counter() - start)


def merged_tensor_reader(records: Sequence[MergedRecord], jobs: Sequence[TensorJob],
                         config: MergeConfig):
    """A ``read(name) -> Tensor`` over the merged artefacts, falling back to the base tensor.

    Artefacts are opened from their headers once and read one tensor at a time, so publishing a
    model never holds more than one tensor in memory.
    """
    where = {name: record.url for record in records for name in record.names}
    base_locations = {job.name: job.base for job in jobs}
    opened: dict[str, Checkpoint] = {}

    def read(name: str) -> torch.Tensor:
        url = where.get(name)
        if url is None:
            return read_tensor(base_locations[name], config.storage_options)
        if url not in opened:
            opened[url] = Checkpoint.open(url, config.storage_options)
        return opened[url].read(name)

    return read


def summarize_layers(merged: Sequence[MergedRecord]) -> dict[str, Any]:
    """Data-free diagnostics over the merged layers: ranks, kept eigenvalue mass, interference."""
    layers = [r for r in merged if r.rank is not None or r.interference is not None]
    ranks = [r.rank for r in layers if r.rank is not None]
    masses = [r.kept_mass for r in layers if r.kept_mass is not None]
    inter = [r.interference for r in layers if r.interference is not None]

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    per_task = [list(r.task_interference) for r in layers if r.task_interference]
    num_tasks = max((len(t) for t in per_task), default=0)
    task_means = [mean([t[i] for t in per_task if t[i] is not None]) for i in range(num_tasks)]

    return {
        "layers": len(layers),
        "mean_rank": mean(ranks),
        "mean_kept_mass": mean(masses),
        "mean_interference_vs_sum": mean(inter),
        "mean_interference_vs_sum_per_task": task_means,
        "per_layer": {
            r.names[0]: {"rank": r.rank, "kept_mass": r.kept_mass, "interference_vs_sum": r.interference,
                         "interference_vs_sum_per_task": list(r.task_interference or ()),
                         "decomposition": r.decomposition_url}
            for r in layers
        },
    }
