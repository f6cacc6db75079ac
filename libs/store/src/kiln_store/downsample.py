"""Downsampling of metric series for charts: min/max buckets, so that no peak or dip disappears.

A 100,000-step series drawn on a chart 1,000 pixels wide shows, per pixel column, a vertical stroke from the lowest
to the highest value in that column.  :func:`minmax` keeps exactly those points: the step range is cut into equal
buckets and each bucket keeps its minimum and its maximum (in step order), plus the first and the last point of the
series.  Unlike averaging or LTTB, every extreme survives: the global minimum and maximum are always in the result.

Example:
    >>> pts = [(s, float(s % 10)) for s in range(1000)]
    >>> small = minmax(pts, 100)
    >>> len(small) <= 100, min(v for _, v in small), max(v for _, v in small)
    (True, 0.0, 9.0)
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[int, "float | None"]


def minmax(points: Sequence[Point], max_points: int) -> list[Point]:
    """At most ``max_points`` points of a series ordered by step (unique steps), keeping every bucket's extremes.

    ``None`` values (missing or non-finite) are gaps: a bucket with no number keeps its first point, so a chart still
    breaks its line there.  Series of ``max_points`` points or fewer are returned unchanged.

    Args:
        points: ``(step, value)`` pairs in increasing step order.
        max_points: the most points to return; at least 4 (first, last, and one bucket's min and max).
    """
    if max_points < 4:
        raise ValueError("max_points must be at least 4")
    n = len(points)
    if n <= max_points:
        return list(points)
    first, last = points[0], points[-1]
    inner = points[1:-1]
    buckets = (max_points - 2) // 2
    lo = inner[0][0]
    width = (inner[-1][0] - lo + 1) / buckets
    out: list[Point] = [first]
    current = -1
    low: Point | None = None
    high: Point | None = None
    gap: Point | None = None
    for point in inner:
        step, value = point
        b = int((step - lo) / width)
        if b != current:
            _flush(out, low, high, gap)
            current, low, high, gap = b, None, None, None
        if value is None:
            if gap is None:
                gap = point
        elif low is None or high is None:
            low = high = point
        elif value < low[1]:  # type: ignore[operator]
            low = point
        elif value > high[1]:  # type: ignore[operator]
            high = point
    _flush(out, low, high, gap)
    out.append(last)
    return out


def _flush(out: list[Point], low: Point | None, high: Point | None, gap: Point | None) -> None:
    if low is None or high is None:
        if gap is not None:
            out.append(gap)
    elif low is high:
        out.append(low)
    else:
        out.extend((low, high) if low[0] < high[0] else (high, low))
