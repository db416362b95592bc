"""The check every report runs: stage summaries against their request records, records inside the run's
span. Each mismatch is one warning that names the stage (or the trial)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from servinglab.report import consistency, report_warnings
from servinglab.report.rundata import load_run

FULL = Path(__file__).parent / "fixtures" / "report-runs" / "cluster-full"


@pytest.fixture
def run_dir(tmp_path):
    shutil.copytree(FULL, tmp_path / "run")
    return tmp_path / "run"


def rewrite(path: Path, change) -> None:  # noqa: ANN001
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(r)) + "\n" for r in rows))


def test_the_fixture_runs_agree_with_themselves():
    for name in ("cluster-full", "cluster-partial", "cluster-failed"):
        assert consistency.check(load_run(FULL.parent / name)) == []


def test_a_summary_that_disagrees_with_its_records_is_named(run_dir):
    def change(stage: dict) -> dict:
        if stage["layer"] == "kserve-standard" and stage["stage"] == "c=4":
            stage["summary"]["median_itl_ms"] = 35.0
            stage["summary"]["completed"] += 1
        return stage

    rewrite(run_dir / "data" / "latency_stages.jsonl", change)
    [warning] = consistency.check(load_run(run_dir))
    assert warning.startswith("layer kserve-standard stage c=4: its records disagree:")
    assert "median_itl_ms 35.00 ms against" in warning and "completed 61 against 60" in warning
    assert warning in report_warnings(load_run(run_dir))


def test_records_outside_the_run_are_named(run_dir):
    context = json.loads((run_dir / "run.json").read_text())

    def early(stage: dict) -> dict:
        if stage["layer"] == "raw" and stage["stage"] == "c=1":
            stage["started_at_unix"] -= 86400
        return stage

    rewrite(run_dir / "data" / "latency_stages.jsonl", early)
    context["ended_at"] = context["started_at"]  # everything but the first moment now lies after the end
    (run_dir / "run.json").write_text(json.dumps(context))
    found = consistency.check(load_run(run_dir))
    assert any(w.startswith("layer raw stage c=1: its records disagree: starts 8") and "s before the run began" in w
               for w in found)
    assert any("ends" in w and "after the run ended" in w for w in found)
    assert any(w.startswith("layer raw time_to_ready trial 0: its record ends") for w in found)


def test_a_stage_whose_records_are_gone_is_named(run_dir):
    path = run_dir / "data" / "latency_requests.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["layer"] != "llm-d"]
    path.write_text("\n".join(kept) + "\n")
    found = consistency.check(load_run(run_dir))
    assert len(found) == 4 and all(w.startswith("layer llm-d stage c=") and "no request records" in w for w in found)
