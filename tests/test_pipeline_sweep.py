"""Sweeps reuse decompositions; reports draw plots and tables from what the pipeline wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.sweep import run_sweep
from swudi.config.grid import grid_points, parse_grid, point_label
from swudi.config.merge_config import config_from_mapping
from swudi.errors import ConfigError
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.reporting.plots import write_report

MODEL = SyntheticModel(layers=1, hidden=32, intermediate=64, vocab=16, positions=8)


def test_grid_parsing() -> None:
    grid = parse_grid(["params.t=300,1300", "params.rank_ratio=0.5,0.65"])
    assert grid == [("params.t", [300, 1300]), ("params.rank_ratio", [0.5, 0.65])]
    points = grid_points(grid)
    assert len(points) == 4 and points[1] == {"params.t": 300, "params.rank_ratio": 0.65}
    assert point_label(points[1]) == "t-300_rank_ratio-0.65"
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["params.t"])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["params.t=1", "params.t=2"])


@pytest.mark.slow
def test_sweep_reuses_decompositions_and_reports(prefect_api: str, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 3, MODEL)
    cfg = config_from_mapping(
        {"base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "swudi", "device": "cpu"}
    )
    summary = run_sweep(cfg, ["params.t=50,1300", "params.rank_ratio=0.3,1.0"])
    points = summary["points"]
    assert len(points) == 4 and len({p["version"] for p in points}) == 4
    assert points[0]["decompositions_computed"] == 6
    assert [p["decompositions_computed"] for p in points[1:]] == [0, 0, 0]
    ranks = {p["label"]: p["diagnostics"]["mean_rank"] for p in points}
    assert ranks["t-50_rank_ratio-0.3"] < ranks["t-50_rank_ratio-1.0"]
    assert json.loads(Path(summary["url"]).read_text())["points"][0]["label"] == points[0]["label"]
    for p in points:  # every point was published on its own, never as the output's latest
        assert (Path(p["url"]) / "model.safetensors").exists()
    assert not (tmp_path / "out" / "latest.json").exists()

    written = write_report(str(Path(summary["url"]).parent), tmp_path / "report")
    names = {p.name for p in written}
    assert {
        "sweep_t.png",
        "sweep_rank_ratio.png",
        "ranks_per_layer.png",
        "spectra.png",
        "summary.md",
        "summary.html",
    } <= names
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    table = (tmp_path / "report" / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "interference vs sum" in table[0]
