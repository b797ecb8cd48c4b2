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

The studies' files: ``OUT/<name>.json`` holds the rows done so far (a re-run skips them) and
``OUT/<name>.md`` the table with the command that made it (:func:`read_rows`, :func:`save_rows`,
:func:`write_report`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StudyBenchmark:
    """One benchmark: where a seed's checkpoints are and how a model is scored (the two subclasses)."""

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
        raise NotImplementedError

    def evaluator_options(self, build: Path, seed: int, split: str, threads: int) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, model: str, build: Path, seed: int, split: str, threads: int) -> float:
        """The study's metric of ``model`` (a folder or output URL) on ``split``."""
        from swudi.evaluators.runner import load_evaluator

        evaluate = load_evaluator(self.evaluator)
        return float(evaluate(model, **self.evaluator_options(build, seed, split, threads))["all"][self.metric])


def _manifest(build: Path) -> dict[str, Any]:
    return dict(json.loads((build / "manifest.json").read_text()))


class LMBenchmark(StudyBenchmark):
    """One LM build may hold every seed's experts (``experts/seed<k>/<domain>``); scored by the build's
    references for that seed."""

    def experts(self, build: Path, seed: int) -> list[str]:
        return [str(build / "experts" / f"seed{seed}" / d) for d in _manifest(build)["settings"]["domains"]]

    def evaluator_options(self, build: Path, seed: int, split: str, threads: int) -> dict[str, Any]:
        return {"build": str(build), "split": split, "seed": seed, "aggregate": True, "threads": threads}


class EncoderBenchmark(StudyBenchmark):
    """One encoder build per seed (``seed<k>/{base,experts/<task>,heads}``); scored on the first
    ``eval_examples`` examples of a split, those the build measured the experts on."""

    def experts(self, build: Path, seed: int) -> list[str]:
        return [str(build / "experts" / t) for t in sorted(_manifest(build)["tasks"])]

    def evaluator_options(self, build: Path, seed: int, split: str, threads: int) -> dict[str, Any]:
        (eval_examples,) = {entry["eval_examples"] for entry in _manifest(build)["tasks"].values()}  # one cap
        return {
            "heads_dir": str(build / "heads"),
            "split": split,
            "max_examples": eval_examples,
            "aggregate": True,
            "threads": threads,
        }


BENCHMARKS: dict[str, StudyBenchmark] = {
    "lm": LMBenchmark(
        "lm",
        "benchmarks.lm.evaluate:evaluate",
        "loss_gap_closed",
        "mean over domains of `loss_gap_closed` (0 = base, 1 = the domain's expert)",
    ),
    "encoder": EncoderBenchmark(
        "encoder",
        "benchmarks.retention.evaluate:evaluate",
        "normalized_accuracy",
        "mean over the 8 tasks of the normalised accuracy (merged accuracy / the expert's, each task "
        "scored with its expert's head)",
    ),
}


def read_rows(out: Path, name: str = "results") -> list[dict[str, Any]]:
    """The rows of ``OUT/<name>.json`` (none before the first one is saved)."""
    path = out / f"{name}.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def save_rows(out: Path, rows: Sequence[dict[str, Any]], name: str = "results") -> None:
    """Write every row to ``OUT/<name>.json`` (after each new row, so that a killed study resumes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(list(rows), indent=1))


def write_report(
    out: Path,
    module: str,
    argv: Sequence[str] | None,
    markdown: Callable[[str], str],
    name: str = "results",
) -> None:
    """Write ``markdown(command)`` to ``OUT/<name>.md`` and print it; ``command`` is this run's command line."""
    command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown(command))
    print((out / f"{name}.md").read_text())
