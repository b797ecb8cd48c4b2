"""The tune flow: merge candidates from the cached decompositions, score each, publish the winner.

One run (:func:`run_tune`):

1. checks everything before any merge: the objective names one of the config's evaluators, every
   grid point is a valid config, the inputs are there, and the objective evaluated on the *base*
   checkpoint is a number (an unknown task or metric, or a non-number, fails here; the base's
   result is cached in ``WORK/evaluations`` as for relative metrics and the gate);
2. for each grid point: look up its score (``WORK/scores.json``, keyed by the candidate's version
   id and the evaluator); if absent, merge it (a subflow, publishing into a staging folder of the
   work folder: the first candidate reads the experts, later ones the stored decompositions or
   deltas), evaluate it, record the score, delete the staged folder and the merged artefacts of
   every candidate but the best (disk bounded to one staged candidate);
3. ``--refine N``: up to N more scales of the best setting, by bracketing and golden section
   (:mod:`swudi.tuning.refine`), scored the same way;
4. publishes the winner as a normal version under the output (gate included); its merge report and
   model card carry the tuning table; ``WORK/tune/<id>/tune.json`` and ``tune.png`` (score vs scale)
   are written beside.

A killed tune run again finds every finished candidate's score cached and evaluates only the rest.
Nothing secret is written: scores, settings and URLs only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.merge import run_merge
from flows.parameters import config_parameter, hold_storage_options
from swudi.config.merge_config import MergeConfig
from swudi.evaluators.objective import Objective, Score, check_objective, checkpoint_value, evaluate
from swudi.evaluators.scores import ScoreStore
from swudi.pipeline.keys import artefact_keys
from swudi.pipeline.plan import MergePlan, build_plan, version_id
from swudi.pipeline.preflight import check_before_merge
from swudi.pipeline.records import DECOMPOSITIONS, DELTAS, MERGED
from swudi.pipeline.workdir import remove_lease, write_lease
from swudi.reporting.plots import plot_tune
from swudi.storage.filesystem import join_url, resolve, write_bytes_atomic
from swudi.storage.killpoints import storage_event
from swudi.tuning.candidates import (
    PLOT_NAME,
    RESULTS_NAME,
    STAGED_DIR,
    Candidate,
    TuneSetup,
    candidate,
    prepare_tune,
    refine_point,
    same_setting,
    tune_url,
    winner_config,
)
from swudi.tuning.refine import refine_minimum

log = logging.getLogger(__name__)


class _Tuner:
    """The state of one tune run: the scores file, the table so far, the best candidate's artefacts."""

    def __init__(self, setup: TuneSetup, plan: MergePlan) -> None:
        self.setup = setup
        self.config = setup.config
        self.objective: Objective = setup.objective
        self.plan = plan
        self.store = ScoreStore(self.config.resolved_work_dir, self.config.storage_options)
        self.root = tune_url(self.config, setup.tune_id)
        self.rows: list[dict[str, Any]] = []
        self.best: tuple[Candidate, dict[str, Any]] | None = None
        self.best_artefacts: set[str] = set()
        self.base_score: float | None = None
        # merged artefacts of the config's own setting are never deleted (a merge may have made them)
        self.protected = artefact_keys(plan.layer_jobs, plan.group_jobs, self.config)[MERGED]

    # ------------------------------------------------------------------------------ scoring
    def score(self, cand: Candidate) -> dict[str, Any]:
        """The candidate's row of the table: its cached score, or merge + evaluate + record."""
        key = version_id(cand.config, self.plan)
        row: dict[str, Any] = {"label": cand.label, "stage": cand.stage, **cand.settings(), "point": cand.point}
        row["version_key"] = key
        cached = self.store.get(key, self.objective)
        if cached is not None:
            log.info("tune: %s scored %.6g before (cached)", cand.label, cached.value)
            row.update(score=cached.value, merge_seconds=0.0, eval_seconds=cached.seconds, cached=True)
            row.update(seconds=cached.seconds, expert_bytes_read=0, metrics=cached.metrics, merge_cpu_seconds=0.0)
            self._add(cand, row, set())
            return row
        self._clear_staged()
        started, cpu = time.perf_counter(), time.process_time()
        try:
            merged = run_merge(cand.config)
            merge_seconds = time.perf_counter() - started
            merge_cpu = time.process_time() - cpu  # this process: the flow, its tasks (threads), publishing
            score: Score = evaluate(self.objective, merged["url"], self.config.storage_options)
            self.store.put(key, self.objective, score, cand.label)
        finally:
            self._clear_staged()  # the staged candidate goes once scored (or failed)
        experts = sum(c["tensor_bytes"] for c in merged["io"]["per_checkpoint"] if str(c["role"]).startswith("expert"))
        row.update(score=score.value, merge_seconds=round(merge_seconds, 3), eval_seconds=round(score.seconds, 3))
        row.update(seconds=round(merge_seconds + score.seconds, 3), expert_bytes_read=experts, cached=False)
        row.update(metrics=score.metrics, decompositions_computed=merged.get("decompositions_computed", 0))
        row.update(merge_cpu_seconds=round(merge_cpu, 3), time_split=merged.get("time_split", {}))
        log.info(
            "tune: %s scored %.6g (%.1f s, %d expert bytes read)", cand.label, score.value, row["seconds"], experts
        )
        urls = {r["url"] for r in merged["records"] if r["key"] not in self.protected}
        self._add(cand, row, urls)
        return row

    def _add(self, cand: Candidate, row: dict[str, Any], artefacts: set[str]) -> None:
        self.rows.append(row)
        if self.best is None or self.objective.better(row["score"], self.best[1]["score"]):
            self._delete(self.best_artefacts - artefacts)
            self.best, self.best_artefacts = (cand, row), artefacts
        else:
            self._delete(artefacts - self.best_artefacts)
        self.write_results()

    def _delete(self, urls: set[str]) -> None:
        """Remove merged artefacts of candidates that lost (recomputed if ever needed again)."""
        for url in sorted(urls):
            fs, path = resolve(url, self.config.storage_options)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
                storage_event("deleted", path)

    def _clear_staged(self) -> None:
        fs, path = resolve(join_url(self.root, STAGED_DIR), self.config.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            storage_event("deleted", path)

    # ------------------------------------------------------------------------------ the search
    def refine(self, budget: int) -> None:
        """Up to ``budget`` more scales of the best setting (bracketing + golden section)."""
        if budget <= 0 or self.best is None:
            return
        best = self.best[0]
        if best.config.scale <= 0:
            log.warning(
                "tune: the best scale %s is not positive; --refine searches positive scales only", best.config.scale
            )
            return
        sign = 1.0 if self.objective.minimize else -1.0
        line = [r for r in self.rows if (r["method"], r["params"]) == (best.config.method, best.config.params)]
        known = {float(r["scale"]): sign * r["score"] for r in line if r["scale"] > 0}

        def f(scale: float) -> float:
            probe = candidate(self.config, refine_point(best, scale), self.setup.tune_id, stage="refine")
            assert same_setting(probe, best)
            return sign * self.score(probe)["score"]

        refine_minimum(f, known, budget, lower=0.0)

    # ------------------------------------------------------------------------------ results
    def table(self) -> dict[str, Any]:
        """The tuning table as the report, the model card and ``tune.json`` hold it."""
        keys = ("label", "stage", "method", "params", "scale", "score", "seconds", "merge_seconds", "eval_seconds")
        winner = self.best[1] if self.best else None
        return {
            "tune_id": self.setup.tune_id,
            "objective": self.objective.describe(),
            "grid": [[k, v] for k, v in self.setup.grid],
            "refine": self.setup.refine,
            "base_score": self.base_score,
            "candidates": [
                {k: r.get(k) for k in (*keys, "merge_cpu_seconds", "cached", "expert_bytes_read")} for r in self.rows
            ],
            "winner": {k: winner[k] for k in ("label", "method", "params", "scale", "score")} if winner else None,
            "results": join_url(self.root, RESULTS_NAME),
            "plot": join_url(self.root, PLOT_NAME),
        }

    def write_results(self, published: dict[str, Any] | None = None) -> str:
        body = {**self.table(), "rows": self.rows, "published": published}
        url = join_url(self.root, RESULTS_NAME)
        data = (json.dumps(body, indent=2, sort_keys=True, default=str) + "\n").encode()
        write_bytes_atomic(url, data, self.config.storage_options)
        return url

    def write_plot(self) -> str:
        rows = [*self.rows, {"label": "base", "score": self.base_score}] if self.base_score is not None else self.rows
        winner = self.best[0].label if self.best else None
        url = join_url(self.root, PLOT_NAME)
        write_bytes_atomic(url, plot_tune(rows, self.objective.target, winner), self.config.storage_options)
        return url


def _lease_keys(setup: TuneSetup) -> dict[str, set[str]]:
    """The decompositions and deltas the grid's settings use (one plan per method and params)."""
    keys: dict[str, set[str]] = {DECOMPOSITIONS: set(), DELTAS: set(), MERGED: set()}
    seen: list[Any] = []
    for cand in setup.candidates:
        setting = (cand.config.method, cand.config.params)
        if setting in seen:
            continue
        seen.append(setting)
        plan = build_plan(cand.config)
        for kind, values in artefact_keys(plan.layer_jobs, plan.group_jobs, cand.config).items():
            if kind != MERGED:
                keys[kind] |= values
    return keys


@flow(name="swudi-tune", validate_parameters=False)
def tune(
    config: dict[str, Any],
    objective: str,
    grid: list[str],
    refine: int = 0,
    minimize: bool = False,
    storage_options_ref: str | None = None,
) -> dict[str, Any]:
    """Tune the config's settings over ``grid`` (+ ``refine`` scales) on ``objective``; publish the
    winner (module doc). Returns the table (``candidates``), the ``winner``, ``base_score``,
    ``published`` (the merge result of the winner: version, url...), ``results`` and ``plot`` URLs."""
    cfg = config_parameter(config, storage_options_ref)
    setup = prepare_tune(cfg, objective, grid, refine, minimize)
    plan = build_plan(cfg)
    tuner = _Tuner(setup, plan)
    lease = f"tune-{setup.tune_id}"
    write_lease(cfg, lease, _lease_keys(setup))  # `swudi gc` keeps the shared decompositions meanwhile
    try:
        # the objective on the base: a wrong task or metric, or a non-number, fails before any merge
        tuner.base_score = checkpoint_value(setup.objective, cfg.base, cfg.resolved_work_dir, cfg.storage_options)
        for cand in setup.candidates:
            tuner.score(cand)
        tuner.refine(setup.refine)
        plot = tuner.write_plot()
        assert tuner.best is not None
        table = tuner.table()
        published = run_merge(winner_config(cfg, tuner.best[0]), tuning=table)
        summary = {k: published[k] for k in ("version", "url", "flow_run_id", "task_runs", "seconds")}
        results = tuner.write_results(summary)
    finally:
        remove_lease(cfg, lease)
    create_table_artifact(
        [{k: r.get(k) for k in ("label", "method", "scale", "score", "seconds", "cached")} for r in tuner.rows],
        key="swudi-tune",
        description=f"swudi tune {setup.tune_id} on {setup.objective.spec}: winner {table['winner']}",
    )
    return {**table, "rows": tuner.rows, "published": summary, "results": results, "plot": plot}


def run_tune(
    config: MergeConfig,
    objective: str,
    grid: Sequence[str],
    refine: int = 0,
    minimize: bool = False,
) -> dict[str, Any]:
    """Run the tune flow (``objective``: ``module:function:TASK.METRIC``; ``grid``: ``KEY=V1,V2,...``
    strings as for ``swudi sweep``). Everything that can be checked without evaluating is checked
    before Prefect starts. Returns what :func:`tune` returns; each of its ``rows`` holds the
    candidate's settings, ``score``, ``metrics`` (all the evaluator returned), ``merge_seconds`` and
    ``merge_cpu_seconds`` (the candidate's merge flow, evaluator excluded; CPU of this process, the
    thread runner's tasks included), ``eval_seconds``, ``expert_bytes_read``, ``time_split`` (the
    merge's phases) and ``cached`` (scored by an earlier run: nothing merged or evaluated)."""
    setup = prepare_tune(config, objective, list(grid), refine, minimize)
    check_before_merge(config)
    check_objective(setup.objective)
    with hold_storage_options(config) as (parameter, ref):
        result: dict[str, Any] = tune(parameter, objective, list(grid), refine, minimize, ref)
    return result
