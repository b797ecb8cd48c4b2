"""The merge flow: checkpoints -> per-layer decompose / select rank / merge -> evaluate -> publish.

Layers run as parallel Prefect tasks on a bounded thread pool or on Dask (prefect-dask). The work
folder's artefacts say what is done: killed and re-run, a merge submits only the layers whose
merged artefact is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.context import FlowRunContext, get_run_context
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.log_filters import install as quiet_input_error_tracebacks
from flows.parameters import config_parameter, hold_storage_options
from flows.progress import MergeProgress
from swudi.config.merge_config import MergeConfig
from swudi.errors import is_input_error
from swudi.evaluators.relative import check_relative_inputs
from swudi.evaluators.runner import check_evaluators
from swudi.methods import get_method
from swudi.pipeline.keys import artefact_keys, group_merge_key, layer_merge_key
from swudi.pipeline.plan import MergePlan, batch_blocks, build_plan, workers_within_budget
from swudi.pipeline.preflight import check_before_merge
from swudi.pipeline.records import PHASES, MergedRecord
from swudi.pipeline.results import MergeResult, TimeSplit
from swudi.pipeline.summary import bytes_read
from swudi.pipeline.workdir import remove_lease, write_lease
from swudi.publish.publish_model import PublishResult
from swudi.storage.held_options import without_secrets, worker_environment
from swudi.units import format_bytes
from tasks import (
    evaluate_merge,
    fetch_checkpoints,
    find_completed,
    merge_block,
    merge_group,
    publish_model,
    push_to_hub,
)
from tasks.merge import task_label


def task_runner(config: MergeConfig) -> Any:
    """The configured runner: a thread pool bounded by ``workers``, or Dask: a running scheduler
    (``address``), a cluster started for the run by ``cluster_class``, or a local cluster."""
    if config.task_runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if config.task_runner.address:
            return DaskTaskRunner(address=config.task_runner.address)
        if config.task_runner.cluster_class:  # Dask's own deploy tools: KubeCluster, SSHCluster, Coiled...
            return DaskTaskRunner(
                cluster_class=config.task_runner.cluster_class,
                cluster_kwargs=dict(config.task_runner.cluster_kwargs),
                adapt_kwargs=config.task_runner.adapt_kwargs,
            )
        # the local workers are this process's children: they get its S3 credentials through their
        # environment, never with a task
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": config.task_runner.n_workers,
                "threads_per_worker": config.task_runner.threads_per_worker,
                "processes": True,
                "dashboard_address": None,
                "env": worker_environment(config.storage_options),
            }
        )
    return ThreadPoolTaskRunner(max_workers=config.workers)


def _wait(futures: Sequence[PrefectFuture], progress: MergeProgress) -> list[MergedRecord | list[MergedRecord]]:
    """Results of ``futures`` in their order; ``progress`` counts each task's records as it finishes.

    The first task that fails ends the wait: the tasks not started yet are cancelled and its error
    is raised. (Waiting for all of them let every queued task meet a silent store in turn, each
    spending its whole retry deadline: a blackholed S3 endpoint kept a merge running for minutes,
    far past the bound of docs/reliability.md, when the machine was busy.)
    """
    pending = list(futures)
    for future in as_completed(pending):
        try:
            result = future.result()
        except Exception:
            for other in pending:
                wrapped = getattr(other, "wrapped_future", None)
                if other is not future and wrapped is not None and hasattr(wrapped, "cancel"):
                    wrapped.cancel()  # a task not started never starts; running ones end within their deadline
            raise
        progress.finished(result if isinstance(result, list) else [result])
    return [future.result() for future in futures]


@flow(name="swudi-merge", log_prints=True, validate_parameters=False)
def merge(
    config: dict[str, Any], storage_options_ref: str | None = None, tuning: dict[str, Any] | None = None
) -> MergeResult:
    """Merge the configured base and experts and publish the result.

    ``config`` is a :class:`~swudi.config.MergeConfig` as a mapping (validated here), its storage
    options held in memory under ``storage_options_ref`` (:mod:`flows.parameters`). What is done
    is decided by the work folder's artefacts: only layers and groups without a complete merged
    artefact are submitted. Returns the published version and URL, what was computed or reused in
    this run, the bytes read, the diagnostics summary and the per-tensor records. ``tuning``: the
    table of ``swudi tune`` whose winner this merge publishes (into the report and the model card).
    """
    cfg = config_parameter(config, storage_options_ref)
    started = time.perf_counter()
    run_id = _flow_run_id()
    stages: dict[str, float] = {}  # wall seconds of each stage, as the flow sees them
    plan = fetch_checkpoints(cfg)
    stages["plan"] = time.perf_counter() - started
    layers, groups = plan.layer_jobs, plan.group_jobs
    keys = [layer_merge_key(job, cfg) for job in layers] + [group_merge_key(group, cfg) for group in groups]
    write_lease(cfg, run_id, artefact_keys(layers, groups, cfg))  # `swudi gc` keeps what this run needs
    mark = time.perf_counter()
    done = find_completed(keys, cfg)
    stages["find_completed"] = time.perf_counter() - mark
    mark = time.perf_counter()
    todo_layers = [job for job, key in zip(layers, keys[: len(layers)], strict=True) if key not in done]
    todo_groups = [group for group, key in zip(groups, keys[len(layers) :], strict=True) if key not in done]
    # whole transformer blocks per task, small blocks packed together: orchestration stays cheap
    batches = batch_blocks(todo_layers, len(plan.expert_urls), cfg.workers)
    # tasks get public storage options and a reference to the full ones (no secret travels to a
    # Dask worker in another process: it takes its credentials from its own environment)
    public = without_secrets(cfg)
    futures: list[PrefectFuture[Any]] = []
    if batches:
        labels = [task_label(batch) for batch in batches]
        futures.extend(
            merge_block.map(labels, batches, unmapped(public), unmapped(run_id), unmapped(storage_options_ref))
        )
    if todo_groups:
        labels = [task_label(group) for group in todo_groups]
        futures.extend(
            merge_group.map(labels, todo_groups, unmapped(public), unmapped(run_id), unmapped(storage_options_ref))
        )
    total = len(todo_layers) + len(todo_groups)
    with MergeProgress(total, reused=len(keys) - total, logger=get_run_logger()) as progress:
        results = _wait(futures, progress)
    computed = {
        record.key: record for result in results for record in (result if isinstance(result, list) else [result])
    }
    records = [done[key] if key in done else computed[key] for key in keys]
    stages["merge"] = time.perf_counter() - mark
    mark = time.perf_counter()
    diagnostics = evaluate_merge(records)
    stages["evaluate"] = time.perf_counter() - mark
    io = bytes_read(records, run_id, len(plan.expert_urls))
    io["headers"] = list(plan.header_bytes)
    now = [r for r in records if r.computed_in == run_id]
    phases = {phase: round(sum(r.phases.get(phase, 0.0) for r in now), 3) for phase in PHASES}
    timings = {
        "stage_wall_seconds": {k: round(v, 3) for k, v in stages.items()},
        "task_phase_seconds": phases,  # summed over this run's merge tasks (they run in parallel)
        "decompose_seconds_computed": sum(r.decompose_seconds for r in now),
    }
    mark = time.perf_counter()
    try:
        published = publish_model(cfg, plan, records, diagnostics, timings, io, tuning)
    except Exception as error:
        if is_input_error(error):  # e.g. an evaluator that fails: this run is over, a re-run needs a fix
            remove_lease(cfg, run_id)
        raise
    remove_lease(cfg, run_id)  # the published version's report now names its artefacts
    stages["publish"] = time.perf_counter() - mark
    hub_commit = push_to_hub(cfg, published) if cfg.push_to_hub else None
    diagnostics_summary = {k: v for k, v in diagnostics.items() if k != "per_layer"}
    summary = _run_summary(cfg, plan, records, run_id, published, stages, phases, len(futures), started)
    summary["hub_commit"] = hub_commit
    summary["diagnostics"] = diagnostics_summary
    get_run_logger().info(
        "merged %d layers and %d groups (%d merges and %d decompositions computed in this run, the rest "
        "reused; read %s of the inputs) -> %s",
        summary["layers"],
        summary["groups"],
        summary["computed"],
        summary["decompositions_computed"],
        format_bytes(published["io"]["input_bytes"]),
        published["url"],
    )
    return summary


def _run_summary(
    cfg: MergeConfig,
    plan: MergePlan,
    records: Sequence[MergedRecord],
    run_id: str,
    published: PublishResult,
    stages: dict[str, float],
    phases: dict[str, float],
    submitted: int,
    started: float,
) -> MergeResult:
    """What a run did: the version, what was computed or reused, bytes read and the time split.

    The time split holds two kinds of seconds. Wall seconds of the flow body: ``wall``, ``plan``,
    ``publish`` and ``orchestration`` = wall - plan - publish - (seconds of this run's merge tasks) /
    ``tasks_in_parallel``: what the work does not explain. Task seconds, summed over this run's merge
    tasks (which run in parallel, so their sum may exceed the wall): ``read``, ``decompose``,
    ``merge``, ``diagnostics``, ``write``. :func:`run_merge` adds the flow run's start and finish.
    """
    layers = len(plan.layer_jobs)
    now = [r for r in records if r.computed_in == run_id]
    spectral = get_method(cfg.method).kind == "spectral"
    decomposed_now = sum(1 for r in records[:layers] if r.computed_in == run_id and r.decomposed) if spectral else 0
    wall = time.perf_counter() - started
    parallel = min(max(1, submitted), _parallelism(cfg))
    work = stages["plan"] + sum(r.seconds for r in now) / parallel + published["seconds"]
    return {  # hub_commit and diagnostics are the flow's
        "version": published["version"],
        "url": published["url"],
        "flow_run_id": run_id,
        "task_runs": submitted
        + 4
        + (1 if cfg.push_to_hub else 0),  # fetch, find-completed, merges, evaluate, publish, push
        "layers": layers,
        "groups": len(records) - layers,
        "computed": len(now),
        "reused": len(records) - len(now),
        "decompositions_computed": decomposed_now,
        "decompositions_reused": (layers - decomposed_now) if spectral else 0,
        "io": published["io"],
        "seconds": round(wall, 3),
        "time_split": TimeSplit(
            read=phases["read"],
            decompose=phases["decompose"],
            merge=phases["merge"],
            diagnostics=phases["diagnostics"],
            write=phases["write"],
            publish=round(published["seconds"], 3),
            plan=round(stages["plan"], 3),
            orchestration=round(max(0.0, wall - work), 3),
            flow_run=0.0,  # set by run_merge: creating and finishing the flow run and its task runner
            wall=round(wall, 3),
            tasks_in_parallel=parallel,
        ),
        "records": [r.__dict__ for r in records],
        "hub_commit": None,
        "diagnostics": {},
    }


def _parallelism(config: MergeConfig) -> int:
    """How many merge tasks run at once."""
    if config.task_runner.kind == "dask":
        return config.task_runner.n_workers * config.task_runner.threads_per_worker
    return config.workers


def _flow_run_id() -> str:
    context = get_run_context()
    if not isinstance(context, FlowRunContext) or context.flow_run is None:
        raise RuntimeError("the merge flow's run id is asked for outside a flow run")
    return str(context.flow_run.id)


def run_merge(config: MergeConfig, tuning: dict[str, Any] | None = None) -> MergeResult:
    """Run the merge flow with the runner the config asks for
    (:func:`swudi.pipeline.preflight.check_before_merge` first;
    with a ``memory_budget``, ``workers`` is lowered to what fits it, from the checkpoint headers;
    ``tuning``: see :func:`merge`)."""
    quiet_input_error_tracebacks()  # an input error is logged as one line, not with its traceback
    check_before_merge(config)  # inputs, output and work folder, device, scheduler: before Prefect starts
    check_evaluators(config.evaluators, config.storage_options)
    check_relative_inputs(config)  # the base and experts a relative evaluator also runs on
    if config.memory_budget is not None:  # fewer tasks in flight when the budget asks for it
        workers = workers_within_budget(build_plan(config), config)
        if workers < config.workers:
            logging.getLogger(__name__).info("memory_budget: %d tasks in flight instead of %d", workers, config.workers)
            config = config.model_copy(update={"workers": workers})
    started = time.perf_counter()
    with hold_storage_options(config) as (parameter, ref):
        result: MergeResult = merge.with_options(task_runner=task_runner(config))(parameter, ref, tuning)
    # creating and finishing the flow run and the task runner happen outside the flow body: part of
    # the wall and of the orchestration, and said apart (``flow_run``)
    split = result["time_split"]
    outside = max(0.0, time.perf_counter() - started - split["wall"])
    split["flow_run"] = round(outside, 3)
    split["orchestration"] = round(split["orchestration"] + outside, 3)
    split["wall"] = round(split["wall"] + outside, 3)
    result["seconds"] = split["wall"]  # the whole run, as the time split counts it
    return result
