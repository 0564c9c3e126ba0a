"""How cost grows with the number of tokens: the slope of a log-log least-squares line.

If cost ~ c * tokens^p then log(cost) = log(c) + p * log(tokens), so the slope p is the growth exponent:
about 1 for scans and convolutions, tending to 2 for global attention once the quadratic term dominates.
Fixed per-call overheads pull measured slopes below these values at small sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["token_count", "growth_exponent"]


def token_count(resolution: int, token_stride: int, spatial_dims: int) -> float:
    """Tokens of a ``resolution``-sized square (cube) at one token per ``token_stride`` pixels per axis."""
    return (resolution / token_stride) ** spatial_dims


def growth_exponent(tokens: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(value) against log(tokens) over the points with a positive value.

    Returns None when fewer than two distinct token counts have a value (no line to fit).

    Example:
        >>> round(growth_exponent([1, 2, 4], [3, 12, 48]), 6)
        2.0
    """
    points = [(math.log(t), math.log(v)) for t, v in zip(tokens, values, strict=True)
              if v is not None and v > 0 and t > 0 and math.isfinite(v)]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx
