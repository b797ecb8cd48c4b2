"""Evaluators: user functions ``module:function(model_path, **options)`` run on a merged version
(:mod:`swudi.evaluators.runner`)."""

from swudi.evaluators.runner import check_evaluators, load_evaluator, run_evaluators

__all__ = ["check_evaluators", "load_evaluator", "run_evaluators"]
