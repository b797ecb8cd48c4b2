"""Parameter sweeps: a grid of settings merged against one shared work folder.

``--grid params.t=300,1300 --grid params.rank_ratio=0.5,0.65`` expands to the cartesian product of
the values (parsed as YAML scalars). Every point shares the base config's work folder, so the
decompositions are computed once and each further point costs only its filter and products.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from swudi.config.merge_config import MergeConfig, apply_overrides, config_from_mapping
from swudi.config.strict_yaml import load_yaml
from swudi.errors import ConfigError
from swudi.io.fingerprint import digest
from swudi.storage.filesystem import join_url

Grid = list[tuple[str, list[Any]]]


def parse_grid(specs: Sequence[str]) -> Grid:
    """``["params.t=300,1300", ...]`` -> ``[("params.t", [300, 1300]), ...]``."""
    grid: Grid = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"grid {spec!r} is not of the form key=v1,v2,...")
        values = [load_yaml(v, f"--grid {spec!r}: the value {v!r}") for v in raw.split(",")]
        if key.strip() in {k for k, _ in grid}:
            raise ConfigError(f"grid key {key.strip()!r} given twice")
        grid.append((key.strip(), values))
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """The cartesian product of the grid, as ``{dotted key: value}`` per point, in grid order."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in grid))]


def point_label(point: Mapping[str, Any]) -> str:
    """A folder-safe label such as ``t-300_rank_ratio-0.65``."""
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(parts))


def sweep_id(config: MergeConfig, grid: Grid) -> str:
    """Identity of a sweep: the base settings and the grid."""
    return digest(config.model_dump(), grid)[:12]


def point_configs(config: MergeConfig, grid: Grid) -> list[tuple[dict[str, Any], MergeConfig]]:
    """One validated config per grid point: published under ``OUTPUT/sweeps/<id>/<label>``, all
    sharing the base config's work folder, never pushed to the Hub. Every point is validated
    before any merge runs."""
    root = join_url(config.output, "sweeps", sweep_id(config, grid))
    # sweep points are explored, not released: only `swudi merge` pushes
    return [
        (point, point_config(config, point, join_url(root, point_label(point)), push_to_hub=None))
        for point in grid_points(grid)
    ]


def point_config(config: MergeConfig, point: Mapping[str, Any], output: str, **fields: Any) -> MergeConfig:
    """``config`` with the ``{dotted key: value}`` settings of ``point``, published under ``output``,
    sharing ``config``'s work folder; ``fields`` replace top-level keys (e.g. ``evaluators=[]``).
    A point that sets ``method`` keeps only the ``params.*`` it sets (another method's parameters do
    not carry over). :class:`ConfigError` naming the point when the result is not a valid config."""
    data = config.model_dump()
    data["work_dir"] = config.resolved_work_dir
    data.update(fields)
    data = apply_overrides(
        data, [f"{k}={yaml.safe_dump(v).strip().removesuffix('...').strip()}" for k, v in point.items()]
    )
    data["output"] = output
    if "method" in point:  # parameters of another method do not carry over
        data["params"] = {k: v for k, v in data["params"].items() if f"params.{k}" in point}
    return config_from_mapping(data, f"grid point {point_label(point)}")


def sweep_root(config: MergeConfig, grid: Grid) -> str:
    """``OUTPUT/sweeps/<id>``, where the points and ``sweep.json`` are written."""
    return join_url(config.output, "sweeps", sweep_id(config, grid))
