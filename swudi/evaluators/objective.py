"""An objective: one metric of one of the config's evaluators, to maximize or minimize.

Written ``module:function:TASK.METRIC`` (``mypkg.eval:evaluate:all.avg_norm_acc``). The function
must be one of the config's ``evaluators`` entries; its options are that entry's. A task name may
hold dots (``valid.jsonl``): ``TASK.METRIC`` is matched against the ``task.metric`` pairs the
evaluator returns, so the split needs no convention. Used by ``swudi tune`` (the score of each
candidate) and by the publish gate (:mod:`swudi.publish.gate`).

An objective's value must be a finite number: anything else (a string, NaN, a missing task or
metric) is an :class:`~swudi.errors.InputError` naming the evaluator, the objective and what it got.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swudi.config.merge_config import EvaluatorConfig
from swudi.errors import ConfigError, InputError
from swudi.evaluators.relative import cached_evaluation
from swudi.evaluators.runner import evaluator_options, load_evaluator
from swudi.io.fingerprint import digest
from swudi.storage.held_options import public_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Objective:
    """``evaluator`` (function and options, from the config), ``target`` (``TASK.METRIC``), direction."""

    evaluator: EvaluatorConfig
    target: str
    minimize: bool = False

    @property
    def spec(self) -> str:
        """``module:function:TASK.METRIC`` as written."""
        return f"{self.evaluator.function}:{self.target}"

    @property
    def evaluator_key(self) -> str:
        """Identity of the evaluation: the function and its options (what a cached score is keyed by)."""
        return evaluator_key(self.evaluator)

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``."""
        return a < b if self.minimize else a > b

    def describe(self) -> dict[str, Any]:
        """JSON-able description for reports: function, public options, target, direction."""
        return {
            "objective": self.spec,
            "function": self.evaluator.function,
            "options": public_options(self.evaluator.options),
            "minimize": self.minimize,
        }


def evaluator_key(evaluator: EvaluatorConfig) -> str:
    """digest(function, options): the same evaluator with other options is another evaluation."""
    return digest("evaluator", evaluator.function, evaluator.options)[:16]


def parse_objective(
    spec: str, evaluators: Sequence[EvaluatorConfig], minimize: bool = False, where: str = "--objective"
) -> Objective:
    """``module:function:TASK.METRIC`` -> :class:`Objective`, the function looked up in ``evaluators``.

    :class:`ConfigError` when the form is wrong or the function is not one of the evaluators (the
    configured ones are listed). Imports nothing: :func:`check_objective` does.
    """
    module, sep1, rest = spec.partition(":")
    function, sep2, target = rest.partition(":")
    if not (sep1 and sep2 and module and function) or "." not in target.strip(".") or target != target.strip():
        raise ConfigError(f"{where} {spec!r} is not of the form module:function:TASK.METRIC")
    reference = f"{module}:{function}"
    matches = [e for e in evaluators if e.function == reference]
    if not matches:
        known = ", ".join(e.function for e in evaluators) or "none"
        raise ConfigError(
            f"{where} {spec!r}: evaluator {reference!r} is not one of the config's evaluators ({known}); "
            "add it under `evaluators:` (its options come from there)"
        )
    if len(matches) > 1:
        raise ConfigError(f"{where} {spec!r}: evaluator {reference!r} is listed {len(matches)} times under evaluators")
    return Objective(matches[0], target, minimize)


def objective_value(objective: Objective, metrics: Any, model_url: str = "the model") -> float:
    """The objective's number in what the evaluator returned (``{task: {metric: value}}``).

    :class:`InputError` naming the evaluator when the result is not such a mapping, when no
    ``task.metric`` pair spells the target (the pairs it returned are listed), or when the value
    is not a finite number.
    """
    name = objective.evaluator.function
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise InputError(
            f"evaluator {name!r} returned {type(metrics).__name__} for {model_url}, "
            "expected a mapping {task: {metric: number}}"
        )
    pairs = {f"{task}.{metric}": value for task, values in metrics.items() for metric, value in values.items()}
    if objective.target not in pairs:
        known = ", ".join(sorted(pairs)) or "nothing"
        raise InputError(
            f"objective {objective.spec!r}: evaluator {name!r} returned no {objective.target!r} "
            f"for {model_url} (it returned {known})"
        )
    value = pairs[objective.target]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InputError(
            f"objective {objective.spec!r}: evaluator {name!r} returned {value!r} for {model_url}, not a finite number"
        )
    return float(value)


@dataclass(frozen=True)
class Score:
    """One evaluation: the objective's value, every numeric metric returned, seconds taken."""

    value: float
    metrics: dict[str, dict[str, float]]
    seconds: float


def evaluate(objective: Objective, model_url: str, storage_options: Mapping[str, Any] | None = None) -> Score:
    """Run the objective's evaluator on the model at ``model_url`` (with the config's
    ``storage_options`` when the function takes them, :func:`~swudi.evaluators.runner.evaluator_options`)
    and read the objective's value; the objective is checked first, so a non-number names it."""
    function = load_evaluator(objective.evaluator.function)
    log.info("evaluating %s with %s", model_url, objective.evaluator.function)
    started = time.perf_counter()
    metrics = function(model_url, **evaluator_options(objective.evaluator, function, storage_options))
    seconds = time.perf_counter() - started
    value = objective_value(objective, metrics, model_url)
    numeric = {
        str(task): {
            str(m): float(v)
            for m, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        for task, values in metrics.items()
    }
    return Score(value, numeric, seconds)


def checkpoint_value(
    objective: Objective, model_url: str, work_dir: str, storage_options: Mapping[str, Any] | None = None
) -> float:
    """The objective on a stored checkpoint (the base, a published version), evaluated once and
    cached by the checkpoint's fingerprint and the evaluator
    (:func:`swudi.evaluators.relative.cached_evaluation`, ``WORK/evaluations``)."""
    metrics = cached_evaluation(objective.evaluator, model_url, work_dir, storage_options)
    return objective_value(objective, metrics, model_url)


def check_objective(objective: Objective) -> None:
    """Import the objective's evaluator now (a typo fails before any work)."""
    load_evaluator(objective.evaluator.function)
