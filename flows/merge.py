"""The merge flow: checkpoints -> per-layer decompose / select rank / merge -> evaluate -> publish.

Layers run as parallel, cached Prefect tasks on a bounded thread pool or on Dask (prefect-dask);
killed and re-run, a merge computes only the layers that had not finished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from swudi.config import MergeConfig, config_from_mapping
from swudi.evaluators import check_evaluators
from swudi.methods import get_method
from swudi.plan import check_inputs_exist
from swudi.steps import MergedRecord
from tasks import (decompose_layer, evaluate_merge, fetch_checkpoints, merge_group, merge_layer,
                   publish_model, select_rank)
from tasks.caching import result_storage


def task_runner(config: MergeConfig) -> Any:
    """The configured runner: a thread pool bounded by ``workers``, or a Dask cluster."""
    if config.task_runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if config.task_runner.address:
            return DaskTaskRunner(address=config.task_runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.task_runner.n_workers,
                                              "threads_per_worker": config.task_runner.threads_per_worker,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=config.workers)


def _wait(futures: Sequence[PrefectFuture], label: str) -> list[MergedRecord]:
    """Results of ``futures`` in their order, with a progress bar of tensors merged per second."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                        disable=not sys.stderr.isatty())
    started = time.perf_counter()
    with progress:
        bar = progress.add_task(label, total=len(futures), rate="")
        for done, _ in enumerate(as_completed(list(futures)), start=1):
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress.update(bar, advance=1, rate=f"{rate:.2f}/s")
    return [future.result() for future in futures]


@flow(name="swudi-merge", log_prints=True, validate_parameters=False)
def merge(config: dict[str, Any]) -> dict[str, Any]:
    """Merge the configured base and experts and publish the result.

    ``config`` is a :class:`~swudi.config.MergeConfig` as a mapping (validated here). Returns the
    published version and URL, what was computed or reused in this run, the diagnostics summary
    and the per-tensor records.
    """
    cfg = config if isinstance(config, MergeConfig) else config_from_mapping(config, "flow parameter")
    started = time.perf_counter()
    plan = fetch_checkpoints(cfg)
    storage = result_storage(cfg)  # cache records live in the work folder
    decompose, rank, merge_one, merge_many = (
        t.with_options(result_storage=storage) for t in (decompose_layer, select_rank, merge_layer, merge_group))
    layers = plan.layer_jobs
    spectral = get_method(cfg.method).kind == "spectral"
    if spectral:
        decompositions = decompose.map(layers, unmapped(cfg))
        ranks = rank.map(decompositions, unmapped(cfg))
        merged_layers = merge_one.map(layers, unmapped(cfg), decompositions, ranks)
    else:
        merged_layers = merge_one.map(layers, unmapped(cfg))
    groups = [merge_many.submit(group, cfg) for group in plan.group_jobs]
    records = _wait([*merged_layers, *groups], f"merging {len(layers)} layers + {len(groups)} groups")
    decomposed = [future.result() for future in decompositions] if spectral else []
    merged_seconds = time.perf_counter() - started
    diagnostics = evaluate_merge(records)
    timings = {"merge_wall_seconds": merged_seconds,
               "decompose_seconds_computed": sum(d.seconds for d in decomposed)}
    published = publish_model(cfg, plan, records, diagnostics, timings)
    run_id = _flow_run_id()
    computed = sum(1 for r in records if r.computed_in == run_id)
    decomposed_now = sum(1 for d in decomposed if d.computed_in == run_id)
    get_run_logger().info("merged %d layers and %d groups (%d merges and %d decompositions computed in this run, "
             "the rest reused) -> %s", len(layers), len(groups), computed, decomposed_now,
             published["url"])
    return {
        "version": published["version"],
        "url": published["url"],
        "layers": len(layers),
        "groups": len(groups),
        "computed": computed,
        "reused": len(records) - computed,
        "decompositions_computed": decomposed_now,
        "decompositions_reused": len(decomposed) - decomposed_now,
        "seconds": round(time.perf_counter() - started, 3),
        "diagnostics": {k: v for k, v in diagnostics.items() if k != "per_layer"},
        "records": [r.__dict__ for r in records],
    }


def _flow_run_id() -> str:
    return str(get_run_context().flow_run.id)


def run_merge(config: MergeConfig) -> dict[str, Any]:
    """Run the merge flow with the runner the config asks for (inputs are checked to exist first)."""
    check_inputs_exist(config)
    check_evaluators(config.evaluators)
    return merge.with_options(task_runner=task_runner(config))(config.model_dump())
