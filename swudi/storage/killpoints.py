"""A testing hook: SIGKILL this process at the k-th storage mutation, to test crash safety.

Every place swudi changes storage reports here (:func:`storage_event`): a file staged (its bytes
written to a temporary name, not yet visible), a file committed (visible under its name), a file
or folder deleted. Two environment variables, read at every event, act on these events:

- ``SWUDI_KILL_AFTER_WRITES=k``: after the k-th event, the process sends itself SIGKILL (no
  cleanup, no ``finally``, no ``atexit``: what a power cut or the OOM killer does).
- ``SWUDI_WRITE_TRACE=path``: append one line per event to ``path`` (``<n> <event> <url>``), so
  that a test learns how many kill points an uninterrupted run has and where each one falls.

Unset (the default), :func:`storage_event` returns at once and costs nothing measurable.
``tests/test_faults_kill_points.py`` and ``scripts/kill_point_sweep.sh`` use it.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["KILL_ENV", "TRACE_ENV", "storage_event"]

KILL_ENV = "SWUDI_KILL_AFTER_WRITES"
TRACE_ENV = "SWUDI_WRITE_TRACE"

_lock = threading.Lock()
_count = 0


def storage_event(event: str, url: str) -> None:
    """Count one storage mutation (``staged`` / ``committed`` / ``deleted``); trace it or die here."""
    global _count
    kill_at = int(os.environ.get(KILL_ENV) or 0)
    trace = os.environ.get(TRACE_ENV)
    if not kill_at and not trace:
        return
    with _lock:
        _count += 1
        if trace:
            with open(trace, "a") as f:
                f.write(f"{_count} {event} {url}\n")
        if _count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
