"""The few lines a batch ends with: its status, per layer its verdict and headline numbers, how many
warnings the report holds and where the report is, as ``vllm bench serve`` ends with its result block.

Read from the run directory like the report (the same verdicts, the same warnings), never measured anew.
"""

from __future__ import annotations

import os
from typing import Any

from .advice import derive_advice
from .rundata import RunData, load_run
from .table import decision_table

RULE = "=" * 24


def _headline(run: RunData, layer: str) -> str:
    """Time to ready, then the lightest valid stage's median TTFT and TPOT and the highest valid throughput."""
    parts = []
    deployment = run.last_deployment(layer)
    if deployment and deployment.get("time_to_ready_s") is not None:
        parts.append(f"ready in {deployment['time_to_ready_s']:.1f} s")
    stages = [s for s in run.latency_stages if s["layer"] == layer]
    valid = [s for s in stages if (s.get("validity") or {}).get("verdict") == "valid"]
    if valid:
        lightest = valid[0]
        summary = lightest["summary"]
        ttft, tpot = summary.get("median_ttft_ms"), summary.get("median_tpot_ms")
        if ttft is not None and tpot is not None:
            parts.append(f"{lightest['stage']}: TTFT {ttft:.1f} ms, TPOT {tpot:.1f} ms (medians)")
        throughputs = [s["summary"]["output_throughput"] for s in valid if s["summary"].get("output_throughput")]
        if throughputs:
            parts.append(f"up to {max(throughputs):.0f} output tok/s in a valid stage")
    if stages:
        parts.append(f"{len(valid)} of {len(stages)} stages valid")
    return "; ".join(parts) or "nothing measured"


def summary_lines(run_dir: str | os.PathLike, report_path: Any = None) -> list[str]:
    """The batch's closing block, one string per line."""
    run = load_run(run_dir)
    table = decision_table(run)
    from . import report_warnings  # the report's own list, so the count is the one the page shows

    lines = [RULE, f"study {run.study}, run {run.run_id}: {run.context.get('status', 'unknown')}"]
    for advice in derive_advice(run, table):
        said = advice.reasons[0] if advice.verdict in ("unknown", "broken") and advice.reasons else _headline(run, advice.layer)
        lines.append(f"  {advice.layer}: {advice.verdict} — {said}")
    count = len(report_warnings(run))
    lines.append(f"warnings: {count}" + (" (listed at the top of the report)" if count else ""))
    lines.append(f"report: {report_path}" if report_path else f"results: {run.run_dir}")
    lines.append(RULE)
    return lines
