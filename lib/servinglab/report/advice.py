""""When to use which", derived from the run's measurements and the study's objectives."""

from __future__ import annotations

from dataclasses import dataclass

from .rundata import RunData
from .table import Table


@dataclass(frozen=True)
class Advice:
    layer: str
    verdict: str  # fits | misses | unknown | broken
    reasons: list[str]


def derive_advice(run: RunData, table: Table) -> list[Advice]:
    """One verdict per layer: does what was measured meet the study's objectives, and what is unknown."""
    slos = run.params.get("slos", {})
    names = [n for n, _ in table.layers]
    cells = {row.key: dict(zip(names, row_cells)) for row, row_cells in table.rows}
    advice = []
    for layer, kind in table.layers:
        reasons: list[str] = []
        verdict = "fits"
        deployment = run.last_deployment(layer)
        if deployment is None or deployment["status"] == "unsupported":
            why = deployment["reason"] if deployment else "not deployed in this run"
            advice.append(Advice(layer, "unknown", [f"no measurement on this run's platform ({why})"]))
            continue
        if deployment["status"] == "failed":
            advice.append(Advice(layer, "broken", ["it failed to deploy; see the deployments section"]))
            continue
        smoke = cells["confirmed"][layer]
        if smoke.status == "failed":
            verdict = "broken"
            reasons.append(f"it failed its smoke checks ({smoke.text})")
        fresh = [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]
        objective = slos.get("time_to_ready_s")
        if fresh and objective:
            worst = max(fresh)
            if worst <= objective:
                reasons.append(f"ready in {worst:.1f} s at worst, within the time-to-ready objective of {objective:g} s")
            else:
                verdict = "misses" if verdict == "fits" else verdict
                reasons.append(f"ready in {worst:.1f} s at worst, over the time-to-ready objective of {objective:g} s")
        elif fresh:
            reasons.append(f"ready in {max(fresh):.1f} s; the study sets no time-to-ready objective")
        unmeasured = [row.title for row, _ in table.rows if cells[row.key][layer].status == "pending"]
        if unmeasured:
            reasons.append("not yet measured: " + ", ".join(unmeasured))
            if verdict == "fits":
                verdict = "fits so far"
        advice.append(Advice(layer, verdict, reasons))
    return advice
