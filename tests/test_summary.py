"""The block a batch ends with, read from the run directory like the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from servinglab.report import report_warnings
from servinglab.report.advice import derive_advice
from servinglab.report.rundata import load_run
from servinglab.report.summary import summary_lines
from servinglab.report.table import decision_table

RUNS = Path(__file__).parent / "fixtures" / "report-runs"


@pytest.mark.parametrize("name", ["cluster-full", "cluster-partial", "cluster-failed"])
def test_the_summary_says_what_the_report_says(name):
    run = load_run(RUNS / name)
    lines = summary_lines(RUNS / name, Path("reports/page.html"))
    assert lines[0] == lines[-1] and set(lines[0]) == {"="}
    assert lines[1] == f"study {run.study}, run {run.run_id}: {run.context['status']}"
    for advice in derive_advice(run, decision_table(run)):
        line = next(line for line in lines if line.startswith(f"  {advice.layer}: "))
        assert line.startswith(f"  {advice.layer}: {advice.verdict} — ")
    assert f"warnings: {len(report_warnings(run))}" in "\n".join(lines)
    assert lines[-2] == "report: reports/page.html"


def test_headline_numbers_come_from_the_lightest_valid_stage():
    run = load_run(RUNS / "cluster-full")
    layer = "raw"
    stages = [s for s in run.latency_stages if s["layer"] == layer and s["validity"]["verdict"] == "valid"]
    first = stages[0]["summary"]
    line = next(line for line in summary_lines(RUNS / "cluster-full") if line.startswith(f"  {layer}: "))
    assert f"{stages[0]['stage']}: TTFT {first['median_ttft_ms']:.1f} ms, TPOT {first['median_tpot_ms']:.1f} ms" in line
    assert f"{len(stages)} of {sum(s['layer'] == layer for s in run.latency_stages)} stages valid" in line


def test_a_layer_without_measurements_says_why():
    lines = summary_lines(RUNS / "cluster-failed")
    run = load_run(RUNS / "cluster-failed")
    broken = [a for a in derive_advice(run, decision_table(run)) if a.verdict == "broken"]
    assert broken, "the failed fixture has a layer that failed to deploy"
    for advice in broken:
        assert f"  {advice.layer}: broken — {advice.reasons[0]}" in lines
