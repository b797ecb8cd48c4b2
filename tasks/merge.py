"""Filter and merge: one task per layer, one per group of small tensors; cached by content."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task

from swudi import steps
from swudi.config import MergeConfig
from swudi.plan import TensorJob
from tasks.caching import cache_key, stamp


@task(name="merge-layer", cache_key_fn=cache_key("merge-layer", steps.layer_merge_key, "job", "config"),
      persist_result=True, cache_result_in_memory=False, retries=1)
def merge_layer(job: TensorJob, config: MergeConfig, dec: steps.DecompositionRecord | None = None,
                rank: steps.RankRecord | None = None) -> steps.MergedRecord:
    """W = W0 + scale * theta for one 2-D weight, stored in the work folder."""
    return stamp(steps.merge_layer(job, config, dec, rank))


@task(name="merge-other-tensors",
      cache_key_fn=cache_key("merge-group", steps.group_merge_key, "jobs", "config"),
      persist_result=True, cache_result_in_memory=False, retries=1)
def merge_group(jobs: Sequence[TensorJob], config: MergeConfig) -> steps.MergedRecord:
    """Mean (or the elementwise method) for biases, norms and excluded weights."""
    return stamp(steps.merge_group(jobs, config))
