"""Whether a run's records agree with each other: every stage summary against the request records it was
computed from, and every timed record inside the run's span. Run on every report; each disagreement is a
warning that names the stage or the trial. Nothing is recomputed for display: the report still shows
what the run recorded, and says where that disagrees with the records beneath it.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from ..measure.client_metrics import summarize
from .rundata import RunData

# The figures of a stage summary checked against its requests (counts exactly, latencies within TOLERANCE).
COUNTS = ("completed", "failed")
LATENCIES = tuple(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p95"))
TOLERANCE = 0.005  # relative, and at least 0.01 ms: what rounding a written record may change
# Clocks of this machine and of pods differ a little; a stamp this far outside the span is not a mismatch.
CLOCK_SLACK_S = 2.0


def _unix(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=0.01)


def _summary_mismatches(stage: dict[str, Any], requests: list[dict[str, Any]]) -> list[str]:
    recorded = stage["summary"]
    try:
        again = summarize(requests, recorded.get("duration") or 0.0)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"its request records cannot be summarized ({type(exc).__name__}: {exc})"]
    out = []
    for key in COUNTS:
        if recorded.get(key) is not None and recorded[key] != again[key]:
            out.append(f"{key} {recorded[key]} against {again[key]} in its request records")
    for key in LATENCIES:
        a, b = recorded.get(key), again.get(key)
        if a is None or b is None:
            continue
        if not _close(a, b):
            out.append(f"{key} {a:.2f} ms against {b:.2f} ms from its request records")
    return out


def check(run: RunData) -> list[str]:
    """One warning per stage or trial whose records disagree (with what disagrees), empty when they agree."""
    warnings = []
    start = _unix(run.context.get("started_at"))
    end = _unix(run.context.get("ended_at"))
    status = run.context.get("status")

    def outside(first: float | None, last: float | None) -> str | None:
        if start is not None and first is not None and first < start - CLOCK_SLACK_S:
            return f"starts {start - first:.0f} s before the run began ({run.context['started_at']})"
        if end is not None and status not in ("running", "interactive") and last is not None and last > end + CLOCK_SLACK_S:
            return f"ends {last - end:.0f} s after the run ended ({run.context['ended_at']})"
        return None

    for stage, requests in run.stage_requests():
        where = f"layer {stage['layer']} stage {stage['stage']}"
        problems = []
        when = outside(stage.get("started_at_unix"), stage.get("ended_at_unix"))
        if when:
            problems.append(when)
        completed = stage["summary"].get("completed")
        if stage.get("provenance") != "imported" and completed is not None:
            if requests is None:
                if completed:
                    problems.append(f"no request records behind its {completed} completed requests")
            else:
                problems += _summary_mismatches(stage, requests)
        if problems:
            warnings.append(f"{where}: its records disagree: " + "; ".join(problems))
    for trial in run.lifecycle:
        when = outside(trial.get("started_at_unix"), trial.get("ended_at_unix"))
        if when:
            warnings.append(f"layer {trial['layer']} {trial['experiment']} trial {trial['trial']}: its record {when}")
    return warnings
