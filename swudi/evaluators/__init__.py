"""Evaluators: functions ``module:function(model_path, **options) -> {task: {metric: value}}`` run on a
merged version (:mod:`swudi.evaluators.runner`), and the built-in ones:

- ``swudi.evaluators:causal_lm_loss``: next-token loss and perplexity of a causal LM on text or
  JSONL files (:mod:`swudi.evaluators.causal_lm`);
- ``swudi.evaluators:sequence_classification``: accuracy of a sequence classifier on JSONL
  ``{text, label}`` files (:mod:`swudi.evaluators.classification`).

transformers is imported only when a built-in evaluator runs. Relative metrics (against the base
and the experts): :mod:`swudi.evaluators.relative`.
"""

from swudi.evaluators.causal_lm import causal_lm_loss
from swudi.evaluators.classification import sequence_classification
from swudi.evaluators.runner import check_evaluators, load_evaluator, run_evaluator, run_evaluators

__all__ = [
    "causal_lm_loss",
    "check_evaluators",
    "load_evaluator",
    "run_evaluator",
    "run_evaluators",
    "sequence_classification",
]
