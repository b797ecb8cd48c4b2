"""The typed results of a merge: what the merge flow returns (:class:`MergeResult`) and its time split.

Made by :func:`flows.merge.run_merge` and read by the command line, the sweep and refresh flows and
the benchmarks. Plain mappings (JSON-able, Prefect stores them as flow results) with their keys
declared; the publish step's result is :class:`swudi.publish.publish_model.PublishResult`.
"""

from __future__ import annotations

from typing import Any, TypedDict

from swudi.publish.publish_model import IoSummary

__all__ = ["TimeSplit", "MergeResult"]


class TimeSplit(TypedDict):
    """Where a merge run's seconds went. Two kinds of seconds, never added together:

    - wall seconds: ``wall`` (the whole run), ``plan``, ``publish``, ``orchestration`` = wall - plan -
      publish - (seconds of this run's merge tasks) / ``tasks_in_parallel`` (what the work does not
      explain), and ``flow_run``, the part of it spent creating and finishing the flow run;
    - task seconds, summed over this run's merge tasks (run in parallel, their sum may exceed the
      wall): ``read``, ``decompose``, ``merge``, ``diagnostics``, ``write``.
    """

    read: float
    decompose: float
    merge: float
    diagnostics: float
    write: float
    plan: float
    publish: float
    orchestration: float
    flow_run: float
    wall: float
    tasks_in_parallel: int


class MergeResult(TypedDict):
    """What one run of the merge flow did (:func:`flows.merge.run_merge`)."""

    version: str
    url: str
    flow_run_id: str
    task_runs: int  # task runs submitted (the CLI waits until each is in the run history)
    layers: int  # 2-D weights merged one by one
    groups: int  # groups of small tensors
    computed: int  # merges computed in this run (the rest reused from the work folder)
    reused: int
    decompositions_computed: int
    decompositions_reused: int
    io: IoSummary  # bytes this run read
    seconds: float  # the run's wall seconds (= time_split["wall"])
    time_split: TimeSplit
    records: list[dict[str, Any]]  # each tensor's MergedRecord as a mapping
    hub_commit: str | None  # the Hub commit URL when push_to_hub is set
    diagnostics: dict[str, Any]  # the data-free diagnostics summary (no per-layer rows)
