"""The group step: small tensors (mean, elementwise methods; embeddings and lm_head of any vocabulary)
merged in row chunks sized by the memory budget."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import torch

from swudi.config.merge_config import MergeConfig
from swudi.core.task_vectors import ExpertValue, LowRank, MeanAccumulator, stack_task_vectors
from swudi.errors import CheckpointError
from swudi.io.adapter import LoraFactors, input_nbytes
from swudi.io.checkpoint import Checkpoint, TensorLocation, read_tensor
from swudi.io.header import torch_dtype
from swudi.io.writer import TensorSpec, safetensors_stream
from swudi.methods import merge_elementwise
from swudi.pipeline.artefacts import artefact_url, load_merged_record, open_delta
from swudi.pipeline.keys import delta_key, group_merge_key
from swudi.pipeline.output_range import merged_in_range
from swudi.pipeline.plan import (
    TensorJob,
    chunk_budget,
    group_row_bytes,
    output_dtype,
    row_chunks,
)
from swudi.pipeline.reads import StepCost, lora_update, sources_of
from swudi.pipeline.records import DELTA_FORMAT, DELTAS, MERGED, MERGED_FORMAT, RECORD_FORMAT_VERSION, MergedRecord
from swudi.storage.filesystem import resolve

log = logging.getLogger(__name__)


def _group_theta_rows(
    job: TensorJob, config: MergeConfig, reads: StepCost, stored: Checkpoint | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base rows, theta rows float32) of one group tensor, row chunk by row chunk.

    Route "mean": theta = (1/N) sum_i (E_i - W0), computed per row chunk (exact: the rule is
    elementwise), so a tensor of any size (embeddings, lm_head) and any N streams through a bounded
    working set (:func:`swudi.pipeline.plan.chunk_budget`). Route "method" (an elementwise method's own rule,
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
    reads = StepCost([0] * (n + 1))
    names = [job.name for job in jobs]
    dkey = delta_key(jobs, config)
    durl = artefact_url(config, DELTAS, dkey)
    stored = open_delta(durl, dkey, names, config)
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
                    merged = merged_in_range(base, theta, config.scale, dtype, name=job.name)
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
