"""Merge tasks: one per transformer block (for each 2-D weight of it: decompose, select rank,
filter and merge), one per group of small tensors. The work folder's artefacts are the cache
(:mod:`swudi.pipeline`): Prefect stores no result, so nothing is pickled to storage and no
credentials reach Prefect's database."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from swudi.config.merge_config import MergeConfig
from swudi.core.threads import apply_torch_threads, threads_per_task
from swudi.pipeline import group_step
from swudi.pipeline.artefacts import find_merged
from swudi.pipeline.layer_step import merge_layers
from swudi.pipeline.plan import TensorJob, block_of
from swudi.pipeline.records import MergedRecord
from swudi.storage.held_options import with_held_options
from tasks.retry import retry_unless_input_error


@task(
    name="decompose-select-rank-merge",
    task_run_name="decompose-select-rank-merge[{block}]",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_condition_fn=retry_unless_input_error,
)
def merge_block(
    block: str,
    jobs: Sequence[TensorJob],
    config: MergeConfig,
    run_id: str,
    storage_options_ref: str | None = None,
) -> list[MergedRecord]:
    """For each 2-D weight of one block: decompose (or load the decomposition), select the rank, filter
    and store W = W0 + scale * theta. Each weight is its own artefact: a killed merge resumes per weight.

    ``block`` names the task run (the block and its tensors, :func:`task_label`); ``config`` holds
    public storage options only, the full ones are found by ``storage_options_ref`` in the process
    that holds them (:mod:`swudi.storage.held_options`); elsewhere credentials come from the environment."""
    config = with_held_options(config, storage_options_ref)
    apply_torch_threads(threads_per_task(config))  # workers x torch threads <= cores
    return merge_layers(jobs, config, run_id)


@task(
    name="merge-other-tensors",
    task_run_name="merge-other-tensors[{label}]",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_condition_fn=retry_unless_input_error,
)
def merge_group(
    label: str,
    jobs: Sequence[TensorJob],
    config: MergeConfig,
    run_id: str,
    storage_options_ref: str | None = None,
) -> MergedRecord:
    """Mean (or the elementwise method) for biases, norms and excluded weights (``label`` names the
    task run; storage options as for :func:`merge_block`)."""
    config = with_held_options(config, storage_options_ref)
    apply_torch_threads(threads_per_task(config))
    return group_step.merge_group(jobs, config, run_id)


@task(
    name="find-completed",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=5,
)
def find_completed(keys: Sequence[str], config: MergeConfig) -> dict[str, MergedRecord]:
    """Records of the merged artefacts that already exist (one listing of the work folder + headers)."""
    return find_merged(keys, config)


def task_label(jobs: Sequence[TensorJob], limit: int = 100) -> str:
    """The tensors of one task, for its run name: ``encoder.layer.0: attention.self.query, ... (+3)``.

    One tensor: its name. One block (:func:`swudi.pipeline.plan.block_of`): the block, then the names without
    it and without ``.weight``; several blocks: ``first..last``; else the number of tensors. The list
    is cut at about ``limit`` characters, with the number left out.
    """
    if len(jobs) == 1:
        return jobs[0].name
    blocks = list(dict.fromkeys(block_of(job.name) for job in jobs))
    prefix = ""
    if len(blocks) == 1:
        head = prefix = blocks[0]
    elif blocks[0] not in (jobs[0].name, jobs[-1].name) and blocks[-1] != jobs[-1].name:
        head = f"{blocks[0]}..{blocks[-1]}"
    else:
        head = f"{len(jobs)} tensors"
    names = [_short(job.name, prefix) for job in jobs]
    shown: list[str] = []
    for name in names:
        if shown and len(head) + sum(len(n) + 2 for n in shown) + len(name) > limit:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return f"{head}: {', '.join(shown)}" + (f" (+{rest})" if rest else "")


def _short(name: str, block: str) -> str:
    if block and name.startswith(block + "."):
        name = name[len(block) + 1 :]
    return name.removesuffix(".weight")
