"""How sure a stage's numbers are: 95 % percentile-bootstrap intervals of its medians and p95s, and whether a
difference between two stages exceeds their noise.

A stage may be measured several times (``workloads.latency.repeats``). Each bootstrap resample draws the
repeats with replacement, then the requests within each drawn repeat with replacement, and computes the
statistic over everything drawn; 2,000 resamples from a recorded seed give the same interval for the same
records. With one repeat the interval covers the variation between requests only, not between runs; a
report says so. ITL, a statistic of every gap between chunks, resamples whole requests with their gaps.

Throughput has one value per repeat: with several repeats its interval comes from resampling them; with
one, a closed loop's throughput is scaled by the resampled mean E2E (Little's law: a fixed number of
requests in flight serve at the rate their latency allows).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .client_metrics import itl_ms, tpot_ms

RESAMPLES = 2000
LEVEL = 0.95
STATISTICS = {"median": 50.0, "p95": 95.0}


def _per_request(record: dict[str, Any], metric: str) -> list[float]:
    """A request's values of a metric: one for TTFT, TPOT and E2E, every gap for ITL."""
    if metric == "itl":
        return itl_ms(record)
    value = tpot_ms(record) if metric == "tpot" else record.get(f"{metric}_ms")
    return [] if value is None else [float(value)]


class _Sample:
    """Every value of a metric, sorted, with the request (and repeat) each came from."""

    def __init__(self, repeats: Sequence[Sequence[dict[str, Any]]], metric: str) -> None:
        values, owners, self.sizes = [], [], []
        first = 0
        for rows in repeats:
            self.sizes.append(len(rows))
            for i, record in enumerate(rows):
                got = _per_request(record, metric)
                values += got
                owners += [first + i] * len(got)
            first += len(rows)
        order = np.argsort(values, kind="stable")
        self.values = np.asarray(values, dtype=float)[order]
        self.owners = np.asarray(owners, dtype=int)[order]
        self.requests = first

    def empty(self) -> bool:
        return self.values.size == 0


def _weights(rng: np.random.Generator, sizes: list[int]) -> np.ndarray:
    """How many times each request is drawn: repeats with replacement, then requests within each."""
    weights = np.zeros(sum(sizes))
    starts = np.cumsum([0, *sizes[:-1]])
    for r in rng.integers(0, len(sizes), size=len(sizes)):
        if sizes[r]:
            weights[starts[r] : starts[r] + sizes[r]] += np.bincount(rng.integers(0, sizes[r], size=sizes[r]),
                                                                      minlength=sizes[r])  # fmt: skip
    return weights


def _quantiles(sample: _Sample, weights: np.ndarray, qs: Sequence[float]) -> list[float | None]:
    """Weighted quantiles of a sorted sample: the first value whose cumulative weight reaches q of the total."""
    cumulative = np.cumsum(weights[sample.owners])
    if cumulative.size == 0 or cumulative[-1] <= 0:
        return [None] * len(qs)
    return [float(sample.values[np.searchsorted(cumulative, q / 100 * cumulative[-1])]) for q in qs]


def _bounds(draws: list[float], level: float) -> list[float] | None:
    finite = [d for d in draws if d is not None and np.isfinite(d)]
    if not finite:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]


