"""swudi's one Prefect server starter: the command line's embedded server, the benchmarks' loopback
``prefect server start`` and the test harness's servers all start here (:class:`PrefectServer`).

Without ``PREFECT_API_URL`` (and no ``prefect server start`` on this machine), a swudi command
needs a Prefect API for the length of one merge. Prefect would start a temporary server itself on
first use, but with a fixed start-up timeout, a stop that can hit the server half-started
(``AssertionError: Reactive triggers not started``), and a server process that outlives a killed
parent. :class:`PrefectServer` starts the same server (uvicorn + Prefect's app factory, UI off,
ephemeral services) itself and:

- waits for its health check up to ``startup_timeout_s`` (default 600 s: a cold start takes about
  15 s on an idle 2-core machine and about 180 s under a load of 5-10), never stopping a start
  that is merely slow; a process that exits during start-up is started again, up to ``attempts``
  times; then :class:`~swudi.errors.SwudiError` with one line saying what happened and the last
  line the server printed;
- points ``PREFECT_API_URL`` at it only once it answers, so no run is created against a server
  that is not serving yet;
- stops it when the command ends (SIGTERM, then SIGKILL after 10 s), and ties its life to the
  command's: the server is started with a parent-death signal (Linux ``PR_SET_PDEATHSIG``), so
  a command killed with SIGKILL leaves no server behind.

``PrefectServer(full=True)`` starts ``prefect server start`` instead (every service: scheduler,
deployment concurrency, workers' endpoints), as an operator runs a long-lived server; the services
lane and the benchmarks use it. Either runs in its own session (process group), stopped as a group.

Settings: ``SWUDI_PREFECT_STARTUP_TIMEOUT_S`` (seconds), ``SWUDI_PREFECT_STARTUP_ATTEMPTS``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from swudi.errors import SwudiError

__all__ = ["PrefectServer", "start_embedded_server", "free_port", "STARTUP_TIMEOUT_ENV", "STARTUP_ATTEMPTS_ENV"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_ENV = "SWUDI_PREFECT_STARTUP_TIMEOUT_S"
STARTUP_ATTEMPTS_ENV = "SWUDI_PREFECT_STARTUP_ATTEMPTS"
DEFAULT_STARTUP_TIMEOUT_S = 600.0
DEFAULT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux), or exit if it is gone already."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrefectServer:
    """One Prefect API server process on 127.0.0.1 for the life of this process.

    ``full``: ``prefect server start`` with every service (default: the embedded server, uvicorn +
    Prefect's app factory with the ephemeral services only); ``env``: the server's environment
    (default: this process's); ``port``: default a free one; ``log_path``: where its output goes
    (default a temporary file, removed at :meth:`stop`).
    """

    def __init__(
        self,
        startup_timeout_s: float | None = None,
        attempts: int | None = None,
        *,
        full: bool = False,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
    ):
        self.startup_timeout_s = float(
            startup_timeout_s or os.environ.get(STARTUP_TIMEOUT_ENV) or DEFAULT_STARTUP_TIMEOUT_S
        )
        self.attempts = int(attempts or os.environ.get(STARTUP_ATTEMPTS_ENV) or DEFAULT_ATTEMPTS)
        self.full = full
        self.env = dict(os.environ if env is None else env)
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = port
        self._fixed_port = port is not None
        self._keep_log = log_path is not None
        self.log = log_path or Path(tempfile.mkstemp(prefix="swudi-prefect-server-", suffix=".log")[1])
        self.startup_s: float | None = None  # seconds the last start took

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        port = str(self.port)
        if self.full:
            env = {**self.env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": port}
            return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port], env
        env = {
            **self.env,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",  # the services of Prefect's temporary server only
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        return command, env

    def _spawn(self) -> subprocess.Popen[bytes]:
        if not self._fixed_port:
            self.port = free_port()
        command, env = self._command()
        parent = os.getpid()
        with self.log.open("ab") as out:
            return subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped as a group, with whatever the server starts
                preexec_fn=lambda: _die_with_parent(parent),  # the caller is single-threaded here
            )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    def start(self) -> str:
        """Start the server and wait until it answers; return its API URL (raise `SwudiError` if it
        never does within ``startup_timeout_s``)."""
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        for attempt in range(1, self.attempts + 1):
            self.process = self._spawn()
            atexit.register(self.stop)
            while time.monotonic() < deadline:
                if self._healthy():
                    self.startup_s = time.monotonic() - started
                    log.info("embedded Prefect server ready in %.1f s at %s", time.monotonic() - started, self.api_url)
                    return self.api_url
                if self.process.poll() is not None:
                    log.warning(
                        "the embedded Prefect server exited with code %s during start-up (attempt %d of %d): %s",
                        self.process.returncode,
                        attempt,
                        self.attempts,
                        self.last_output(),
                    )
                    break
                time.sleep(0.25)
            else:
                last = self.last_output()
                self.stop()
                raise SwudiError(
                    f"the embedded Prefect server did not answer within {self.startup_timeout_s:.0f} s "
                    f"(attempt {attempt} of {self.attempts}; {last or 'no output'}); raise "
                    f"{STARTUP_TIMEOUT_ENV}, or run `prefect server start` once and set PREFECT_API_URL"
                )
        last = self.last_output()
        self.stop()
        raise SwudiError(
            f"the embedded Prefect server exited during start-up {self.attempts} times "
            f"(last: {last or 'no output'}); run `prefect server start` once and set PREFECT_API_URL"
        )

    def last_output(self) -> str:
        """The last line the server printed (one line, for error messages)."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:300] if lines else ""

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after 10 s); safe to call twice."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            _signal_group(process.pid, signal.SIGKILL)  # whatever it started and left behind
        if not self._keep_log:
            with contextlib.suppress(OSError):
                self.log.unlink()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def start_embedded_server() -> PrefectServer:
    """Start an embedded :class:`PrefectServer` and point ``PREFECT_API_URL`` of this process at it."""
    server = PrefectServer()
    os.environ["PREFECT_API_URL"] = server.start()
    return server
