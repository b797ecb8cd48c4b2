"""Summaries of merged records: ranks and interference over the layers, bytes read in a run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from swudi.pipeline.records import MergedRecord

log = logging.getLogger(__name__)


def summarize_layers(merged: Sequence[MergedRecord]) -> dict[str, Any]:
    """Data-free diagnostics over the merged layers: ranks, kept eigenvalue mass, interference.

    The per-task means (``mean_interference_vs_sum_per_task``) are given only when every layer has
    per-task values: a resumed run reuses layers whose task vectors it never read, and a mean over
    the rest would describe a different set of weights than an uninterrupted run's (empty list
    then; ``layers_with_per_task_interference`` says how many layers had them, and each layer's
    own values stay under ``per_layer``).
    """
    layers = [r for r in merged if r.rank is not None or r.interference is not None]
    ranks = [r.rank for r in layers if r.rank is not None]
    masses = [r.kept_mass for r in layers if r.kept_mass is not None]
    inter = [r.interference for r in layers if r.interference is not None]

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    per_task = [list(r.task_interference) for r in layers if r.task_interference]
    num_tasks = max((len(t) for t in per_task), default=0)
    task_means = [mean([v for t in per_task if (v := t[i]) is not None]) for i in range(num_tasks)]
    if len(per_task) < len(layers):
        task_means = []  # not every layer: not the model's per-task interference

    return {
        "layers": len(layers),
        "mean_rank": mean(ranks),
        "mean_kept_mass": mean(masses),
        "mean_interference_vs_sum": mean(inter),
        "mean_interference_vs_sum_per_task": task_means,
        "layers_with_per_task_interference": len(per_task),
        "per_layer": {
            r.names[0]: {
                "rank": r.rank,
                "kept_mass": r.kept_mass,
                "interference_vs_sum": r.interference,
                "interference_vs_sum_per_task": list(r.task_interference or ()),
                "decomposition": r.decomposition_url,
            }
            for r in layers
        },
    }


def bytes_read(records: Sequence[MergedRecord], run_id: str, num_experts: int) -> dict[str, Any]:
    """Tensor bytes read in run ``run_id`` per input checkpoint, and artefact bytes, from the records."""
    inputs = [0] * (num_experts + 1)
    work = 0
    for record in records:
        if record.computed_in != run_id:
            continue  # found complete: nothing was read for it in this run
        for i, n in enumerate(record.bytes_read):
            inputs[i] += n
        work += record.work_bytes_read
    return {"base": inputs[0], "experts": inputs[1:], "work": work}