def stage_intervals(
    repeats: Sequence[Sequence[dict[str, Any]]],
    seed: int,
    throughputs: Sequence[float] | None = None,
    closed_loop: bool = False,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict[str, Any]:
    """The intervals of a stage's medians and p95s (TTFT, TPOT, ITL, E2E) and of its request throughput.

    Parameters
    ----------
    repeats : list of list of dict
        Per repeat, the records of the requests that completed (warmups left out).
    seed : int
        The seed of the resampling, recorded with the intervals.
    throughputs : list of float, optional
        Request throughput of each repeat.
    closed_loop : bool
        A fixed concurrency, for which one repeat's throughput interval follows its latency's.
    """
    rng = np.random.default_rng(seed)
    samples = {m: _Sample(repeats, m) for m in ("ttft", "tpot", "itl", "e2el")}
    sizes = [len(rows) for rows in repeats]
    draws: dict[str, list[float]] = {f"{s}_{m}_ms": [] for m in samples for s in STATISTICS}
    e2e_means: list[float] = []
    e2e = samples["e2el"]
    for _ in range(resamples):
        weights = _weights(rng, sizes)
        for metric, sample in samples.items():
            if sample.empty():
                continue
            for stat, value in zip(STATISTICS, _quantiles(sample, weights, list(STATISTICS.values()))):
                if value is not None:
                    draws[f"{stat}_{metric}_ms"].append(value)
        if not e2e.empty():
            w = weights[e2e.owners]
            if w.sum() > 0:
                e2e_means.append(float(np.dot(w, e2e.values) / w.sum()))
    out: dict[str, Any] = {"level": level, "resamples": resamples, "seed": seed, "repeats": len(repeats)}
    out["intervals"] = {key: bounds for key, d in draws.items() if (bounds := _bounds(d, level))}
    out["throughput_basis"] = None
    if throughputs and len(throughputs) > 1:
        picks = rng.integers(0, len(throughputs), size=(resamples, len(throughputs)))
        out["intervals"]["request_throughput"] = _bounds(list(np.asarray(throughputs)[picks].mean(axis=1)), level)
        out["throughput_basis"] = "repeats"
    elif throughputs and closed_loop and e2e_means:
        measured = float(np.dot(np.ones(e2e.values.size), e2e.values) / e2e.values.size)
        scaled = [throughputs[0] * measured / m for m in e2e_means if m > 0]
        out["intervals"]["request_throughput"] = _bounds(scaled, level)
        out["throughput_basis"] = "latency"
    return out


def differences(
    a: Sequence[Sequence[dict[str, Any]]],
    b: Sequence[Sequence[dict[str, Any]]],
    wanted: Sequence[tuple[str, str]],
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict[tuple[str, str], dict[str, Any] | None]:
    """How much ``b``'s statistics differ from ``a``'s, each ``(metric, statistic)`` of ``wanted`` (``("ttft",
    "median")``) with its interval and whether that interval excludes zero (the difference exceeds the
    noise); None for a statistic either side has no value of. Each resample draws both sides once for all
    the statistics, from ``seed``: the same records give the same answer."""
    metrics = sorted({m for m, _ in wanted})
    samples_a = {m: _Sample(a, m) for m in metrics}
    samples_b = {m: _Sample(b, m) for m in metrics}
    usable = [(m, st) for m, st in wanted if not samples_a[m].empty() and not samples_b[m].empty()]
    rng = np.random.default_rng(seed)
    sizes_a, sizes_b = [len(r) for r in a], [len(r) for r in b]
    diffs: dict[tuple[str, str], list[float]] = {w: [] for w in usable}
    for _ in range(resamples if usable else 0):
        wa, wb = _weights(rng, sizes_a), _weights(rng, sizes_b)
        for metric, statistic in usable:
            [va] = _quantiles(samples_a[metric], wa, [STATISTICS[statistic]])
            [vb] = _quantiles(samples_b[metric], wb, [STATISTICS[statistic]])
            if va is not None and vb is not None:
                diffs[(metric, statistic)].append(vb - va)
    out: dict[tuple[str, str], dict[str, Any] | None] = {w: None for w in wanted}
    for (metric, statistic), draws in diffs.items():
        bounds = _bounds(draws, level)
        if bounds is None:
            continue
        q = STATISTICS[statistic]
        point = float(np.percentile(samples_b[metric].values, q) - np.percentile(samples_a[metric].values, q))
        out[(metric, statistic)] = {"difference": round(point, 4), "interval": bounds, "level": level, "seed": seed,
                                    "exceeds_noise": not (bounds[0] <= 0 <= bounds[1])}  # fmt: skip
    return out


def difference(
    a: Sequence[Sequence[dict[str, Any]]],
    b: Sequence[Sequence[dict[str, Any]]],
    metric: str,
    statistic: str = "median",
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """One statistic's difference (see :func:`differences`)."""
    return differences(a, b, [(metric, statistic)], seed, resamples, level)[(metric, statistic)]


def recorded(stage: dict[str, Any], key: str) -> list[float] | None:
    """A stage record's stored 95 % interval of a figure (``median_ttft_ms``, ``request_throughput``), or None."""
    found = ((stage.get("uncertainty") or {}).get("intervals") or {}).get(key)
    return list(found) if found else None


def overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Whether two intervals overlap (None when either is missing): overlapping values are not told apart."""
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]
