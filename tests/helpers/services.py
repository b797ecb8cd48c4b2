"""Real service processes for end-to-end tests: started from the command line, stopped by PID.

Each process runs in its own session (process group) with its output in a log file, so a test can
show the log when something fails and stop the process with everything it started (SIGTERM to the
group, SIGKILL when it lingers). Waits poll a condition until a deadline; no fixed sleeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Service:
    """One started command: its process, log file and name (for messages)."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} (pid {self.pid}) log tail ---\n" + self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``timeout_s``; return the exit code."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        else:  # the leader is gone: children it started may still live in its group
            _signal_group(self.pid, signal.SIGKILL)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process itself (not its group) and reap it."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def start(name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str], cwd: Path) -> Service:
    """Start ``argv`` in its own session, output to ``log_dir/<name>.log``."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, process, log)


def wait_for(
    condition: Callable[[], T | None],
    timeout_s: float,
    what: str,
    services: Sequence[Service] = (),
    poll_s: float = 0.5,
) -> T:
    """Poll ``condition`` until it returns a truthy value (returned) or ``timeout_s`` passes (fail
    with ``what`` and the services' log tails). A service that exits meanwhile fails at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        dead = [s for s in services if not s.alive()]
        if dead or time.monotonic() > deadline:
            reason = f"{dead[0].name} exited" if dead else f"not within {timeout_s:.0f} s"
            logs = "\n".join(s.log_tail() for s in services)
            raise AssertionError(f"waiting for {what}: {reason}\n{logs}")
        time.sleep(poll_s)
