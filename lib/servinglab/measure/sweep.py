"""The saturation sweep: where a server's load range lies, found by measuring it, after GuideLLM's sweep.

Two probe stages come first: a synchronous stage (one request at a time, a closed loop at concurrency 1)
and a throughput stage (every request at once, up to a concurrency cap). Their measured request rates
bound the range; then N Poisson (or gamma) stages run at rates spaced linearly inside it, lowest first.
Each stage is an ordinary latency stage (:mod:`servinglab.measure.stage`), recorded with its part of the
sweep under ``sweep``.

Where this departs from GuideLLM's ``SweepProfile`` (``np.linspace(sync, throughput, size - 1)[1:]``):

- N counts the rate stages only; GuideLLM's sweep size counts the two probes as well.
- The upper end is the highest measured rate of a probe whose stage stayed ``valid``; GuideLLM takes the
  throughput stage's rate whatever its client saw. A client-limited throughput stage measured the client,
  not the server, so its rate is no bound on the server. With no valid probe above the synchronous rate
  there is no range, and no rate stage runs.
- The spacing is GuideLLM's: the synchronous rate is left out (it was just measured), the upper end is
  the last rate (a Poisson load at the measured capacity shows what saturation costs in latency).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The parts of a sweep, as recorded in a stage's ``sweep.part``.
SYNCHRONOUS = "synchronous"
THROUGHPUT = "throughput"
RATE = "rate"


def sweep_rates(synchronous_rate: float, top_rate: float, count: int) -> list[float]:
    """The rates of a sweep's ``count`` rate stages, lowest first.

    Parameters
    ----------
    synchronous_rate : float
        The synchronous stage's measured request rate (req/s): the lower end, itself left out.
    top_rate : float
        The highest measured request rate (req/s) of a stage that stayed valid: the upper end, the last rate.
    count : int
        Rate stages wanted.

    Returns
    -------
    list of float
        ``count`` rates spaced linearly above ``synchronous_rate`` up to ``top_rate``; empty when the range is
        empty (``top_rate`` not above ``synchronous_rate``, or either not a positive number) or ``count`` < 1.
    """
    if count < 1 or not (np.isfinite(synchronous_rate) and np.isfinite(top_rate)):
        return []
    if synchronous_rate <= 0 or top_rate <= synchronous_rate:
        return []
    return [round(float(r), 6) for r in np.linspace(synchronous_rate, top_rate, count + 1)[1:]]


def measured_rate(stage: dict[str, Any]) -> float | None:
    """A stage's achieved request rate (req/s): its completed requests over its duration."""
    summary = stage.get("summary", stage)
    rate = summary.get("request_throughput")
    return float(rate) if rate else None


def is_valid(stage: dict[str, Any]) -> bool:
    return (stage.get("validity") or {}).get("verdict") == "valid"


def rate_range(synchronous: dict[str, Any], probes: list[dict[str, Any]]) -> tuple[float, float, str] | None:
    """The range the rate stages are spaced in: (the synchronous stage's rate, the highest valid probe's rate,
    that probe's stage name); None when no valid probe measured a rate above the synchronous one.

    ``synchronous`` and ``probes`` are stage records (or ``servinglab bench`` results) with ``summary`` (or
    the summary's keys at the top level), ``validity`` and ``stage``.
    """
    low = measured_rate(synchronous)
    if low is None:
        return None
    valid = [(rate, p.get("stage", "")) for p in probes if is_valid(p) and (rate := measured_rate(p)) is not None]
    if not valid:
        return None
    high, name = max(valid)
    return (low, high, name) if high > low else None


def part_of(part: str, **more: Any) -> dict[str, Any]:
    """A stage's ``sweep`` field: its part (synchronous, throughput, rate) and, for a rate, where it came from."""
    return {"part": part, **more}


def no_range_text(synchronous: dict[str, Any], throughput: dict[str, Any]) -> str:
    """Why a sweep ran no rate stage: the probes left no valid range above the synchronous rate."""
    low, high = measured_rate(synchronous), measured_rate(throughput)
    verdict = (throughput.get("validity") or {}).get("verdict", "unchecked")
    return (f"no rate stage: the synchronous stage measured {low or 0:.3g} req/s and the throughput stage "
            f"{high or 0:.3g} req/s ({verdict}); the rates need a valid stage above the synchronous rate")  # fmt: skip
