"""Candidates of ``swudi tune``: one merge config per grid point (and per refinement scale).

Every candidate shares the config's work folder (decompositions and deltas are computed once) and
is published into a *staging* folder ``WORK/tune/<tune id>/staged/<label>``, never under the
output: it is evaluated there and deleted. Candidates run no evaluator of their own (the tune
scores them with its objective), never push to the Hub, pass no gate and keep no versions. Their
cache identity is the version id of that config (:func:`swudi.pipeline.plan.version_id`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swudi.config.grid import Grid, grid_points, parse_grid, point_config, point_label
from swudi.config.merge_config import MergeConfig
from swudi.errors import ConfigError
from swudi.evaluators.objective import Objective, parse_objective
from swudi.io.fingerprint import digest
from swudi.storage.filesystem import join_url

TUNE_DIR = "tune"
STAGED_DIR = "staged"
RESULTS_NAME = "tune.json"
PLOT_NAME = "tune.png"


@dataclass(frozen=True)
class Candidate:
    """One setting to merge and score: ``point`` (dotted keys -> values), its config, where it came from."""

    point: dict[str, Any]
    config: MergeConfig
    stage: str = "grid"  # "grid" | "refine"

    @property
    def label(self) -> str:
        return point_label(self.point)

    def settings(self) -> dict[str, Any]:
        """What the tuning table shows of it."""
        return {"method": self.config.method, "params": dict(self.config.params), "scale": self.config.scale}


def tune_id(config: MergeConfig, objective: Objective, grid: Grid, refine: int) -> str:
    """Identity of a tune: the config (without storage options), the objective, the grid, the refinement."""
    settings = config.model_dump(exclude={"storage_options", "storage_retry"})
    return digest("tune", settings, objective.describe(), objective.evaluator_key, grid, refine)[:12]


def tune_url(config: MergeConfig, tune: str) -> str:
    """``WORK/tune/<tune id>``: the results file, the plot and the staging folder."""
    return join_url(config.resolved_work_dir, TUNE_DIR, tune)


def candidate(config: MergeConfig, point: Mapping[str, Any], tune: str, stage: str = "grid") -> Candidate:
    """The candidate of one point (module doc); :class:`ConfigError` naming the point if invalid."""
    staged = join_url(tune_url(config, tune), STAGED_DIR, point_label(point))
    cfg = point_config(config, point, staged, evaluators=[], gate=None, push_to_hub=None, keep_versions=None)
    return Candidate(dict(point), cfg, stage)


def grid_candidates(config: MergeConfig, grid: Grid, tune: str) -> list[Candidate]:
    """One candidate per grid point, every one validated before any merge."""
    return [candidate(config, point, tune) for point in grid_points(grid)]


def refine_point(best: Candidate, scale: float) -> dict[str, Any]:
    """The point of a refinement probe: the best candidate's settings at another scale."""
    return {**best.point, "scale": scale}


def same_setting(a: Candidate, b: Candidate) -> bool:
    """True when ``a`` and ``b`` differ at most in their scale (one line of the scale search)."""
    return (a.config.method, a.config.params) == (b.config.method, b.config.params)


def winner_config(config: MergeConfig, best: Candidate) -> MergeConfig:
    """The config that publishes the winner as a normal version: the user's config (output,
    evaluators, gate, Hub, retention) with the winner's settings."""
    return point_config(config, best.point, config.output)


def describe_candidates(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Rows for ``swudi tune --dry-run``."""
    return [{"label": c.label, "stage": c.stage, **c.settings()} for c in candidates]


@dataclass(frozen=True)
class TuneSetup:
    """A validated tune: the config, the objective, the grid, the refinement budget, its id and the
    grid's candidates (all built, so a bad point fails before any merge)."""

    config: MergeConfig
    objective: Objective
    grid: Grid
    refine: int
    tune_id: str
    candidates: list[Candidate]


def prepare_tune(
    config: MergeConfig, objective: str, grid: Sequence[str], refine: int = 0, minimize: bool = False
) -> TuneSetup:
    """Parse and check everything a tune needs from the config alone (no checkpoint is read):
    the objective names one of the config's evaluators, the grid is not empty, every point makes a
    valid config. :class:`ConfigError` naming the problem otherwise."""
    if not grid:
        raise ConfigError("swudi tune needs at least one --grid KEY=V1,V2,... (keys: scale, method, params.*)")
    if refine < 0:
        raise ConfigError(f"--refine must be 0 or more, got {refine}")
    parsed_objective = parse_objective(objective, config.evaluators, minimize)
    parsed = parse_grid(grid)
    tune = tune_id(config, parsed_objective, parsed, refine)
    return TuneSetup(config, parsed_objective, parsed, refine, tune, grid_candidates(config, parsed, tune))
