"""Results saved by real ``vllm bench serve`` runs, imported and rendered whatever optional keys they lack.

The files in tests/fixtures/vllm-bench were written by ``vllm bench serve`` itself (make_files.py there):
without ``--goodput`` its ``request_goodput`` is null, by default it saves p99 and no p95 (and no E2E
statistics at all), and with ``--metric-percentiles 50`` no tail percentile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from servinglab import records, report
from servinglab.measure.bench import import_vllm_bench
from servinglab.report.csvexport import csv_tables
from servinglab.report.plots import figures
from servinglab.report.rundata import load_run
from servinglab.report.table import decision_table

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAVED = sorted((FIXTURES / "vllm-bench").glob("vllm-*.json"))
# A cluster run with deployments and smoke checks and no latency stage: the imports are its only stages.
BASE_RUN = FIXTURES / "report-runs" / "cluster-partial"


def imported_run(tmp_path: Path, *files: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(BASE_RUN, run)
    for file in files:
        import_vllm_bench(file, run, "raw")
    return run


def test_the_fixtures_are_vllm_bench_serve_results_of_each_shape():
    saved = {p.name: json.loads(p.read_text()) for p in SAVED}
    assert len(saved) >= 3
    assert any(d["request_goodput"] is None for d in saved.values())
    assert any(d["request_goodput"] is not None for d in saved.values())
    assert any(not any(k.startswith("p95_") for k in d) for d in saved.values())
    assert any(not any(k.startswith(("p95_", "p99_")) for k in d) for d in saved.values())


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: p.stem)
def test_an_imported_result_renders_whatever_keys_it_lacks(saved, tmp_path):
    run = imported_run(tmp_path, saved)
    data = json.loads(saved.read_text())
    [stage] = load_run(run).latency_stages
    assert stage["summary"]["median_ttft_ms"] == data["median_ttft_ms"]
    html = report.render_html(run)
    assert report.render_html(run) == html
    assert f"{data['median_ttft_ms']:.1f}" in html
    cells = decision_table(load_run(run)).cells()
    assert cells["ttft"]["raw"].status == "measured" and cells["ttft"]["raw"].provenance == "imported"
    ids = [f.anchor for f in figures(load_run(run))]
    assert "fig-latency-throughput" in ids
    if data["request_goodput"] is None:  # nothing to draw: no goodput figure, rather than a line of zeros
        assert "fig-goodput" not in ids
    stages_csv = csv_tables(load_run(run))["latency_stages.csv"].splitlines()
    assert len(stages_csv) == 2 and stages_csv[1].startswith("raw,c=2,vllm bench serve,imported,")


def test_results_with_and_without_goodput_render_side_by_side(tmp_path):
    """One layer's stages, some with goodput saved and some without: the figure draws what is there."""
    with_goodput = [p for p in SAVED if json.loads(p.read_text())["request_goodput"] is not None]
    without = [p for p in SAVED if json.loads(p.read_text())["request_goodput"] is None]
    run = imported_run(tmp_path, without[0], with_goodput[0])
    found = {f.anchor: f for f in figures(load_run(run))}
    goodput = json.loads(with_goodput[0].read_text())["request_goodput"]
    assert f"Goodput peaked at {goodput:.2f} requests/s" in found["fig-goodput"].reading
    published = report.publish(run, tmp_path / "reports")
    assert "fig-goodput" in published.read_text()
    assert records.read(run, records.LATENCY_STAGES).rows[0]["summary"]["request_goodput"] is None


def test_import_then_report_and_compare_from_the_command_line(tmp_path):
    """The user's path: import a result saved without --goodput, publish the run, compare it with another."""
    from conftest import run_cli

    without = next(p for p in SAVED if json.loads(p.read_text())["request_goodput"] is None)
    run = tmp_path / "run"
    shutil.copytree(BASE_RUN, run)
    done = run_cli("import", "vllm-bench", str(without), "--run-dir", str(run), "--layer", "raw", timeout=300)
    assert done.returncode == 0, done.stderr
    published = run_cli("report", str(run), "--out", str(tmp_path / "reports"), timeout=300)
    assert published.returncode == 0, published.stderr
    assert Path(published.stdout.strip()).is_file()
    other = tmp_path / "other"
    shutil.copytree(BASE_RUN, other)
    records.update_context(other, run_id="20261127T110000Z")
    import_vllm_bench(next(p for p in SAVED if p != without), other, "raw")
    compared = run_cli("report", str(run), str(other), "--out", str(tmp_path / "reports"), timeout=300)
    assert compared.returncode == 0, compared.stderr
    assert "vllm bench serve" in Path(compared.stdout.strip()).read_text()
