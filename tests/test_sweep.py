"""The saturation sweep: its rates, the study key it replaces (rate_sweep, still read), the sweep run against a
server that saturates (in a study and in ``servinglab bench``), and the report's highest load taken from it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS
from synthetic import closed_stage
from test_report import cells_of, make_run

from servinglab import api, records
from servinglab.cli import main
from servinglab.config import load_resolved, load_study
from servinglab.errors import ParamsError
from servinglab.experiments import latency
from servinglab.measure import sweep
from servinglab.measure.intervals import stage_intervals
from servinglab.platforms import Endpoint
from servinglab.report import advice
from servinglab.report import load_pattern
from servinglab.report.rundata import load_run
from servinglab.report.table import decision_table

HERE = Path(__file__).resolve().parent


# --- the rates ------------------------------------------------------------------------------------------


def test_rates_are_spaced_linearly_above_the_synchronous_rate_up_to_the_top():
    """GuideLLM's spacing: linspace(sync, top)[1:], the synchronous rate left out, the top kept."""
    assert sweep.sweep_rates(2.0, 10.0, 4) == [4.0, 6.0, 8.0, 10.0]
    assert sweep.sweep_rates(1.5, 3.0, 1) == [3.0]
    assert sweep.sweep_rates(3.0, 9.0, 2) == [6.0, 9.0]


@pytest.mark.parametrize("low, high, count", [(5.0, 5.0, 3), (6.0, 5.0, 3), (0.0, 5.0, 3), (2.0, 10.0, 0),
                                              (float("nan"), 5.0, 2), (2.0, math.inf, 2)])  # fmt: skip
def test_no_rates_without_a_range(low, high, count):
    assert sweep.sweep_rates(low, high, count) == []


def stage(name: str, rate: float, verdict: str = "valid") -> dict:
    return {"stage": name, "summary": {"request_throughput": rate}, "validity": {"verdict": verdict}}


def test_the_top_is_the_highest_rate_of_a_probe_that_stayed_valid():
    sync, throughput = stage("sweep-sync", 3.0), stage("sweep-throughput", 12.0)
    assert sweep.rate_range(sync, [sync, throughput]) == (3.0, 12.0, "sweep-throughput")
    # A client-limited throughput stage measured the client: no bound on the server, so no range.
    limited = stage("sweep-throughput", 12.0, "client-limited")
    assert sweep.rate_range(sync, [sync, limited]) is None
    assert "throughput stage 12 req/s (client-limited)" in sweep.no_range_text(sync, limited)


# --- the study key --------------------------------------------------------------------------------------


def study_file(tmp_path: Path, latency_text: str) -> Path:
    data = yaml.safe_load((PARAMS / "ci.yaml").read_text())
    data["workloads"]["latency"].pop("sweep")
    data["workloads"]["latency"].update(yaml.safe_load(latency_text))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(path: Path, sets: list[str] | None = None):
    """The study alone: the session's override file (params/ci.yaml) would set the sweep over it."""
    (path.parent / "empty.yaml").write_text("{}\n")
    return load_study(path, sets or [], override_file=path.parent / "empty.yaml")


def test_an_old_rate_sweep_is_read_as_sweep_with_one_note(tmp_path, capsys):
    path = study_file(tmp_path, "rate_sweep: {rates: [3, 6], num_prompts: 9, burstiness: 0.5}")
    study = load(path)
    swept = study.workloads.latency.sweep
    assert (swept.rates, swept.num_prompts, swept.burstiness, swept.saturation_rates) == ([3.0, 6.0], 9, 0.5, 0)
    [note] = capsys.readouterr().err.splitlines()
    assert note == (f"servinglab: note: {path}: workloads.latency.rate_sweep is now workloads.latency.sweep; "
                    "read as that (rename it)")  # fmt: skip
    assert [s["stage"] for s in latency.planned_stages(study)][-2:] == ["rate=3", "rate=6"]


def test_an_old_rate_sweep_in_a_set_item_still_works(tmp_path, capsys):
    study = load(study_file(tmp_path, "sweep: {rates: [3]}"), ["workloads.latency.rate_sweep.rates=[]"])
    assert study.workloads.latency.sweep.rates == []
    assert "--set workloads.latency.rate_sweep.rates=[]: workloads.latency.rate_sweep is now" in capsys.readouterr().err


