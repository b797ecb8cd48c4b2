"""The embedded Prefect server of a CLI merge: bounded start-up, no orphan, merges under CPU load.

These run the real `swudi merge` command without PREFECT_API_URL, so that it starts its own
server process (flows/server.py), with a private PREFECT_HOME.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.server import PrefectServer
from swudi.errors import SwudiError
from swudi.io.synthetic import SyntheticModel, write_synthetic_models

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "SWUDI_LOCAL_PREFECT_API": "",
                "PREFECT_LOGGING_LEVEL": "WARNING"})
    return env


def _config(tmp_path: Path, name: str) -> Path:
    inputs = tmp_path / "in"
    if not (inputs / "base").exists():
        write_synthetic_models(str(inputs), 2, MODEL)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(inputs / "base"),
                                    "experts": [str(inputs / f"expert-{i}") for i in range(2)],
                                    "output": str(tmp_path / name), "device": "cpu", "workers": 1}))
    return path


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_server_that_does_not_answer_in_time_is_stopped_with_a_clear_message() -> None:
    server = PrefectServer(startup_timeout_s=0.5, attempts=1)
    with pytest.raises(SwudiError, match=r"did not answer within [01] s") as caught:
        server.start()
    assert "PREFECT_API_URL" in str(caught.value) and "\n" not in str(caught.value)
    assert server.process is None  # stopped, not left running


@pytest.mark.slow
def test_a_killed_cli_leaves_no_embedded_server_behind(tmp_path: Path) -> None:
    cli = subprocess.Popen([sys.executable, "-m", "swudi.cli", "merge", str(_config(tmp_path, "out"))],
                           env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    servers: list[int] = []
    while not servers and time.monotonic() < deadline and cli.poll() is None:
        servers = [p for p in _children(cli.pid) if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.1)
    assert servers, "the CLI started no server process"
    time.sleep(3)  # let the server get on with its start-up
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    gone_by = time.monotonic() + 10
    while any(_alive(p) for p in servers) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not any(_alive(p) for p in servers), f"server {servers} outlived its killed CLI"


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(3 * 1800)  # a merge on 2 cores under load 10 and more takes several minutes
def test_merges_on_the_embedded_server_under_cpu_load_all_succeed(tmp_path: Path) -> None:
    """Two busy loops per core (load about 3 on top of the merge): every merge must publish."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    results = []
    try:
        for i in range(3):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "swudi.cli", "merge", str(_config(tmp_path, f"out-{i}"))],
                                  env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
            results.append((done.returncode, round(time.monotonic() - started, 1), done.stderr[-2000:]))
            print(f"merge {i} under CPU load: exit {done.returncode} after {results[-1][1]} s", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    print(f"merges under CPU load (exit code, wall s): {[(code, wall) for code, wall, _ in results]}")
    assert all(code == 0 for code, _, _ in results), results
    for i in range(3):
        assert (tmp_path / f"out-{i}" / "latest.json").exists()
