"""Byte sizes: read from a config (``parse_size``) and written for a human (``format_bytes``).

Decimal units as transformers and Hugging Face use them (1 MB = 10**6 bytes); ``parse_size`` also
reads binary ones (``2GiB`` = 2 * 2**30).
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_bytes"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "500MB", "2GiB", "5GB" (decimal units as transformers)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"cannot read size {size!r}: use bytes or e.g. '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest decimal unit below 1000 of it, B to TB: ``999`` -> ``999 B``,
    ``1500`` -> ``1.5 kB``, ``2.5e9`` -> ``2.5 GB`` (one decimal; whole bytes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