def test_a_study_with_both_keys_is_refused_naming_the_file_and_both(tmp_path, capsys):
    path = study_file(tmp_path, "{rate_sweep: {rates: [3]}, sweep: {saturation_rates: 4}}")
    with pytest.raises(ParamsError) as caught:
        load(path)
    assert str(caught.value) == (f"{path}: workloads.latency.rate_sweep and workloads.latency.sweep: give only sweep "
                                 "(rate_sweep is its old name)")  # fmt: skip
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"servinglab: {caught.value}"]


def test_listed_rates_and_a_saturation_sweep_together_are_refused(tmp_path):
    path = study_file(tmp_path, "sweep: {rates: [3], saturation_rates: 4}")
    with pytest.raises(ParamsError, match=rf"^{path}: workloads.latency.sweep: .*give rates .* or saturation_rates"):
        load(path)


def test_a_recorded_run_with_rate_sweep_reopens_without_a_note(tmp_path, capsys):
    params = load_study(PARAMS / "ci.yaml").resolved()
    params["workloads"]["latency"]["rate_sweep"] = params["workloads"]["latency"].pop("sweep")
    study = load_resolved(params, PARAMS / "ci.yaml", ["ci.yaml"], "params/0.json")
    assert study.workloads.latency.sweep.rates == [10.0]
    assert capsys.readouterr().err == ""


def test_a_saturation_sweep_is_planned_after_the_listed_stages(tmp_path):
    study = load(study_file(tmp_path, "{concurrency: [1], sweep: {saturation_rates: 2, num_prompts: 30}}"))
    planned = latency.planned_stages(study)
    assert [(p["stage"], p["mode"], p["max_concurrency"]) for p in planned] == [
        ("c=1", "closed", 1), ("sweep-sync", "sweep", 1), ("sweep-throughput", "sweep", 30),
        ("sweep-rate-1-of-2", "sweep", None), ("sweep-rate-2-of-2", "sweep", None)]  # fmt: skip
    assert all(p["request_rate"] is None for p in planned)  # the rates are found when the probes have run


# --- the sweep against a server that saturates ------------------------------------------------------------


@pytest.fixture()
def steady_client(monkeypatch):
    """The client's loop-lag limit out of the way: on a test machine shared with other work, how late this
    client's loop wakes depends on the neighbours, and the sweep's logic, not that, is under test here."""
    from servinglab.measure import client_metrics

    monkeypatch.setattr(client_metrics, "CLIENT_LAG_WARN_MS", 10_000.0)


