"""The command line: config errors fail before any work, with the problem named; plan from headers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swudi.cli.app import app
from swudi.config.merge_config import load_config
from swudi.errors import ConfigError
from swudi.io.synthetic import SyntheticModel, write_synthetic_models

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[str, list[str]]:
    return write_synthetic_models(str(tmp_path / "in"), 2, MODEL)


def _config(tmp_path: Path, **data) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_unknown_key_is_named_with_the_valid_keys(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"), shards=3)
    result = _run("merge", str(path))
    assert result.exit_code == 2
    assert "unknown key 'shards'" in result.output and "max_shard_size" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_nested_key_and_bad_method_parameter(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"),
                   task_runner={"kind": "threads", "adress": "x"})
    assert "unknown key 'task_runner.adress'" in _run("plan", str(path)).output
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"),
                   method="swudi", params={"rank_rule": "entropy"})
    result = _run("plan", str(path))
    assert result.exit_code == 2 and "rank_rule" in result.output and "rank_ratio" in result.output


def test_bad_method_lists_the_valid_ones(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"), method="swudy")
    result = _run("merge", str(path))
    assert result.exit_code == 2 and "'swudy'" in result.output and "swudi_a" in result.output


def test_missing_expert_fails_before_any_task(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    missing = str(tmp_path / "no-such-expert")
    path = _config(tmp_path, base=base, experts=[experts[0], missing], output=str(tmp_path / "out"))
    result = _run("merge", str(path))
    assert result.exit_code == 2 and "experts[1]" in result.output and "no-such-expert" in result.output
    assert not (tmp_path / "out").exists()


def test_overrides_and_relative_paths(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base="in/base", experts=["in/expert-0", "in/expert-1"], output="out")
    cfg = load_config(path, ["method=swudi", "params.t=50", "task_runner.kind=dask", "max_shard_size=2MB"])
    assert cfg.base == base and cfg.experts == experts and cfg.output == str(tmp_path / "out")
    assert cfg.params["t"] == 50 and cfg.params["rank_ratio"] == 0.65
    assert cfg.task_runner.kind == "dask" and cfg.max_shard_size == 2_000_000
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["method"])


def test_plan_prints_routes_from_headers(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"))
    result = _run("plan", str(path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    treatments = {row["name"]: row["treatment"] for row in plan["tensors"]}
    assert treatments["encoder.layer.0.attention.self.query.weight"] == "layer"
    assert treatments["embeddings.word_embeddings.weight"] == "mean"  # embeddings excluded
    assert treatments["embeddings.position_ids"] == "base"  # integers are never merged
    assert plan["counts"]["layers"] == 6
    assert not (tmp_path / "out").exists()


def test_mismatched_expert_is_reported_by_plan(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    other, _ = write_synthetic_models(str(tmp_path / "other"), 1,
                                      SyntheticModel(layers=1, hidden=8, intermediate=32, vocab=16,
                                                     positions=8))
    path = _config(tmp_path, base=base, experts=[experts[0], other], output=str(tmp_path / "out"))
    result = _run("plan", str(path))
    assert result.exit_code == 2
    assert "encoder.layer.0.attention.self.query.weight" in result.output and "other" in result.output


def test_unimportable_evaluator_fails_before_any_work(tmp_path: Path, inputs) -> None:
    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"),
                   evaluators=[{"function": "no_such_module.sub:evaluate"}])
    result = _run("merge", str(path))
    assert result.exit_code == 2 and "no_such_module.sub" in result.output
    assert not (tmp_path / "out").exists()


def test_a_running_local_prefect_server_is_used_instead_of_an_embedded_one(monkeypatch) -> None:
    """A real HTTP server on loopback answers Prefect's health check; a closed port does not."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flows.commands import local_prefect_server, prepare_prefect_environment

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"true" if self.path == "/api/health" else b"no"
            self.send_response(200 if body == b"true" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        assert local_prefect_server(api) == api
        assert local_prefect_server(f"http://127.0.0.1:{server.server_address[1]}/other") is None
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        prepare_prefect_environment(api)
        assert os.environ["PREFECT_API_URL"] == api
        monkeypatch.setenv("PREFECT_API_URL", "http://example.invalid/api")  # an explicit setting wins
        prepare_prefect_environment(api)
        assert os.environ["PREFECT_API_URL"] == "http://example.invalid/api"
    finally:
        server.shutdown()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert local_prefect_server(api) is None  # nothing listens there any more
    prepare_prefect_environment(api)
    assert "PREFECT_API_URL" not in os.environ


def test_the_printed_time_split_parts_add_up_within_the_wall(prefect_api: str, tmp_path: Path, inputs) -> None:
    """`swudi merge` prints the run's wall seconds and the parts of it (plan, publish, orchestration with
    the flow run's start and finish inside it): each part fits in the wall, and the task seconds, a
    sum over parallel tasks, are printed apart as such (once orchestration exceeded the printed wall)."""
    import re

    base, experts = inputs
    path = _config(tmp_path, base=base, experts=experts, output=str(tmp_path / "out"), device="cpu", workers=2)
    result = _run("merge", str(path))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines at the console's width
    wall_line = re.search(
        r"([\d.]+) s wall: plan ([\d.]+) s, publish ([\d.]+) s, orchestration ([\d.]+) s \(of it ([\d.]+) s "
        r"starting and finishing the flow run\)",
        text,
    )
    assert wall_line, text
    wall, plan, publish, orchestration, flow_run = map(float, wall_line.groups())
    assert wall > 0 and flow_run <= orchestration <= wall
    assert plan + publish + orchestration <= wall + 0.15  # each printed rounded to 0.1 s
    assert re.search(r"task seconds summed over the merge tasks \(2 in parallel\): read [\d.]+ s, decompose",
                     text), text
