"""A ``prefect server start`` on loopback for benchmarks, as a user runs a long-lived server, and
the CPU seconds of its process tree (what the server spends on a measured run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc`` and its living descendants."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with the environment ``env``; waits for its health
    endpoint (``startup``: seconds it took)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 180.0):
        self.port = free_port()
        env = {**(os.environ if env is None else env), "PREFECT_SERVER_API_PORT": str(self.port)}
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("prefect server did not start") from None
                time.sleep(0.5)
        self.startup = time.perf_counter() - started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def cpu(self) -> float:
        return tree_cpu(self.ps)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
