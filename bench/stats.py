"""Percentiles and run-to-run summaries shared by the benches. Pure, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100); nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """p50/p90/p99/max/mean of `values` multiplied by `scale`, rounded."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50) * scale, digits),
        "p90": round(percentile(ordered, 90) * scale, digits),
        "p99": round(percentile(ordered, 99) * scale, digits),
        "max": round(ordered[-1] * scale, digits),
        "mean": round(statistics.fmean(ordered) * scale, digits),
    }


def across_runs(runs: Sequence[Any]) -> Any:
    """Fold N results of the same shape into one: every number becomes its median over the
    runs, and a sibling `<key>_spread` = [min, max] says how much the runs disagreed."""
    first = runs[0]
    if isinstance(first, dict):
        out: dict[str, Any] = {}
        for key in first:
            values = [r[key] for r in runs if isinstance(r, dict) and key in r]
            out[key] = across_runs(values)
            if len(runs) > 1 and all(_is_number(v) for v in values):
                finite = [v for v in values if not math.isnan(v)]
                if finite and min(finite) != max(finite):
                    out[f"{key}_spread"] = [min(finite), max(finite)]
        return out
    if _is_number(first):
        finite = [v for v in runs if _is_number(v) and not math.isnan(v)]
        return round(statistics.median(finite), 3) if finite else math.nan
    return first


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ratio(gateway: float, direct: float) -> float:
    return round(gateway / direct, 3) if direct and not math.isnan(direct) and not math.isnan(gateway) else math.nan
