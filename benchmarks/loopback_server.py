"""A ``prefect server start`` on loopback for benchmarks, as a user runs a long-lived server (started
by swudi's one server starter, :class:`flows.server.PrefectServer` with ``full=True``), and the CPU
seconds of its process tree (what the server spends on a measured run)."""

from __future__ import annotations

from collections.abc import Mapping

import psutil

from flows.server import PrefectServer


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


class LoopbackServer:
    """``prefect server start`` on 127.0.0.1 with the environment ``env``, started and awaited
    (``startup``: seconds it took to answer its health check)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 180.0):
        self.server = PrefectServer(startup_timeout_s=timeout_s, attempts=1, full=True, env=env)
        self.url = self.server.start()
        self.startup = float(self.server.startup_s or 0.0)
        assert self.server.process is not None
        self.ps = psutil.Process(self.server.process.pid)

    def cpu(self) -> float:
        return tree_cpu(self.ps)

    def stop(self) -> None:
        self.server.stop()
