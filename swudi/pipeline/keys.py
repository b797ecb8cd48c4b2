"""Cache keys of the artefacts: content fingerprints of a step's inputs, the settings it depends on and
the code digest (:mod:`swudi.pipeline.code_version`); every key a setting uses (what gc keeps)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from swudi.config.merge_config import MergeConfig
from swudi.io.fingerprint import digest
from swudi.methods import get_method
from swudi.pipeline.code_version import decomposition_code, merge_code, task_svd_code
from swudi.pipeline.plan import (
    TensorJob,
    output_dtype,
)
from swudi.pipeline.records import ARTEFACT_KINDS, DECOMPOSITIONS, DELTAS, MERGED, TASK_SVDS

log = logging.getLogger(__name__)


def decomposition_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of a decomposition: the layer's inputs, the decomposition options and code."""
    return digest(
        "decompose", decomposition_code(), job.input_key, config.decomposition.max_rank, config.decomposition.route
    )


def task_svd_key(job: TensorJob) -> str:
    """Identity of a weight's per-task SVDs: its inputs and the code (no setting changes them)."""
    return digest("task-svds", task_svd_code(), job.input_key)


def _post(config: MergeConfig) -> list[Any]:
    """The post-filter part of a merged weight's identity: empty without one (earlier keys unchanged)."""
    return [] if config.post is None else [{"post": config.post, "post_params": config.post_params}]


def _rule(jobs: Sequence[TensorJob], config: MergeConfig) -> Any:
    """What decides theta of these tensors: the method and its parameters, or the mean."""
    if any(job.route == "method" for job in jobs):
        return [config.method, config.params]
    return "mean"


def delta_key(jobs: Sequence[TensorJob], config: MergeConfig) -> str:
    """Identity of merged task vectors theta (before the scale): inputs, rule and code."""
    return digest("delta", merge_code(config.method), [(j.input_key, j.route) for j in jobs], _rule(jobs, config))


def layer_merge_key(job: TensorJob, config: MergeConfig) -> str:
    """Identity of one merged 2-D weight: inputs, method, parameters, scale, output dtype and code."""
    return digest(
        "merge-layer",
        merge_code(config.method),
        job.input_key,
        config.method,
        config.params,
        config.scale,
        output_dtype(config, job),
        config.decomposition.max_rank,
        config.decomposition.route,
        *_post(config),
    )


def group_merge_key(jobs: Sequence[TensorJob], config: MergeConfig) -> str:
    """Identity of a merged group of small tensors."""
    return digest(
        "merge-group",
        merge_code(config.method),
        [(j.input_key, j.route, output_dtype(config, j)) for j in jobs],
        _rule(jobs, config),
        config.scale,
    )


def artefact_keys(
    layers: Sequence[TensorJob], groups: Sequence[Sequence[TensorJob]], config: MergeConfig
) -> dict[str, set[str]]:
    """Every artefact key a merge of these layers and groups uses, per kind (what garbage
    collection must keep for this setting)."""
    kind = get_method(config.method).kind
    keys: dict[str, set[str]] = {kind: set() for kind in ARTEFACT_KINDS}
    for job in layers:
        keys[MERGED].add(layer_merge_key(job, config))
        if kind == "spectral":
            keys[DECOMPOSITIONS].add(decomposition_key(job, config))
        elif kind != "subspace":
            keys[DELTAS].add(delta_key([job], config))
        if kind == "subspace" or config.post is not None:
            keys[TASK_SVDS].add(task_svd_key(job))
    for group in groups:
        keys[MERGED].add(group_merge_key(group, config))
        keys[DELTAS].add(delta_key(group, config))
    return keys
