"""The layer step: one 2-D weight decomposed (or its delta built, or its per-task SVDs), its rank chosen,
filtered, merged, post-filtered and stored; the next weight's inputs are read while one is computed."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from swudi.config.merge_config import MergeConfig
from swudi.core.decomposition import Decomposition, decompose
from swudi.core.diagnostics import interference_from_decomposition, interference_from_factors, interference_vs_sum
from swudi.core.lowrank import decompose_factors
from swudi.core.spectral import apply_filter
from swudi.core.task_svd import TaskSVDs, task_svds, task_svds_from_factors
from swudi.core.task_vectors import ExpertValue, LowRank, stack_task_vectors
from swudi.io.artifacts import exists as artefact_exists
from swudi.io.artifacts import save_tensors
from swudi.io.header import torch_dtype
from swudi.methods import apply_post_filter, get_method, merge_matrix, merge_task_svds, spectral_filter
from swudi.pipeline.artefacts import (
    artefact_url,
    load_decomposition,
    load_delta,
    load_merged_record,
    load_task_svds,
    save_merged,
)
from swudi.pipeline.keys import decomposition_key, delta_key, layer_merge_key, task_svd_key
from swudi.pipeline.output_range import merged_in_range
from swudi.pipeline.plan import (
    TensorJob,
    dense_path_reason,
    output_dtype,
    uses_factor_space,
)
from swudi.pipeline.reads import StepCost, read_task_vectors, sources_of, to_matrix
from swudi.pipeline.records import (
    DECOMPOSITIONS,
    DELTA_FORMAT,
    DELTAS,
    MERGED,
    RECORD_FORMAT_VERSION,
    TASK_SVDS,
    MergedRecord,
    RankChoice,
)

log = logging.getLogger(__name__)


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
    reads: StepCost,
    prefetched: tuple[torch.Tensor, list[ExpertValue]] | None = None,
) -> tuple[Decomposition, str, tuple[torch.Tensor, torch.Tensor | list[LowRank]] | None, float]:
    """The layer's decomposition: the stored one, or read the inputs once, decompose and store it.

    ``prefetched``: (base, each expert's value), already read (:func:`merge_layers`). LoRA experts
    whose factors fit (:func:`~swudi.pipeline.plan.uses_factor_space`) are decomposed in factor space
    (:func:`~swudi.core.lowrank.decompose_factors`), never forming their dense task vectors.
    Returns (decomposition, its URL, (base, task vectors or their factors) when they were read,
    seconds spent).
    """
    key = decomposition_key(job, config)
    url = artefact_url(config, DECOMPOSITIONS, key)
    dec = load_decomposition(url, key, config, reads)
    if dec is not None:
        return dec, url, None, 0.0
    start = time.perf_counter()
    base, experts = prefetched if prefetched is not None else reads.inputs_of(job, config.storage_options)
    task_vectors: torch.Tensor | list[LowRank]
    if uses_factor_space(job, config):
        m, d = job.matrix_shape
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


def task_svds_layer(
    job: TensorJob,
    config: MergeConfig,
    reads: StepCost,
    prefetched: tuple[torch.Tensor, list[ExpertValue]] | None = None,
    in_memory: tuple[torch.Tensor, torch.Tensor | list[LowRank]] | None = None,
) -> tuple[TaskSVDs, tuple[torch.Tensor, torch.Tensor | list[LowRank]] | None, float]:
    """The weight's per-task SVDs: the stored ones, or computed from the task vectors (``in_memory``:
    already read by this step; ``prefetched``: read ahead; else read now) and stored.

    LoRA experts (factors or nothing from every expert) are decomposed in factor space
    (:func:`~swudi.core.task_svd.task_svds_from_factors`). Returns (task SVDs, (base, task vectors or
    factors) when they were read by this call, seconds spent).
    """
    key = task_svd_key(job)
    url = artefact_url(config, TASK_SVDS, key)
    found = load_task_svds(url, key, config, reads)
    if found is not None:
        return found, None, 0.0
    start = time.perf_counter()
    read: tuple[torch.Tensor, torch.Tensor | list[LowRank]] | None = None
    if in_memory is not None:
        tv: torch.Tensor | list[LowRank] = in_memory[1]
    else:
        base, experts = prefetched if prefetched is not None else reads.inputs_of(job, config.storage_options)
        m, d = job.shape
        if any(isinstance(x, LowRank) for x in experts) and all(x is None or isinstance(x, LowRank) for x in experts):
            tv = [x if isinstance(x, LowRank) else LowRank(torch.zeros(m, 0), torch.zeros(0, d)) for x in experts]
        else:
            tv = stack_task_vectors(base, experts, job.name, sources=sources_of(job))
        read = (base, tv)
    with reads.phase("decompose"):
        if isinstance(tv, list):
            found = task_svds_from_factors(tv, name=job.name, device=config.device)
        else:
            found = task_svds(tv, name=job.name, device=config.device)
    tensors, metadata = found.to_tensors()
    with reads.phase("write"):
        save_tensors(url, tensors, {**metadata, "key": key}, config.storage_options)
    return found, read, time.perf_counter() - start


def _interference_from_svds(theta: torch.Tensor, t: TaskSVDs, device: str) -> dict[str, Any]:
    """Total and per-task WUDI interference of theta relative to the sum, from the per-task SVDs
    (the same figures whether the task vectors were read by this run or not)."""
    tv = torch.stack([t.task(i) for i in range(t.num_tasks)])
    return interference_vs_sum(theta, tv, device)


@dataclass
class _Prefetched:
    """A weight read from every checkpoint ahead of its turn, with what reading it cost."""

    cost: StepCost
    inputs: tuple[torch.Tensor, list[ExpertValue]]


def _prefetch(job: TensorJob, config: MergeConfig) -> _Prefetched | None:
    """Read the weight from every checkpoint if its merge will need the inputs (spectral or subspace
    method, neither the merged tensor nor the decomposition / task SVDs stored); None otherwise."""
    kind = get_method(config.method).kind
    if kind not in ("spectral", "subspace"):
        return None
    stored = (
        artefact_url(config, DECOMPOSITIONS, decomposition_key(job, config))
        if kind == "spectral"
        else artefact_url(config, TASK_SVDS, task_svd_key(job))
    )
    for url in (artefact_url(config, MERGED, layer_merge_key(job, config)), stored):
        if artefact_exists(url, config.storage_options):
            return None
    cost = StepCost([0] * (len(job.experts) + 1))
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
    the total interference comes from the decomposition. Subspace methods: theta from the per-task
    SVDs (stored once per weight). Other methods: theta from the task vectors (or the stored delta),
    and with ``per_task_diagnostics`` their interference (per task and total, in one pass); without
    it none (it would cost far more than an elementwise merge). A post-filter (``config.post``) then
    transforms theta, from the per-task SVDs. Per-task interference is computed when the task
    vectors are in memory anyway (the step that read them), never by a second read; with per-task
    SVDs at hand it comes from them.
    """
    key = layer_merge_key(job, config)
    url = artefact_url(config, MERGED, key)
    done = load_merged_record(url, key, config)
    if done is not None:
        return done
    reads = prefetched.cost if prefetched is not None else StepCost([0] * (len(job.experts) + 1))
    # a prefetched weight was read while the previous one was computed: its time is its read phase
    # plus what happens from here on, not the wait since the read was queued
    started = time.perf_counter() - (reads.phases.get("read", 0.0) if prefetched is not None else 0.0)
    spec = get_method(config.method)
    rank: RankChoice | None = None
    dec_url: str | None = None
    decompose_seconds = 0.0
    inputs: tuple[torch.Tensor, torch.Tensor | list[LowRank] | None] | None  # (base, task vectors) when in memory
    interference: dict[str, Any]  # {"total": float | None, "per_task": list[float | None] | None}
    svds: TaskSVDs | None = None
    if spec.kind == "subspace":
        svds, inputs, decompose_seconds = task_svds_layer(
            job, config, reads, prefetched.inputs if prefetched is not None else None
        )
        with reads.phase("merge"):
            theta = merge_task_svds(svds, config.method, device=config.device, **config.params)
        interference = {"total": None, "per_task": None}
    elif spec.kind == "spectral":
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
    if config.post is not None:
        if svds is None:
            known = (inputs[0], inputs[1]) if inputs is not None and inputs[1] is not None else None
            svds, read_now, seconds = task_svds_layer(job, config, reads, in_memory=known)
            inputs = inputs if read_now is None else read_now
            decompose_seconds += seconds
        with reads.phase("merge"):
            theta = apply_post_filter(theta, svds, config.post, device=config.device, **config.post_params)
    if svds is not None:
        with reads.phase("diagnostics"):
            interference = _interference_from_svds(theta, svds, config.device)
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
    base = inputs[0] if inputs is not None else to_matrix(job, reads.tensor(0, job.base, config.storage_options))
    with reads.phase("merge"):
        merged = merged_in_range(base, theta, config.scale, torch_dtype(output_dtype(config, job)), name=job.name)
        merged = to_matrix(job, merged)  # back as stored
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
        save_merged(record, {job.name: merged}, config)
    return record


