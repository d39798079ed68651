"""The latency figures every tool reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``seconds`` in milliseconds; NaN each when there are none."""
    if not seconds:
        return dict.fromkeys(("p50_ms", "p95_ms", "p99_ms"), float("nan"))
    p50, p95, p99 = np.percentile(np.asarray(seconds, dtype=np.float64) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """The percentiles, the mean in milliseconds and the sample count."""
    mean = float(np.mean(seconds)) * 1000 if seconds else float("nan")
    return {**percentiles_ms(seconds), "mean_ms": mean, "count": len(seconds)}
