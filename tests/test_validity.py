"""Whether a stage's numbers can be trusted: its validity verdict, its intervals, several client processes
merged into one stage, the sweep's stopping rule, and server histograms read honestly."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from conftest import PARAMS
from streaming_endpoint import StreamingEndpoint

from servinglab.measure import intervals
from servinglab.measure.client import run_local, workers_for
from servinglab.measure.client_metrics import (BURST_WARN_SHARE, CLIENT_LAG_WARN_MS, MIN_SAMPLES_P95, MIN_SAMPLES_P99,
                                               summarize, validity)  # fmt: skip
from servinglab.measure.loadgen import StageSpec, Target
from servinglab.measure.server_metrics import figure_text, histogram_quantile, summarize_delta
from servinglab.measure.stage import StagePlan
from servinglab.measure.workload import RequestSpec


def streamed(i: int, ttft: float = 10.0, gap: float = 2.0, tokens: int = 16, chunk: int = 1) -> dict:
    """A finished request whose ``tokens`` tokens came ``chunk`` to a chunk, ``gap`` ms apart per chunk."""
    times = [ttft + k * gap for k in range(tokens // chunk)]
    return {"index": i, "ok": True, "warmup": False, "ttft_ms": ttft, "e2el_ms": times[-1], "token_ms": times,
            "chunk_tokens": [chunk] * len(times), "output_tokens": tokens, "client_tokens": tokens, "sent_s": i * 0.1}


def verdict_of(rows: list[dict], lag_ms: float = 1.0) -> dict:
    return validity(summarize(rows, 10.0, loop_lag_ms=[lag_ms] * 50))


# --- the verdicts -------------------------------------------------------------------------------------


def test_the_limits_are_today_s():
    """The checks stay where they were: 5 ms of loop lag, 5 % of streams in one burst, 20 / 100 requests."""
    assert (CLIENT_LAG_WARN_MS, BURST_WARN_SHARE, MIN_SAMPLES_P95, MIN_SAMPLES_P99) == (5.0, 0.05, 20, 100)


def test_a_healthy_stage_is_valid():
    found = verdict_of([streamed(i) for i in range(120)])
    assert found == {"verdict": "valid", "reasons": [], "annotations": []}


def test_client_limited_by_its_loop_lag():
    found = verdict_of([streamed(i) for i in range(120)], lag_ms=7.5)
    assert found["verdict"] == "client-limited"
    [reason] = found["reasons"]
    assert (reason["value"], reason["limit"], reason["unit"]) == (7.5, 5.0, "ms")


def test_server_burst_when_streams_arrive_at_the_end():
    rows = [streamed(i) for i in range(100)]
    for i in range(5):  # 5 % of the streams: their first token after half of their time
        rows[i] = streamed(i, ttft=200.0, gap=0.5)
    found = verdict_of(rows)
    assert found["verdict"] == "server-burst" and found["reasons"][0]["value"] == 5
    rows[0] = streamed(0)  # 4 %: under the share
    assert verdict_of(rows)["verdict"] == "valid"


def test_too_few_samples_for_a_p95_and_a_note_for_a_p99():
    assert verdict_of([streamed(i) for i in range(19)])["verdict"] == "too-few-samples"
    found = verdict_of([streamed(i) for i in range(20)])
    assert found["verdict"] == "valid" and [n["note"] for n in found["annotations"]] == ["p99-few-samples"]


def test_the_first_verdict_that_applies_wins_and_every_reason_is_kept():
    rows = [streamed(i, ttft=200.0, gap=0.5) for i in range(10)]
    found = verdict_of(rows, lag_ms=30.0)
    assert found["verdict"] == "client-limited"
    assert [r["verdict"] for r in found["reasons"]] == ["client-limited", "server-burst", "too-few-samples"]


def test_token_packing_is_an_annotation_with_tokens_per_chunk():
    rows = [streamed(i, gap=6.0, chunk=4) for i in range(120)]  # 4 tokens a chunk, a chunk each 6 ms
    summary = summarize(rows, 10.0, loop_lag_ms=[1.0])
    assert summary["mean_tokens_per_chunk"] == 4.0 and summary["p99_tokens_per_chunk"] == 4.0
    found = validity(summary)
    assert found["verdict"] == "valid"
    [note] = found["annotations"]
    assert note["note"] == "token-packing" and note["value"] > 1.5 and "4.00 tokens a chunk" in note["text"]


def test_an_old_stage_gets_its_verdict_from_its_numbers_not_its_words():
    """A stage recorded before verdicts existed: only p99_loop_lag_ms, burst_deliveries and completed count."""
    old = {"completed": 60, "p99_loop_lag_ms": 243.0, "burst_deliveries": 42, "mean_itl_ms": 0.0,
           "mean_tpot_ms": 0.0, "warnings": ["nothing that says client or burst"]}  # fmt: skip
    assert validity(old)["verdict"] == "client-limited"
    assert validity(old | {"p99_loop_lag_ms": 1.0})["verdict"] == "server-burst"
    words_only = {"completed": 60, "warnings": ["the client was the bottleneck: its event loop woke 900 ms late"]}
    assert validity(words_only)["verdict"] == "valid"


# --- the bootstrap ------------------------------------------------------------------------------------


def records_with(ttfts: list[float]) -> list[dict]:
    return [{"ok": True, "ttft_ms": t, "e2el_ms": t + 100.0, "token_ms": [t, t + 100.0], "output_tokens": 2}
            for t in ttfts]  # fmt: skip


def test_the_interval_of_a_median_covers_the_truth_at_its_rate():
    """Samples of a known distribution: the 95 % interval of the median holds the true median (10) in
    about 95 of 100 independent samples."""
    rng = np.random.default_rng(1)
    held = 0
    for trial in range(100):
        sample = records_with(list(rng.exponential(10 / math.log(2), 200)))  # median exactly 10
        found = intervals.stage_intervals([sample], seed=trial, resamples=400)["intervals"]["median_ttft_ms"]
        held += found[0] <= 10.0 <= found[1]
    assert 88 <= held <= 100


def test_the_interval_is_seeded_and_recorded():
    sample = [records_with([float(v) for v in range(1, 101)])]
    first = intervals.stage_intervals(sample, seed=7, throughputs=[5.0], closed_loop=True)
    assert first == intervals.stage_intervals(sample, seed=7, throughputs=[5.0], closed_loop=True)
    assert (first["seed"], first["resamples"], first["level"], first["repeats"]) == (7, 2000, 0.95, 1)
    low, high = first["intervals"]["median_ttft_ms"]
    assert 40 <= low < 50.5 <= high <= 61  # the median of 1..100 is 50.5
    assert first["throughput_basis"] == "latency"
    t_low, t_high = first["intervals"]["request_throughput"]
    assert t_low < 5.0 < t_high


def test_repeats_are_resampled_first():
    """Two repeats that disagree: the interval spans both; one repeat alone gives a narrow one."""
    a, b = records_with([10.0 + 0.01 * i for i in range(100)]), records_with([20.0 + 0.01 * i for i in range(100)])
    both = intervals.stage_intervals([a, b], seed=3, throughputs=[4.0, 6.0])["intervals"]
    assert both["median_ttft_ms"][0] < 11 and both["median_ttft_ms"][1] > 20
    assert both["request_throughput"] == [4.0, 6.0]
    alone = intervals.stage_intervals([a], seed=3)["intervals"]["median_ttft_ms"]
    assert alone[1] - alone[0] < 1


def test_a_difference_beyond_the_noise_and_one_within_it():
    rng = random.Random(5)
    base = [records_with([rng.gauss(50, 5) for _ in range(150)])]
    slower = [records_with([rng.gauss(56, 5) for _ in range(150)])]
    same = [records_with([rng.gauss(50, 5) for _ in range(150)])]
    found = intervals.difference(base, slower, "ttft")
    assert found["exceeds_noise"] and 3 < found["difference"] < 9 and found["interval"][0] > 0
    assert not intervals.difference(base, same, "ttft")["exceeds_noise"]
    assert intervals.difference(base, slower, "ttft", seed=1) == intervals.difference(base, slower, "ttft", seed=1)
    assert intervals.difference(base, [[]], "ttft") is None


def test_overlap():
    assert intervals.overlap([1, 2], [2, 3]) and not intervals.overlap([1, 2], [2.1, 3])
    assert intervals.overlap(None, [1, 2]) is None


# --- server histograms --------------------------------------------------------------------------------


def test_a_percentile_in_a_coarse_bucket_is_its_bound():
    # 100 observations: 10 ≤ 0.01 s, 90 in (0.01, 0.3]: the p50 lies in a bucket 97 % of its bound wide.
    buckets = {0.01: 10.0, 0.3: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == ("le", 0.3)
    narrow = {0.095: 40.0, 0.1: 60.0, math.inf: 60.0}  # (0.095, 0.1]: 5 % of its bound
    how, value = histogram_quantile(0.9, narrow)
    assert how == "value" and 0.095 < value <= 0.1
    assert histogram_quantile(0.99, {0.1: 10.0, math.inf: 20.0}) == ("gt", 0.1)


def test_the_stage_record_keeps_the_mean_exact_and_the_bound_as_a_bound():
    raw = {"vllm:request_queue_time_seconds": {"count": 100.0, "sum": 0.002,
                                               "buckets": {0.3: 100.0, math.inf: 100.0}}}  # fmt: skip
    out = summarize_delta(raw)
    assert out["mean_queue_ms"] == pytest.approx(0.02)
    assert out["p50_queue_ms_le"] == pytest.approx(300.0) and "p50_queue_ms" not in out
    assert figure_text(out, "p50_queue_ms") == "≤ 300" and figure_text(out, "mean_queue_ms") == "0.0"
    assert figure_text({"p99_ttft_ms_gt": 10000.0}, "p99_ttft_ms") == "> 10000" and figure_text({}, "x") == "–"


# --- several client processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint():
    with StreamingEndpoint() as running:
        yield running


def plan(n: int, rate: float = math.inf, concurrency: int | None = 6, warmups: int = 3) -> StagePlan:
    requests = [RequestSpec(f"ok request {i}", 3, 8) for i in range(n)]
    spec = StageSpec(request_rate=rate, max_concurrency=concurrency, seed=11)
    return StagePlan.make("s", requests, [RequestSpec("ok warm", 3, 4) for _ in range(warmups)], spec)


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_merge_every_record_once(endpoint, workers):
    target = Target(f"{endpoint.url}/v1", "m", None, 30.0, True)
    got: list[dict] = []
    merged = run_local(target, plan(60), got.append, workers=workers)
    measured = [r for r in got if not r.get("warmup")]
    assert len(measured) == 60 and sorted(r["index"] for r in measured) == list(range(60))
    assert sorted(r["index"] for r in got if r.get("warmup")) == [0, 1, 2]
    assert merged.summary["completed"] == 60 and merged.summary["failed"] == 0
    assert len(merged.records) == len(got) == 63
    if workers > 1:
        assert {r["client_worker"] for r in measured} == {0, 1, 2}


def test_open_loop_workers_send_exactly_the_planned_arrivals(endpoint):
    target = Target(f"{endpoint.url}/v1", "m", None, 30.0, True)
    planned = plan(40, rate=80.0, concurrency=None, warmups=0)
    got: list[dict] = []
    run_local(target, planned, got.append, workers=2)
    by_index = sorted(got, key=lambda r: r["index"])
    assert [r["scheduled_s"] for r in by_index] == pytest.approx(list(planned.offsets_s))
    assert {r["client_worker"] for r in got} == {0, 1}


def test_the_worker_rule():
    closed = StageSpec(request_rate=math.inf, max_concurrency=128)
    rule = workers_for("auto", StageSpec(request_rate=math.inf, max_concurrency=64), cores=16)
    assert rule.workers == 8 and "one per 8 of 64 concurrent streams" in rule.text
    capped = workers_for("auto", closed, cores=16, engine_processes=3)
    assert capped.workers == 13 and "at most 13 (16 cores less 3 engine processes)" in capped.text
    assert workers_for("auto", closed, cores=4, engine_processes=3).workers == 1
    assert workers_for("auto", StageSpec(request_rate=math.inf, max_concurrency=8), cores=16).workers == 1
    open_loop = StageSpec(request_rate=40.0, max_concurrency=None)
    assert workers_for("auto", open_loop, cores=16, expected_e2e_s=1.0).workers == 5
    assert workers_for(3, closed, cores=2).workers == 3


# --- the stopping rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("past, expected", [(False, ["c=1"]), (True, ["c=1", "c=4"])])
def test_the_sweep_stops_after_a_stage_that_is_not_valid(endpoint, tmp_path, monkeypatch, past, expected):
    """Five requests a stage are too few for a p95: the sweep stops there unless the study says to go on."""
    from servinglab import api, records
    from servinglab.experiments import latency
    from servinglab.platforms import Endpoint

    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(f"paths: {{runs_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}\n")
    study_run = api.open_study(PARAMS / "ci.yaml", overrides=[
        f"workloads.latency.past_validity={str(past).lower()}", "workloads.latency.sweep.rates=[]",
        "workloads.latency.min_prompts=5", "workloads.latency.prompts_per_concurrency=1"])  # fmt: skip
    lines: list[str] = []
    stages = latency.run_layer_sweep(study_run.study, study_run.platform, Endpoint("raw", f"{endpoint.url}/v1", "m"),
                                     study_run.run_dir, say=lines.append)  # fmt: skip
    assert [s["stage"] for s in stages] == expected
    # (A loopback server answers so fast that its streams may also read as one burst: any verdict but valid.)
    assert all(s["validity"]["verdict"] != "valid" for s in stages)
    assert all("too-few-samples" in [r["verdict"] for r in s["validity"]["reasons"]] for s in stages)
    written = records.read(study_run.run_dir, records.LATENCY_STAGES).rows
    assert [s.get("stopped_sweep", False) for s in written] == ([True] if not past else [False, False])
    assert ("the sweep stops here" in lines[-1]) is (not past)
    # Every request record names the measurement of its stage.
    requests = records.read(study_run.run_dir, records.LATENCY_REQUESTS).rows
    assert {r["stage_id"] for r in requests} == {s["stage_id"] for s in written}
