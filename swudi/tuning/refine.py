"""A 1-D search of the scale around the best grid point: bracketing, then golden-section steps.

:func:`refine_minimum` minimises ``f`` over ``x > lower`` with at most ``budget`` new evaluations,
starting from points already evaluated (the grid). Let ``b`` be the best point so far:

- *bracketing*: while ``b`` is the smallest or the largest point, step outwards by the golden ratio
  of the last interval: ``x = b + phi * (b - a)`` above (``a`` its neighbour), ``x = b - phi * (c - b)``
  below, and when that would cross ``lower``, ``x = lower + (b - lower) / phi``;
- *golden section*: once ``a < b < c`` with ``f(b) <= f(a), f(c)``, probe the larger of the two
  intervals at ``x = b + (2 - phi) * (c - b)`` (or ``b - (2 - phi) * (b - a)``), ``phi = (1 + sqrt 5) / 2``;
  the bracket shrinks to the three points around the new best.

It stops early when the next probe lies within ``min_gap`` of a point already evaluated. For a
unimodal ``f`` the bracket around the minimum shrinks by about ``1 / phi`` per step. Pure: ``f`` is
the only effect; probes are rounded to 6 decimals, so a rerun with the same scores probes the same
points (a resumed ``swudi tune`` finds their cached scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

PHI = (1.0 + math.sqrt(5.0)) / 2.0
SHRINK = 2.0 - PHI  # 0.381966...: where a golden-section probe goes inside the larger interval


def next_probe(points: Mapping[float, float], lower: float = 0.0) -> float:
    """Where the search evaluates next, given ``{x: f(x)}`` (module doc)."""
    xs = sorted(points)
    best = min(range(len(xs)), key=lambda i: (points[xs[i]], i))
    b = xs[best]
    if len(xs) == 1:
        return round(b * PHI if b > lower else b + 1.0, 6)
    if best == len(xs) - 1:  # best at the upper edge: expand upwards
        return round(b + PHI * (b - xs[best - 1]), 6)
    if best == 0:  # best at the lower edge: expand downwards, never to `lower` or below
        x = b - PHI * (xs[1] - b)
        return round(x if x > lower else lower + (b - lower) / PHI, 6)
    a, c = xs[best - 1], xs[best + 1]
    if c - b >= b - a:
        return round(b + SHRINK * (c - b), 6)
    return round(b - SHRINK * (b - a), 6)


def refine_minimum(
    f: Callable[[float], float],
    known: Mapping[float, float],
    budget: int,
    lower: float = 0.0,
    min_gap: float = 1e-3,
) -> list[tuple[float, float]]:
    """Evaluate ``f`` at up to ``budget`` new points chosen by :func:`next_probe`; return them, in order."""
    if not known:
        raise ValueError("refine_minimum needs at least one evaluated point")
    points = dict(known)
    probed: list[tuple[float, float]] = []
    while len(probed) < budget:
        x = next_probe(points, lower)
        if x <= lower or min(abs(x - p) for p in points) < min_gap:
            break  # converged (or pressed against `lower`): another probe would tell nothing new
        y = f(x)
        points[x] = y
        probed.append((x, y))
    return probed
