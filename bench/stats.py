"""The few statistics the sections report: nearest-rank percentiles and their usual summary."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1] (up to ~50 samples, p99 is the largest one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """n, p50, p99, mean and max; None for an empty sample."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "mean": None, "max": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5), digits),
        "p99": round(percentile(values, 0.99), digits),
        "mean": round(statistics.mean(values), digits),
        "max": round(max(values), digits),
    }
