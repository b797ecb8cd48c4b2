"""Reading a step's inputs and accounting for it: tensor bytes per input checkpoint, artefact bytes,
seconds per phase; the range reads of one weight from every checkpoint are issued together."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from swudi.config.merge_config import MergeConfig
from swudi.core.task_vectors import ExpertValue, LowRank, stack_task_vectors
from swudi.io.adapter import ExpertInput, LoraFactors
from swudi.io.checkpoint import TensorLocation, read_tensor
from swudi.pipeline.plan import (
    TensorJob,
)
from swudi.storage.filesystem import is_local_url

log = logging.getLogger(__name__)


@dataclass
class StepCost:
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
        """(base weight, each expert's value) of one 2-D weight as [out, in] (:func:`to_matrix`): all
        its range reads issued together."""
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
        return to_matrix(job, base), [to_matrix(job, value) for value in values]

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
            return list(read_pool().map(lambda location: read_tensor(location, storage_options), locations))


def to_matrix(job: TensorJob, value: Any) -> Any:
    """A weight (tensor, :class:`LowRank` factors or None) of ``job`` as [out, in]: transposed when
    the job is stored ``in_out`` (:mod:`swudi.core.orientation`), else unchanged. Its own inverse."""
    if job.orientation != "in_out" or value is None:
        return value
    if isinstance(value, LowRank):  # (B A)^T = A^T B^T
        return LowRank(value.a.T.contiguous(), value.b.T.contiguous())
    return value.T.contiguous()


def lora_update(factors: LoraFactors, a: torch.Tensor, b: torch.Tensor) -> LowRank:
    """tau = scaling * B @ A as float32 factors (the scaling folded into B; transposed layers and
    embeddings: tau = (scaling * B @ A)^T = A^T (scaling * B)^T)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32) * factors.scaling
    if factors.transposed:
        return LowRank(a32.T.contiguous(), b32.T.contiguous())
    return LowRank(b32, a32)


@functools.cache
def read_pool() -> ThreadPoolExecutor:
    """Concurrent range reads of remote tensors, shared by the tasks of a process (I/O bound); made on
    first use, not at import."""
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="swudi-read")


def sources_of(job: TensorJob) -> tuple[str, ...]:
    """The files holding ``job``'s tensor: base first, then each expert (named in input errors)."""
    return (job.base.shard_url, *(_source(item) for item in job.experts))


def _source(item: ExpertInput) -> str:
    if item is None:
        return "(an adapter that leaves this weight unchanged)"
    return item.a.shard_url if isinstance(item, LoraFactors) else item.shard_url


def read_task_vectors(
    job: TensorJob, config: MergeConfig, reads: StepCost | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, task vectors ``[N, ...]`` float32): one range read per checkpoint (two for
    LoRA factors), concurrent for remote checkpoints; LoRA updates are formed densely here."""
    reads = reads or StepCost([0] * (len(job.experts) + 1))
    base, experts = reads.inputs_of(job, config.storage_options)
    return base, stack_task_vectors(base, experts, job.name, sources=sources_of(job))
