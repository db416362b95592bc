"""The report's first screen: the verdict in one paragraph, where the numbers came from and how far they hold,
each in one line. Everything here restates what the report already derived (the advice, the recommendations,
the recorded provenance, validity and intervals); nothing is measured or judged again."""

from __future__ import annotations

from dataclasses import dataclass

from .advice import Advice, Recommendation
from .rundata import RunData
from .table import latency_objectives, objectives_text, verdict

# The verdicts in the order the paragraph names them: what fits first, what nobody could tell last.
VERDICT_ORDER = ("fits", "fits so far", "misses", "broken", "unknown")
PROVENANCE_ORDER = ("measured", "imported", "synthetic")
PROVENANCE_LABELS = {"measured": "measured here", "imported": "imported", "synthetic": "synthetic"}


@dataclass(frozen=True)
class VerdictGroup:
    verdict: str  # fits | fits so far | misses | broken | unknown
    layers: list[str]
    why: str | None  # the one reason every layer of the group shares (e.g. "needs platform: kubernetes")


@dataclass(frozen=True)
class Verdict:
    """The paragraph that answers the report's question, in the parts the page styles."""

    objectives: str  # "TTFT p95 ≤ 500 ms, …, ready within 300 s"
    platform: str  # "local · none (CPU)"
    groups: list[VerdictGroup]
    needs: list[tuple[str, list[str]]]  # (a need, in lower case; the layers this run points to for it)


def objectives_sentence(run: RunData) -> str:
    """The study's objectives (``slos``) that are set, in one phrase."""
    slos = run.params.get("slos", {})
    parts = [objectives_text(latency_objectives(run))] if latency_objectives(run) else []
    if slos.get("time_to_ready_s"):
        parts.append(f"ready within {slos['time_to_ready_s']:g} s")
    if slos.get("cold_start_s"):
        parts.append(f"first token from zero within {slos['cold_start_s']:g} s")
    if slos.get("update_failed_requests") is not None:
        parts.append(f"at most {slos['update_failed_requests']} failed requests in a model update")
    return ", ".join(parts) or "none set (slos)"


def _platform_phrase(run: RunData) -> str:
    platform = run.context.get("platform", {})
    return " · ".join(p for p in (platform.get("name") or "?", platform.get("accelerator")) if p)


def _shared_reason(advice: list[Advice]) -> str | None:
    reasons = {a.reasons[0] for a in advice if a.reasons}
    return reasons.pop() if len(reasons) == 1 and len(advice) == sum(1 for a in advice if a.reasons) else None


def verdict_of(run: RunData, advice: list[Advice], recommendations: list[Recommendation]) -> Verdict:
    """The first screen's paragraph: per verdict the layers that got it, then per need the layers this run
    points to. The reasons of layers that fit or miss are in the advice further down (one link away)."""
    groups = []
    for name in VERDICT_ORDER:
        found = [a for a in advice if a.verdict == name]
        if found:
            # Only a verdict nobody could measure is explained here, and only by a reason every layer shares.
            why = _shared_reason(found) if name in ("unknown", "broken") else None
            groups.append(VerdictGroup(name, [a.layer for a in found], why))
    needs = [(r.need[:1].lower() + r.need[1:], r.layers) for r in recommendations]
    return Verdict(objectives_sentence(run), _platform_phrase(run), groups, needs)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def provenance_counts(run: RunData) -> dict[str, dict[str, int]]:
    """{provenance: {"latency stage": n, "lifecycle trial": n, "other record": n}} over the run's tables."""
    units = (("latency stage", [run.latency_stages]), ("lifecycle trial", [run.lifecycle]),
             ("other record", [run.latency_requests, run.deployments, run.smoke, run.preflight,
                               run.lifecycle_requests]))  # fmt: skip
    counts: dict[str, dict[str, int]] = {label: {} for label in PROVENANCE_ORDER}
    for unit, tables in units:
        for rows in tables:
            for row in rows:
                label = row.get("provenance", "measured")
                bucket = counts.setdefault(label, {})
                bucket[unit] = bucket.get(unit, 0) + 1
    return counts


def provenance_line(run: RunData) -> str:
    """Where the run's numbers came from, in one line: measured here, imported, synthetic, with counts."""
    parts = []
    for label, found in provenance_counts(run).items():
        counted = ", ".join(_count(n, unit) for unit, n in found.items() if n)
        parts.append(f"{PROVENANCE_LABELS.get(label, label)}: {counted or 'none'}")
    return " · ".join(parts)


def all_measured_here(run: RunData) -> bool:
    counts = provenance_counts(run)
    return not any(found for label, found in counts.items() if label != "measured")


def validity_line(run: RunData) -> str:
    """How far the latency numbers hold, in one line: valid stages n of m (the others by verdict, named), and
    the intervals shown with them."""
    stages = run.latency_stages
    if not stages:
        return "no latency stage in this run"
    valid = [s for s in stages if verdict(s) == "valid"]
    text = f"valid stages {len(valid)} of {len(stages)}"
    others: dict[str, list[str]] = {}
    for s in stages:
        if verdict(s) != "valid":
            others.setdefault(verdict(s), []).append(f"{s['layer']} {s['stage']}")
    if others:
        text += " (" + "; ".join(f"{name}: {', '.join(where)}" for name, where in others.items()) + ")"
        text += ", and only valid stages feed a verdict"
    with_intervals = [s for s in stages if (s.get("uncertainty") or {}).get("intervals")]
    if not with_intervals:
        return text + " · no intervals recorded"
    levels = sorted({round(100 * s["uncertainty"].get("level", 0.95)) for s in with_intervals})
    repeats = sorted({s.get("repeats") or 1 for s in with_intervals})
    level = "/".join(f"{lv} %" for lv in levels)
    if repeats == [1]:  # one repeat: the interval says how requests vary, not how runs would
        spread = "over requests, one repeat each"
    else:
        spread = f"over {repeats[0]}–{repeats[-1]} repeats" if len(repeats) > 1 else f"over {repeats[0]} repeats"
    return (f"{text} · {level} intervals shown for {len(with_intervals)} of {len(stages)} stages "
            f"(bootstrap, {spread})")
