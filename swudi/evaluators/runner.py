"""User evaluators: ``module:function(model_path, **options) -> {task: {metric: value}}``.

An evaluator is called with the URL of a merged model folder (before that version is pointed to
by ``latest.json``) and returns metrics per task. Its results go into the merge report.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from swudi.config.merge_config import EvaluatorConfig
from swudi.errors import ConfigError, InputError, SwudiError

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def load_evaluator(reference: str) -> Callable[..., Mapping[str, Mapping[str, float]]]:
    """Import ``module:function`` from the installed packages or the current directory (as
    ``python -m`` would); :class:`ConfigError` naming what is missing."""
    module_name, _, function_name = reference.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"evaluator {reference!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"evaluator {reference!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _check_metrics(reference: str, metrics: Any) -> Metrics:
    if not isinstance(metrics, Mapping):
        raise InputError(
            f"evaluator {reference!r} returned {type(metrics).__name__}, "
            "expected a mapping {task: {metric: number}}"
        )
    checked: Metrics = {}
    for task_name, values in metrics.items():
        if not isinstance(values, Mapping):
            raise InputError(f"evaluator {reference!r}: metrics of task {task_name!r} are not a mapping")
        checked[str(task_name)] = {}
        for metric, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
                raise InputError(f"evaluator {reference!r}: {task_name}.{metric} is {shown}, expected a finite number")
            number = float(value)
            checked[str(task_name)][str(metric)] = number
    return checked


def _accepts_storage_options(function: Callable[..., Any]) -> bool:
    try:
        return "storage_options" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C function: no signature to inspect
        return False


def evaluator_options(
    evaluator: EvaluatorConfig,
    function: Callable[..., Any],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of one call: the entry's options, plus the merge config's
    ``storage_options`` when the function has a ``storage_options`` parameter the entry does not set
    (so credentials are written once, in the config, and stay out of the options and the version id)."""
    options = dict(evaluator.options)
    if storage_options is not None and "storage_options" not in options and _accepts_storage_options(function):
        options["storage_options"] = dict(storage_options)
    return options


def check_evaluators(evaluators: Sequence[EvaluatorConfig], storage_options: Mapping[str, Any] | None = None) -> None:
    """Import every evaluator now, so that a typo fails before any merge work. An evaluator function
    with a ``check_options(options)`` attribute (the built-in ones) has its options checked too
    (unknown option, evaluation files missing or malformed): :class:`ConfigError` / :class:`InputError`."""
    for evaluator in evaluators:
        function = load_evaluator(evaluator.function)
        check = getattr(function, "check_options", None)
        if callable(check):
            check(evaluator_options(evaluator, function, storage_options))


def run_evaluator(
    evaluator: EvaluatorConfig, model_url: str, storage_options: Mapping[str, Any] | None = None
) -> Metrics:
    """Run one evaluator on the model at ``model_url``; its checked metrics ``{task: {metric: value}}``.

    An evaluator that raises, or returns anything but ``{task: {metric: finite number}}``, is an
    :class:`~swudi.errors.InputError` naming it (the same code would fail again: not retried)."""
    function = load_evaluator(evaluator.function)
    log.info("evaluating %s with %s", model_url, evaluator.function)
    try:
        metrics = function(model_url, **evaluator_options(evaluator, function, storage_options))
    except SwudiError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is reported as one line
        message = " ".join(str(error).split())[:300]
        raise InputError(
            f"evaluator {evaluator.function!r} failed on {model_url}: {type(error).__name__}: {message} "
            "(fix the evaluator or remove it from evaluators; nothing was published)"
        ) from None
    return _check_metrics(evaluator.function, metrics)


def run_evaluators(
    evaluators: Sequence[EvaluatorConfig], model_url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Metrics]:
    """Run every evaluator on the model at ``model_url``; ``{reference: metrics}``."""
    return {evaluator.function: run_evaluator(evaluator, model_url, storage_options) for evaluator in evaluators}
