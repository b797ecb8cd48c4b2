"""Every task run of a CLI merge reaches the run history, also on the embedded server.

The CLI runs in a subprocess with its own PREFECT_HOME and no PREFECT_API_URL, so Prefect starts
an embedded server on a SQLite database in that folder and stops it when the process exits. The
test then reads that database directly: the flow run and all its task runs, in a final state.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swudi.io.synthetic import SyntheticModel, write_synthetic_models

pytestmark = pytest.mark.slow  # two CLI merges, each starting its own embedded Prefect server

MODEL = SyntheticModel(layers=16, hidden=16, intermediate=32, vocab=16, positions=8)


def test_cli_merge_records_every_task_run_on_the_embedded_server(tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, MODEL)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "experts": experts,
                "output": str(tmp_path / "out"),
                "method": "swudi_a",
                "device": "cpu",
                "workers": 2,
            }
        )
    )
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "SWUDI_LOCAL_PREFECT_API": "",
        }
    )  # the embedded server, even if one runs on port 4200
    done = subprocess.run(
        [sys.executable, "-m", "swudi.cli", "merge", str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    with sqlite3.connect(home / "prefect.db") as db:
        flows = db.execute(
            "select flow_run.id, flow_run.state_type from flow_run join flow "
            "on flow_run.flow_id = flow.id where flow.name = 'swudi-merge'"
        ).fetchall()
        assert len(flows) == 1 and flows[0][1] == "COMPLETED", flows
        tasks = db.execute("select name, state_type from task_run where flow_run_id = ?", (flows[0][0],)).fetchall()
    names = sorted(name.split("[")[0].rsplit("-", 1)[0] if "[" not in name else name.split("[")[0] for name, _ in tasks)
    # fetch, find-completed, one merge task per transformer block, one for the small tensors,
    # evaluate, publish: every one of them recorded, and finished
    from swudi.config.merge_config import load_config
    from swudi.pipeline.plan import batch_blocks, build_plan

    batches = batch_blocks(build_plan(load_config(config)).layer_jobs, 2, 2)
    assert 2 <= len(batches) < MODEL.layers  # small blocks are packed together
    expected = ["decompose-select-rank-merge"] * len(batches) + [
        "evaluate",
        "fetch-checkpoints",
        "find-completed",
        "merge-other-tensors",
        "publish",
    ]
    assert names == sorted(expected), tasks
    assert all(state == "COMPLETED" for _, state in tasks), tasks

    again = subprocess.run(
        [sys.executable, "-m", "swudi.cli", "merge", str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-3000:]
    assert again.stdout.strip() == done.stdout.strip()  # the same version's location
    with sqlite3.connect(home / "prefect.db") as db:  # nothing ran: no second flow run
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 1
