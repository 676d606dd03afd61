"""Percentiles and the contract's benchmark JSON shape, shared by every scenario."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def p50_p95(values: Iterable[float]) -> dict[str, float | None]:
    data = [float(v) for v in values if v is not None]
    p50, p95 = percentile(data, 50), percentile(data, 95)
    return {"p50": None if p50 is None else round(p50, 1), "p95": None if p95 is None else round(p95, 1)}


def stages(samples: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """``stages_ms``: each stage name across runs -> p50/p95."""
    names = sorted({k for s in samples for k in s})
    return {name: p50_p95(s[name] for s in samples if name in s) for name in names}