@pytest.fixture(scope="module")
def saturating():
    """Steps of 4 ms + 4 ms per stream in flight: about 14 req/s one at a time, near 28 at eight at once."""
    server = subprocess.Popen([sys.executable, str(HERE / "saturating_endpoint.py"), "4", "4"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


SWEEP_SETS = ["workloads.latency.concurrency=[]", "workloads.latency.sweep.rates=[]",
              "workloads.latency.sweep.saturation_rates=2", "workloads.latency.sweep.num_prompts=24",
              "workloads.latency.sweep.max_concurrency=8", "workloads.latency.output_len=12",
              "workloads.latency.input_len=16", "workloads.latency.repeats=1"]  # fmt: skip


def test_the_sweep_finds_its_rates_and_records_every_stage(saturating, steady_client, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(f"paths: {{runs_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}\n")
    study_run = api.open_study(PARAMS / "ci.yaml", overrides=SWEEP_SETS)
    lines: list[str] = []
    stages = latency.run_layer_sweep(study_run.study, study_run.platform, Endpoint("raw", f"{saturating}/v1", "m"),
                                     study_run.run_dir, modes=("open",), say=lines.append)  # fmt: skip
    assert [s["stage"] for s in stages] == ["sweep-sync", "sweep-throughput", "sweep-rate-1-of-2", "sweep-rate-2-of-2"]
    sync, throughput, *rated = stages
    assert [s["validity"]["verdict"] for s in (sync, throughput)] == ["valid", "valid"], lines
    # The server saturated: eight at once carried more than one at a time, each request taking far longer.
    low, high = sync["summary"]["request_throughput"], throughput["summary"]["request_throughput"]
    assert low < high
    assert throughput["summary"]["mean_e2el_ms"] > 2 * sync["summary"]["mean_e2el_ms"]
    # The rates are spaced between the rates the probes measured, as recorded with each stage.
    assert [s["request_rate"] for s in rated] == sweep.sweep_rates(low, high, 2)
    assert rated[-1]["request_rate"] == pytest.approx(high)
    assert rated[0]["sweep"] == {"part": "rate", "index": 1, "count": 2, "between_req_s": [round(low, 6), round(high, 6)],
                                 "between_stages": ["sweep-sync", "sweep-throughput"]}  # fmt: skip
    written = records.read(study_run.run_dir, records.LATENCY_STAGES).rows
    assert [(s["stage"], s["mode"], s["sweep"]["part"]) for s in written] == [
        ("sweep-sync", "sweep", "synchronous"), ("sweep-throughput", "sweep", "throughput"),
        ("sweep-rate-1-of-2", "sweep", "rate"), ("sweep-rate-2-of-2", "sweep", "rate")]  # fmt: skip
    assert all(s["summary"]["completed"] == 24 and "uncertainty" in s for s in written)
    assert len(lines) == 4 and "(requested " in lines[2] and lines[0].startswith("stage raw sweep-sync: ") and "24 done" in lines[0]


def test_the_closed_part_of_the_notebook_runs_no_sweep_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(f"paths: {{runs_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}\n")
    study_run = api.open_study(PARAMS / "ci.yaml", overrides=SWEEP_SETS)
    stages = latency.run_layer_sweep(study_run.study, study_run.platform, Endpoint("raw", "http://127.0.0.1:9/v1", "m"),
                                     study_run.run_dir, modes=("closed",))  # fmt: skip
    assert stages == []


def test_bench_sweep_writes_one_result_per_stage_with_vllm_names(saturating, steady_client, tmp_path, capsys):
    study = load_study(PARAMS / "ci.yaml")
    from servinglab.platforms import get_platform

    model_dir = get_platform(study).model_dir()[0]
    out = tmp_path / "sweep.json"
    code = main(["bench", "--base-url", saturating, "--model", "m", "--tokenizer", str(model_dir), "--input-len", "16",
                 "--output-len", "12", "--num-prompts", "24", "--seed", "1", "--ignore-eos", "--sweep", "1",
                 "--workers", "1", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads(out.read_text())
    assert [r["stage"] for r in results] == ["sweep-sync", "sweep-throughput", "sweep-rate-1-of-1"]
    assert [r["sweep"]["part"] for r in results] == ["synchronous", "throughput", "rate"]
    for r in results:  # vllm bench serve's own keys, in every stage's result
        assert {"completed", "request_throughput", "median_ttft_ms", "p99_tpot_ms", "max_concurrency",
                "request_rate"} <= r.keys()  # fmt: skip
    assert (results[0]["max_concurrency"], results[1]["max_concurrency"]) == (1, 24)
    assert results[2]["request_rate"] == pytest.approx(results[1]["request_throughput"], rel=1e-5)
    said = [line for line in printed.splitlines() if line.startswith("sweep-")]
    assert [line.split(":")[0] for line in said] == ["sweep-sync", "sweep-throughput", "sweep-rate-1-of-1"]
    assert printed.rstrip().endswith(str(out))


@pytest.mark.parametrize("extra, named", [(["--request-rate", "5"], "--request-rate"),
                                          (["--max-concurrency", "4"], "--max-concurrency")])  # fmt: skip
def test_bench_sweep_with_a_rate_or_concurrency_is_a_usage_error(tmp_path, capsys, extra, named):
    code = main(["bench", "--base-url", "http://127.0.0.1:9", "--model", "m", "--input-len", "4", "--output-len", "4",
                 "--num-prompts", "4", "--seed", "0", "--sweep", "3", "--out", str(tmp_path / "o.json"), *extra])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"servinglab: --sweep with {named}: the sweep sets each stage's rate and concurrency; give one or the other"]
    assert not (tmp_path / "o.json").exists()


def test_bench_sweep_needs_a_count(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--base-url", "http://x", "--model", "m", "--input-len", "4", "--output-len", "4",
              "--num-prompts", "4", "--seed", "0", "--sweep", "0", "--out", "o.json"])  # fmt: skip
    assert exited.value.code == 2 and "--sweep: '0': a number of rate stages, 1 to 100" in capsys.readouterr().err


# --- the report -------------------------------------------------------------------------------------------


def sweep_stage(part: dict, name: str, ttft_p50: float, output_throughput: float, rate: float | None = None):
    """A synthetic stage of a saturation sweep, with a throughput interval from two repeats."""
    stage, rows = closed_stage("raw", 1, ttft_p50, output_throughput, tokens=128, gap_ms=2.0, requests=40)
    rows = [r | {"stage": name, "stage_id": f"raw-{name}"} for r in rows]
    throughput = stage["summary"]["request_throughput"]
    stage |= {"stage": name, "stage_id": f"raw-{name}", "mode": "sweep", "sweep": part, "request_rate": rate,
              "max_concurrency": 1 if part["part"] == "synchronous" else None,
              "uncertainty": stage_intervals([rows[:20], rows[20:]], 42, [0.9 * throughput, 1.1 * throughput])}  # fmt: skip
    return stage, rows


def test_the_highest_load_within_the_slos_comes_from_the_sweep(tmp_path):
    run = make_run(tmp_path, "complete")  # closed stages c=1, 4, 16; c=4 is the highest within TTFT p95 ≤ 2000 ms
    between = {"between_req_s": [8.6, 26.5], "between_stages": ["sweep-sync", "sweep-throughput"]}
    made = [
        sweep_stage({"part": "synchronous"}, "sweep-sync", 9.0, 1100.0),
        sweep_stage({"part": "throughput"}, "sweep-throughput", 1600.0, 3400.0),  # its p95 (2320 ms) misses
        sweep_stage({"part": "rate", "index": 1, "count": 2} | between, "sweep-rate-1-of-2", 20.0, 2500.0, 17.6),
        sweep_stage({"part": "rate", "index": 2, "count": 2} | between, "sweep-rate-2-of-2", 1500.0, 3300.0, 26.5),
    ]
    for stage, rows in made:
        records.append(run, records.LATENCY_REQUESTS, rows, provenance="synthetic")
        records.append(run, records.LATENCY_STAGES, [stage], provenance="synthetic")
    _, cells = cells_of(run)
    best = made[2][0]
    low, high = best["uncertainty"]["intervals"]["request_throughput"]
    assert cells["goodput"]["raw"].text.startswith(
        f"the saturation sweep's rate 1 of 2 (17.6 req/s requested): {best['summary']['request_throughput']:.2f} "
        f"[{low:.2f}–{high:.2f}] req/s")  # fmt: skip
    assert "TTFT p95 ≤ 2000 ms" in cells["goodput"]["raw"].text
    # The percentile rows keep the closed-loop stages; the sweep's are not mixed into them.
    assert cells["ttft"]["raw"].text.startswith("c=1: 9.0 / 13.0 ms; c=4:")
    data = load_run(run)
    table = decision_table(data)
    [raw] = [a for a in advice.derive_advice(data, table) if a.layer == "raw"]
    assert any(r.startswith("up to the saturation sweep's rate 1 of 2") for r in raw.reasons)
    [load] = [r for r in advice.derive_recommendations(data, table) if r.evidence == "#row-goodput"]
    assert "at the saturation sweep's rate 1 of 2" in load.reading
    # The run context names the sweep beside the closed loop, its rates as recorded.
    assert load_pattern(data).startswith("closed loop at concurrency 1, 4, 16; a saturation sweep (a synchronous and "
                                         "a throughput probe, then 2 Poisson rates from 17.6 to 26.5 req/s)")  # fmt: skip


def test_runs_compared_list_a_sweep_s_stages_in_their_order():
    from servinglab.report.compare import _stage_order

    def stage(name, part, index=None):
        return {"stage": name, "mode": "sweep", "sweep": {"part": part} | ({"index": index} if index else {})}

    names = ["sweep-rate-10-of-10", "sweep-throughput", "sweep-rate-2-of-10", "sweep-sync", "sweep-rate-1-of-10"]
    parts = {"sweep-sync": ("synchronous",), "sweep-throughput": ("throughput",)}
    stages = [stage(n, *parts[n]) if n in parts else stage(n, "rate", int(n.split("-")[2])) for n in names]
    assert [s["stage"] for s in sorted(stages, key=_stage_order)] == [
        "sweep-sync", "sweep-throughput", "sweep-rate-1-of-10", "sweep-rate-2-of-10", "sweep-rate-10-of-10"]
