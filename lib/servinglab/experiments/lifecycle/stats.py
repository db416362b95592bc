"""The estimates the lifecycle experiments report: a split with its confidence interval, and the difference
between two paths measured in interleaved pairs."""

from __future__ import annotations

import math
from statistics import NormalDist, median
from typing import Sequence

import numpy as np


def wilson_interval(hits: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (good near 0 and 1 and for small counts, unlike the normal one)."""
    if trials <= 0:
        raise ValueError("a proportion needs at least one trial")
    if not 0 <= hits <= trials:
        raise ValueError(f"{hits} hits out of {trials} trials")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def split_estimate(answered_by: Sequence[str | None], revision: str, requested_percent: float,
                   confidence: float = 0.95) -> dict[str, float | int | bool]:  # fmt: skip
    """The share of answered requests that ``revision`` served, against the share requested.

    Unanswered requests (None) are left out of the share and counted apart.
    """
    answered = [a for a in answered_by if a is not None]
    hits = sum(1 for a in answered if a == revision)
    low, high = wilson_interval(hits, len(answered), confidence)
    return {
        "requested_percent": float(requested_percent),
        "observed_percent": round(100 * hits / len(answered), 3),
        "ci_low_percent": round(100 * low, 3),
        "ci_high_percent": round(100 * high, 3),
        "confidence": confidence,
        "answered": len(answered),
        "unanswered": len(answered_by) - len(answered),
        "requested_within_ci": 100 * low <= requested_percent <= 100 * high,
    }


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 4000,
                      seed: int = 0) -> dict[str, float | int]:  # fmt: skip
    """Median of the pairwise differences a[i] − b[i], with a seeded percentile-bootstrap interval.

    The pairs come from interleaved requests, so slow drift of the server or the network hits both paths
    alike and falls out of each difference.
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} values cannot be paired")
    if len(a) < 2:
        raise ValueError("a difference needs at least two pairs")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    medians = np.median(diffs[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return {
        "median_difference": round(float(median(diffs)), 4),
        "ci_low": round(float(low), 4),
        "ci_high": round(float(high), 4),
        "confidence": confidence,
        "pairs": len(diffs),
        "median_a": round(float(median(a)), 4),
        "median_b": round(float(median(b)), 4),
    }
