"""Prefect tasks: thin wrappers of the library steps (`swudi.plan`, `swudi.steps`, `swudi.report`).

Tasks pass small records (URLs, keys, shapes, ranks, metrics), never tensors. The heavy steps are
cached across runs by content keys (see `tasks.caching`), with their records stored beside the
artefacts in the work folder.
"""

from tasks.decompose import decompose_layer
from tasks.evaluate import evaluate_merge
from tasks.fetch import fetch_checkpoints
from tasks.merge import merge_group, merge_layer
from tasks.publish import publish_model
from tasks.select_rank import select_rank

__all__ = ["fetch_checkpoints", "decompose_layer", "select_rank", "merge_layer", "merge_group",
           "evaluate_merge", "publish_model"]
