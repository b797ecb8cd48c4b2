"""The expensive, hyperparameter-free step: one decomposition per 2-D weight, cached by content."""

from __future__ import annotations

from prefect import task

from swudi import steps
from swudi.config import MergeConfig
from swudi.plan import TensorJob
from tasks.caching import cache_key, stamp


@task(name="decompose", cache_key_fn=cache_key("decompose", steps.decomposition_key, "job", "config"),
      persist_result=True, cache_result_in_memory=False, retries=1)
def decompose_layer(job: TensorJob, config: MergeConfig) -> steps.DecompositionRecord:
    """Read the weight from every checkpoint, eigendecompose (GPU when present), store the result."""
    return stamp(steps.decompose_layer(job, config))