@dataclass
class _Delta:
    """theta of one 2-D weight (float32, before the scale), its interference (None values where
    not computed) and the base when it was just read (None when theta was loaded from storage).
    The task vectors are kept only when a post-filter needs them (their SVDs, without a second
    read); their diagnostics were taken when they were in memory."""

    theta: torch.Tensor
    diagnostics: dict[str, Any]  # interference of the weight
    base: torch.Tensor | None = None
    task_vectors: torch.Tensor | None = None  # kept only for a post-filter's per-task SVDs


def _delta(job: TensorJob, config: MergeConfig, reads: StepCost) -> _Delta:
    """theta of a 2-D weight under a non-spectral method: the stored delta, or computed and stored."""
    key = delta_key([job], config)
    url = artefact_url(config, DELTAS, key)
    stored = load_delta(url, key, [job.name], config, reads)
    if stored is not None:
        tensors, info = stored
        return _Delta(tensors[job.name], info)
    base, task_vectors = read_task_vectors(job, config, reads)
    with reads.phase("merge"):
        theta = merge_matrix(task_vectors, config.method, name=job.name, device=config.device, **config.params)
        theta = theta.to(torch.float32).contiguous()
    diagnostics: dict[str, Any] = {"total": None, "per_task": None}
    if config.per_task_diagnostics:
        # the only diagnostic of an elementwise merge, and its whole cost: 2N products of
        # m x d x min(m, d); the total needs every per-task term, so both come from one pass
        with reads.phase("diagnostics"):
            diagnostics = interference_vs_sum(theta, task_vectors, config.device)
    kept = task_vectors if config.post is not None else None
    del task_vectors  # otherwise not needed past here: not held through the merge and the write
    metadata = {
        "format": DELTA_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "key": key,
        "diagnostics": json.dumps(diagnostics),
    }
    with reads.phase("write"):
        save_tensors(url, {job.name: theta}, metadata, config.storage_options)
    return _Delta(theta, diagnostics, base, kept)
