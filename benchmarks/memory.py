"""This process's memory as Linux reports it in /proc/self, for the benchmarks' figures.

``VmRSS`` is the resident set now, ``VmHWM`` its peak ("high-water mark") since the process image
started or since :func:`reset_peak_rss`. ``ru_maxrss`` (what ``/usr/bin/time`` prints) follows the
same mark, so after a reset it too is the peak since the reset, not the lifetime peak.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def proc_status_mib(field: str) -> float | None:
    """``field`` (``VmRSS``, ``VmHWM``) of /proc/self/status in MiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Start a new ``VmHWM`` window at the current RSS (``5`` into /proc/self/clear_refs; Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
