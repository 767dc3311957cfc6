"""The statistics every bench uses, so that "p95" means one thing across the project.

- `percentile`: numpy's default method ("linear": the value at rank (n - 1) * q / 100 of the sorted
  sample, interpolating between neighbours; Hyndman & Fan type 7, as R's default and Excel's
  PERCENTILE.INC). For small samples the tail percentiles are interpolated, never extrapolated: the
  p95 of 20 values lies between the 19th and 20th smallest.
- `bootstrap_interval`: a percentile-bootstrap confidence interval of a statistic (the mean by
  default) of a sample of per-round figures, with a fixed seed so a rerun prints the same interval.
  With few rounds it is somewhat narrower than the true interval; the benches use at least 8.
- `ratio_interval`: the geometric mean of per-round ratios (e.g. OpenAI route / native route
  throughput, each pair measured side by side in one round) with its bootstrap interval, computed
  on the log ratios so that 0.8x and 1.25x count as equally far from 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) by linear interpolation (numpy's default method)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    statistic: Callable[[np.ndarray], float] = np.mean,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic, low, high): the percentile-bootstrap interval at `confidence`."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        raise ValueError("a bootstrap interval needs at least two values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = np.apply_along_axis(statistic, 1, data[picks])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(statistic(data)), float(low), float(high)


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of per-round ratios, bootstrapped on their logarithms."""
    if any(r <= 0 for r in ratios):
        raise ValueError("ratios must be positive")
    mid, low, high = bootstrap_interval([math.log(r) for r in ratios], confidence)
    return math.exp(mid), math.exp(low), math.exp(high)
