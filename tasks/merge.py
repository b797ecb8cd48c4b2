"""Merge tasks: one per transformer block (for each 2-D weight of it: decompose, select rank,
filter and merge), one per group of small tensors. The work folder's artefacts are the cache
(:mod:`swudi.steps`): Prefect stores no result, so nothing is pickled to storage and no
credentials reach Prefect's database."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from swudi import steps
from swudi.config import MergeConfig
from swudi.plan import TensorJob
from swudi.threads import apply_torch_threads, threads_per_task
from tasks.retry import retry_unless_input_error


@task(
    name="decompose-select-rank-merge",
    task_run_name="decompose-select-rank-merge[{block}]",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_condition_fn=retry_unless_input_error,
)
def merge_block(block: str, jobs: Sequence[TensorJob], config: MergeConfig, run_id: str) -> list[steps.MergedRecord]:
    """For each 2-D weight of one block: decompose (or load the decomposition), select the rank, filter
    and store W = W0 + scale * theta. Each weight is its own artefact: a killed merge resumes per weight."""
    apply_torch_threads(threads_per_task(config))  # workers x torch threads <= cores
    return steps.merge_layers(jobs, config, run_id)


@task(
    name="merge-other-tensors",
    task_run_name="merge-other-tensors[{jobs[0].name}]",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_condition_fn=retry_unless_input_error,
)
def merge_group(jobs: Sequence[TensorJob], config: MergeConfig, run_id: str) -> steps.MergedRecord:
    """Mean (or the elementwise method) for biases, norms and excluded weights."""
    apply_torch_threads(threads_per_task(config))
    return steps.merge_group(jobs, config, run_id)


@task(
    name="find-completed",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=5,
)
def find_completed(keys: Sequence[str], config: MergeConfig) -> dict[str, steps.MergedRecord]:
    """Records of the merged artefacts that already exist (one listing of the work folder + headers)."""
    return steps.find_merged(keys, config)
