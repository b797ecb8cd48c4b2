"""Relative metrics: the merged model's score against the base's and the experts'.

An evaluator entry with ``relative: true`` is also run on the base and on every expert (each run
cached, below). Per task, for each metric whose direction is known by its name:

- lower is better (the name is ``loss`` or ``perplexity``, or ends in ``_loss`` or ``_perplexity``):
  ``gap_closed = (base - merged) / (base - expert)``: 1 = as good as the expert, 0 = no better than
  the base, < 0 = worse than the base (no value when base == expert);
- higher is better (``accuracy`` or a name ending in ``_accuracy``):
  ``normalized = merged / expert`` (no value when expert == 0);
- any other metric (``tokens``, ``examples``, ...) is not compared.

"The" expert of a task is, in this order: the one named for the task in the entry's
``task_experts`` (``{task: expert index (0-based, config order) or expert URL}``); the only expert
when there is one; else the best expert on that task and metric (lowest loss, highest accuracy; the
first in config order on a tie). The best expert is reported beside it in any case
(``best_expert_index``, ``best_expert``, ``gap_closed_best`` or ``normalized_best``). ``mean`` holds,
per metric, the mean of the relative value over the tasks that have one.

Cache: a run on the base or an expert is stored as ``WORK/evaluations/<key>.json`` (written
atomically), ``key = sha256(checkpoint fingerprint, fingerprints of its other files (config,
tokenizer), evaluator function, options without storage_options, digest of the evaluator's source
file)``. Changing the checkpoint's bytes, the options or the evaluator's module runs it again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from swudi.config.merge_config import EvaluatorConfig, MergeConfig
from swudi.errors import SwudiError
from swudi.evaluators.runner import Metrics, _check_metrics, load_evaluator, run_evaluator
from swudi.io.checkpoint import Checkpoint
from swudi.io.fingerprint import digest, shard_fingerprint
from swudi.storage.filesystem import join_url, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

CACHE_FOLDER = "evaluations"
LOWER_IS_BETTER = ("loss", "perplexity")
HIGHER_IS_BETTER = ("accuracy",)

Direction = Literal["lower", "higher"]


def direction(metric: str) -> Direction | None:
    """Whether a lower or a higher value of ``metric`` is better, by its name (module docstring)."""
    name = metric.lower()
    if any(name == n or name.endswith(f"_{n}") for n in LOWER_IS_BETTER):
        return "lower"
    if any(name == n or name.endswith(f"_{n}") for n in HIGHER_IS_BETTER):
        return "higher"
    return None


def relative_value(kind: Direction, merged: float, base: float, expert: float) -> float | None:
    """``(base - merged) / (base - expert)`` for a loss, ``merged / expert`` for an accuracy."""
    if kind == "lower":
        return (base - merged) / (base - expert) if base != expert else None
    return merged / expert if expert != 0 else None


def _value_name(kind: Direction) -> str:
    return "gap_closed" if kind == "lower" else "normalized"


def relative_metrics(
    merged: Mapping[str, Mapping[str, float]],
    base: Mapping[str, Mapping[str, float]],
    experts: Sequence[Mapping[str, Mapping[str, float]]],
    task_experts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """``{"tasks": {task: {metric: {...}}}, "mean": {metric: {...}}}`` (module docstring).

    ``task_experts`` maps tasks to expert indices. A task or metric missing from the base's or an
    expert's results is left out."""
    tasks: dict[str, dict[str, Any]] = {}
    for task, metrics in merged.items():
        for metric, value in metrics.items():
            kind = direction(metric)
            if kind is None or metric not in base.get(task, {}) or any(metric not in e.get(task, {}) for e in experts):
                continue
            values = [e[task][metric] for e in experts]
            best = (min if kind == "lower" else max)(range(len(values)), key=lambda i: values[i])
            if task_experts and task in task_experts:
                own, rule = task_experts[task], "task_experts"
            elif len(experts) == 1:
                own, rule = 0, "only expert"
            else:
                own, rule = best, "best expert"
            name = _value_name(kind)
            b = base[task][metric]
            tasks.setdefault(task, {})[metric] = {
                "merged": value,
                "base": b,
                "expert": values[own],
                "expert_index": own,
                "expert_rule": rule,
                name: relative_value(kind, value, b, values[own]),
                "best_expert_index": best,
                "best_expert": values[best],
                f"{name}_best": relative_value(kind, value, b, values[best]),
            }
    mean: dict[str, dict[str, Any]] = {}
    for per_metric in tasks.values():
        for metric, entry in per_metric.items():
            name = _value_name(direction(metric) or "lower")
            if entry[name] is not None:
                mean.setdefault(metric, {"measure": name, "values": []})["values"].append(entry[name])
    summary = {
        metric: {m["measure"]: sum(m["values"]) / len(m["values"]), "tasks": len(m["values"])}
        for metric, m in mean.items()
    }
    return {"tasks": tasks, "mean": summary}


