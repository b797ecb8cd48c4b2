"""Open and validate every checkpoint from its headers; return the merge plan."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from swudi.config.merge_config import MergeConfig
from swudi.pipeline.plan import MergePlan, build_plan
from tasks.retry import retry_unless_input_error


@task(
    name="fetch-checkpoints",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
    retry_delay_seconds=5,
)
def fetch_checkpoints(config: MergeConfig) -> MergePlan:
    """Headers of base + experts -> validated, routed :class:`~swudi.pipeline.plan.MergePlan` (no weights read)."""
    return build_plan(config)
