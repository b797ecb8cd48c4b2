"""The two benchmarks the tune and methods studies run on, behind one interface.

A study needs, per benchmark: the base and expert folders of one seed's build, the evaluator (a
function of the pipeline's ``evaluators`` hook, with its options for a split), the objective that
``swudi tune`` maximises on the validation split, and the same metric on the test split.

- ``lm``: ``python -m benchmarks.lm.build`` (one build may hold every seed: ``experts/seed<k>/<domain>``);
  metric: mean over domains of the loss gap closed (0 = base, 1 = the domain's expert).
- ``encoder``: ``python -m benchmarks.retention.build_experts --eval-val`` (one folder per seed:
  ``seed<k>/{base,experts/<task>,heads}``); metric: mean over tasks of the normalised accuracy
  (merged accuracy / the expert's, each task scored with its expert's head), on the first
  ``max_examples`` examples of the split, the ones the build measured the experts on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StudyBenchmark:
    """One benchmark: where a seed's checkpoints are and how a model is scored."""

    name: str
    evaluator: str  # MODULE:FUNC for the config's evaluators
    metric: str  # the metric of task "all" the studies report
    metric_text: str  # one line for the reports

    @property
    def objective(self) -> str:
        """``MODULE:FUNC:all.METRIC``, the objective of ``swudi tune``."""
        return f"{self.evaluator}:all.{self.metric}"

    def base(self, build: Path) -> str:
        return str(build / "base")

    def experts(self, build: Path, seed: int) -> list[str]:
        if self.name == "lm":
            domains = json.loads((build / "manifest.json").read_text())["settings"]["domains"]
            return [str(build / "experts" / f"seed{seed}" / d) for d in domains]
        tasks = sorted(json.loads((build / "manifest.json").read_text())["tasks"])
        return [str(build / "experts" / t) for t in tasks]

    def evaluator_options(self, build: Path, seed: int, split: str, threads: int) -> dict[str, Any]:
        if self.name == "lm":
            return {"build": str(build), "split": split, "seed": seed, "aggregate": True, "threads": threads}
        tasks = json.loads((build / "manifest.json").read_text())["tasks"]
        (eval_examples,) = {entry["eval_examples"] for entry in tasks.values()}  # the build's one cap
        return {
            "heads_dir": str(build / "heads"),
            "split": split,
            "max_examples": eval_examples,
            "aggregate": True,
            "threads": threads,
        }

    def score(self, model: str, build: Path, seed: int, split: str, threads: int) -> float:
        """The study's metric of ``model`` (a folder or output URL) on ``split``."""
        module, func = self.evaluator.split(":")
        evaluate = getattr(__import__(module, fromlist=[func]), func)
        return float(evaluate(model, **self.evaluator_options(build, seed, split, threads))["all"][self.metric])


BENCHMARKS = {
    "lm": StudyBenchmark(
        "lm",
        "benchmarks.lm.evaluate:evaluate",
        "loss_gap_closed",
        "mean over domains of `loss_gap_closed` (0 = base, 1 = the domain's expert)",
    ),
    "encoder": StudyBenchmark(
        "encoder",
        "benchmarks.retention.evaluate:evaluate",
        "normalized_accuracy",
        "mean over the 8 tasks of the normalised accuracy (merged accuracy / the expert's, each task "
        "scored with its expert's head)",
    ),
}