def _source_digest(function: Any) -> str | None:
    """sha256 of the source file defining ``function`` (None when there is none)."""
    try:
        path = inspect.getsourcefile(function)
        if path is None:
            return None
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except (OSError, TypeError):
        return None


def evaluation_key(evaluator: EvaluatorConfig, model_url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The cache key of one evaluator run on the checkpoint at ``model_url`` (module docstring)."""
    checkpoint = Checkpoint.open(model_url, storage_options)
    extra = {}
    for name in checkpoint.extra_files:
        url = checkpoint.file_url(name)
        fs, path = resolve(url, storage_options)
        extra[name] = shard_fingerprint(fs, path, url=url)
    options = {k: v for k, v in evaluator.options.items() if k != "storage_options"}
    function = load_evaluator(evaluator.function)
    return digest("evaluation", checkpoint.fingerprint, extra, evaluator.function, options, _source_digest(function))


def cached_evaluation(
    evaluator: EvaluatorConfig, model_url: str, work_dir: str, storage_options: Mapping[str, Any] | None = None
) -> Metrics:
    """The evaluator's metrics on the checkpoint at ``model_url``, from ``WORK/evaluations`` when this
    checkpoint, function and options were evaluated before, else run and stored (atomically)."""
    key = evaluation_key(evaluator, model_url, storage_options)
    url = join_url(work_dir, CACHE_FOLDER, f"{key}.json")
    fs, path = resolve(url, storage_options)
    try:
        stored = json.loads(fs.cat_file(path))
        log.info("%s on %s: cached result %s", evaluator.function, model_url, url)
        return _check_metrics(evaluator.function, stored["metrics"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, SwudiError) as error:  # a damaged record is replaced, never trusted
        log.warning("%s: unreadable cached evaluation (%s); evaluating again", url, error)
    metrics = run_evaluator(evaluator, model_url, storage_options)
    record = {
        "function": evaluator.function,
        "options": {k: v for k, v in evaluator.options.items() if k != "storage_options"},
        "model": model_url,
        "metrics": metrics,
    }
    write_bytes_atomic(url, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(), storage_options)
    return metrics


def expert_indices(task_experts: Mapping[str, int | str], experts: Sequence[str]) -> dict[str, int]:
    """``task_experts`` with expert URLs replaced by their index in ``experts``."""
    return {task: ref if isinstance(ref, int) else list(experts).index(ref) for task, ref in task_experts.items()}


def check_relative_inputs(config: MergeConfig) -> None:
    """Before any merge work: the base and every expert pass the ``check_model(url, storage_options)``
    of each relative evaluator that has one (the built-in ones: a model folder with config.json)."""
    for evaluator in config.evaluators:
        check = getattr(load_evaluator(evaluator.function), "check_model", None)
        if evaluator.relative and callable(check):
            for url in (config.base, *config.experts):
                check(url, config.storage_options)


def relative_evaluations(config: MergeConfig, evaluations: Mapping[str, Metrics]) -> dict[str, Any]:
    """``{function: {"base": metrics, "experts": [metrics], **relative_metrics(...)}}`` for every
    evaluator entry with ``relative: true`` (base and expert runs cached in the work folder)."""
    results: dict[str, Any] = {}
    for evaluator in config.evaluators:
        if not evaluator.relative or evaluator.function not in evaluations:
            continue
        work, options = config.resolved_work_dir, config.storage_options
        base = cached_evaluation(evaluator, config.base, work, options)
        experts = [cached_evaluation(evaluator, url, work, options) for url in config.experts]
        mapping = expert_indices(evaluator.task_experts, config.experts)
        results[evaluator.function] = {
            "base": base,
            "experts": experts,
            **relative_metrics(evaluations[evaluator.function], base, experts, mapping),
        }
    return results
