"""Cached scores of ``swudi tune`` candidates: ``WORK/scores.json``, one entry per (candidate, evaluator).

A candidate is deleted once scored, so it is named by its version id
(:func:`swudi.pipeline.plan.version_id`: inputs, settings, code), not by the fingerprint of files
that no longer exist (stored checkpoints, the base or a published version, are cached by
:func:`swudi.evaluators.relative.cached_evaluation` instead). An entry is keyed by
``digest(model key, evaluator function, evaluator options)`` and holds every numeric metric the
evaluator returned, so another objective of the same evaluator needs no new run. The file is
rewritten in one piece (:func:`swudi.storage.filesystem.write_bytes_atomic`) after each new score:
a killed tune or gate keeps every score finished before the kill. Nothing secret is written: the
evaluator's options enter the key as a digest only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from swudi.evaluators.objective import Objective, Score, objective_value
from swudi.io.fingerprint import digest
from swudi.storage.filesystem import join_url, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

SCORES_NAME = "scores.json"


def score_key(model_key: str, objective: Objective) -> str:
    """Identity of one evaluation: the model's content key and the evaluator (function + options)."""
    return digest("score", model_key, objective.evaluator_key)[:24]


class ScoreStore:
    """The scores file of a work folder (module doc)."""

    def __init__(self, work_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = join_url(work_url, SCORES_NAME)
        self.storage_options = storage_options

    def _read(self) -> dict[str, Any]:
        fs, path = resolve(self.url, self.storage_options)
        try:
            data = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is not JSON; its scores are computed again", self.url)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, model_key: str, objective: Objective) -> Score | None:
        """The stored score of this model and evaluator (None if never evaluated)."""
        entry = self._read().get(score_key(model_key, objective))
        if not isinstance(entry, dict):
            return None
        try:
            metrics = entry["metrics"]
            return Score(objective_value(objective, metrics, entry.get("model", model_key)), metrics, entry["seconds"])
        except (KeyError, TypeError):
            return None

    def put(self, model_key: str, objective: Objective, score: Score, model: str = "") -> None:
        """Record a score (the whole file is rewritten atomically)."""
        data = self._read()
        data[score_key(model_key, objective)] = {
            "model_key": model_key,
            "model": model,
            "evaluator": objective.evaluator.function,
            "metrics": score.metrics,
            "seconds": round(score.seconds, 3),
        }
        write_bytes_atomic(self.url, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), self.storage_options)

    def score(self, model_key: str, objective: Objective, model_url: str, evaluate: Callable[[], Score]) -> Score:
        """The cached score, or ``evaluate()`` recorded under this key."""
        cached = self.get(model_key, objective)
        if cached is not None:
            log.info("score of %s with %s read from %s", model_key, objective.evaluator.function, self.url)
            return cached
        fresh = evaluate()
        self.put(model_key, objective, fresh, model_url)
        return fresh
