"""Prefect tasks: thin wrappers of the library steps (`swudi.pipeline.plan`, `swudi.pipeline`,
`swudi.publish.report`).

Tasks pass small records (URLs, keys, shapes, ranks, metrics), never tensors. What is done is
decided by the artefacts in the work folder, not by Prefect's result cache (see `swudi.pipeline`).
"""

from tasks.evaluate import evaluate_merge
from tasks.fetch import fetch_checkpoints
from tasks.merge import find_completed, merge_block, merge_group
from tasks.publish import publish_model, push_to_hub

__all__ = [
    "fetch_checkpoints",
    "find_completed",
    "merge_block",
    "merge_group",
    "evaluate_merge",
    "publish_model",
    "push_to_hub",
]
