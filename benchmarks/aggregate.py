"""The ``all`` task of a benchmark evaluator: the mean over tasks of every metric they all have.

An evaluator called with ``aggregate=True`` returns ``{**per_task, "all": mean_over_tasks(per_task)}``,
so that ``MODULE:FUNC:all.METRIC`` is an objective for ``swudi tune`` and ``gate:``.
"""

from __future__ import annotations

from collections.abc import Mapping


def mean_over_tasks(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{metric: sum over tasks t of results[t][metric] / number of tasks}`` for the metrics every task has."""
    shared = set.intersection(*(set(v) for v in results.values())) if results else set()
    return {k: sum(v[k] for v in results.values()) / len(results) for k in sorted(shared)}
