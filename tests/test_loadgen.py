"""The load generator: stream parsing against a misbehaving endpoint, loss-free stages, and real vLLM."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from conftest import PARAMS, run_cli
from streaming_endpoint import StreamingEndpoint

from servinglab.measure.loadgen import StageSpec, Target, run_stage, run_stage_async
from servinglab.measure.client_metrics import summarize
from servinglab.measure.schedule import arrival_offsets_s
from servinglab.measure.workload import RequestSpec


@pytest.fixture(scope="module")
def endpoint():
    with StreamingEndpoint() as running:
        yield running


def specs(*modes, n=8):
    return [RequestSpec(f"{mode} request", 2, n) for mode in modes]


def test_records_every_kind_of_outcome(endpoint):
    records = []
    outcome = run_stage(Target(f"{endpoint.url}/v1", "m"), specs("ok", "fail", "cut", "roleonly", "ok"),
                        StageSpec(max_concurrency=2), records.append)  # fmt: skip
    by_prompt = {r["index"]: r for r in records}
    assert outcome.completed == 3 and outcome.failed == 2 and outcome.sent == 5
    assert by_prompt[0]["ok"] and by_prompt[0]["output_tokens"] == 8 and len(by_prompt[0]["token_ms"]) == 8
    assert by_prompt[1]["error_kind"] == "http_500" and by_prompt[1]["status"] == 500
    assert by_prompt[2]["error_kind"] in ("disconnect", "connection_error") and not by_prompt[2]["ok"]
    # The role-only chunk came 20 ms before the first token: TTFT is the token's, not the role's.
    assert by_prompt[3]["ok"] and by_prompt[3]["ttft_ms"] >= 15 and by_prompt[3]["chunks"] == 10
    summary = summarize(records, outcome.duration_s)
    assert summary["completed"] == 3 and summary["failed"] == 2
    assert set(summary["errors"]) <= {"http_500", "disconnect", "connection_error"} and sum(summary["errors"].values()) == 2


def test_without_continuous_usage_the_first_non_role_delta_counts(endpoint):
    records = []
    target = Target(f"{endpoint.url}/v1", "m", continuous_usage=False)
    run_stage(target, specs("roleonly", "ok"), StageSpec(), records.append)
    for r in records:
        assert r["ok"] and r["client_tokens"] == 8 == r["output_tokens"] and len(r["token_ms"]) == 8
    roleonly = next(r for r in records if r["index"] == 0)
    assert roleonly["ttft_ms"] >= 15


def test_an_interrupted_stage_keeps_what_it_measured(endpoint, tmp_path):
    """Stop a stage when its short request ended: that one is on disk, the long ones in flight are marked."""
    path = tmp_path / "requests.jsonl"
    stop = threading.Event()

    def sink(record):
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if record.get("ok"):
            stop.set()

    requests = specs("slow", n=2) + specs("slow", "slow", n=40) + specs(*["slow"] * 9, n=40)
    outcome = asyncio.run(
        run_stage_async(Target(f"{endpoint.url}/v1", "m"), requests, StageSpec(max_concurrency=3), sink, stop=stop)
    )
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert outcome.interrupted
    assert [r["index"] for r in on_disk if r.get("ok")] == [0]
    cancelled = {r["index"] for r in on_disk if r.get("error_kind") == "cancelled"}
    # 1 and 2 were streaming; 3 may have taken the freed slot just before the stop.
    assert {1, 2} <= cancelled <= {1, 2, 3}
    assert len(on_disk) == 1 + len(cancelled)  # the rest were never sent


def test_runs_inside_a_running_event_loop(endpoint):
    """A Jupyter cell calls run_stage while the kernel's loop runs: it must not fail like asyncio.run."""
    records = []

    async def cell():
        return run_stage(Target(f"{endpoint.url}/v1", "m"), specs("ok", "ok"), StageSpec(), records.append)

    outcome = asyncio.run(cell())
    assert outcome.completed == 2 and len(records) == 2


def test_open_loop_keeps_its_schedule(endpoint):
    records = []
    outcome = run_stage(Target(f"{endpoint.url}/v1", "m"), specs(*["ok"] * 40, n=4),
                        StageSpec(request_rate=100.0, seed=3), records.append)  # fmt: skip
    summary = summarize(records, outcome.duration_s, requested_rate=100.0, send_window_s=outcome.send_window_s,
                        schedule_lag_ms=outcome.schedule_lag_ms)  # fmt: skip
    assert summary["completed"] == 40
    assert summary["achieved_rate"] == pytest.approx(100.0, rel=0.5)
    expected = arrival_offsets_s(40, 100.0, 1.0, seed=3)
    assert [r["scheduled_s"] for r in sorted(records, key=lambda r: r["index"])] == pytest.approx(list(expected))
    assert summary["p99_schedule_lag_ms"] is not None and all(r["sent_s"] >= r["scheduled_s"] for r in records)


@pytest.mark.engine
def test_bench_cli_against_real_vllm(engine, tmp_path):
    out, recs = tmp_path / "result.json", tmp_path / "records.jsonl"
    model_dir = str(engine.platform.model_dir()[0])
    done = run_cli(
        "bench", "--base-url", engine.deployment.base_url, "--model", "tiny", "--tokenizer", model_dir,
        "--input-len", "32", "--output-len", "8", "--num-prompts", "6", "--max-concurrency", "2",
        "--ignore-eos", "--seed", "1", "--num-warmups", "1", "--goodput", "ttft:60000",
        "--out", str(out), "--records", str(recs), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("completed", "failed", "duration", "request_throughput", "output_throughput", "mean_ttft_ms",
                "median_ttft_ms", "std_ttft_ms", "p90_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "p99.9_ttft_ms",
                "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "request_goodput"):  # fmt: skip
        assert key in result, key
    assert result["completed"] == 6 and result["failed"] == 0 and result["total_output_tokens"] == 48
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    records = [json.loads(line) for line in recs.read_text().splitlines()]
    assert len(records) == 7 and sum(r["warmup"] for r in records) == 1
    template = {r["prompt_tokens"] - r["expected_prompt_tokens"] for r in records}
    assert len(template) == 1  # exact prompt lengths: only the chat template's tokens are added
    assert result["server"]["available"] and result["server"]["ttft_count"] >= 6
    # Without --tokenizer, prompt lengths come from the server's /tokenize.
    again = run_cli("bench", "--base-url", engine.deployment.base_url, "--model", "tiny", "--input-len", "16",
                    "--output-len", "4", "--num-prompts", "2", "--seed", "2", "--ignore-eos", "--out", str(out), timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["completed"] == 2


@pytest.mark.engine
def test_import_vllm_bench_result(engine, tmp_path):
    from servinglab import records

    result = {"date": "20261127-000000", "backend": "openai-chat", "model_id": "tiny", "num_prompts": 10,
              "request_rate": "inf", "max_concurrency": 4, "completed": 10, "failed": 0, "duration": 1.5,
              "request_throughput": 6.7, "output_throughput": 850.0, "mean_ttft_ms": 20.0, "median_ttft_ms": 19.0,
              "p95_ttft_ms": 30.0, "median_tpot_ms": 2.0, "p95_tpot_ms": 3.0, "median_e2el_ms": 280.0, "p95_e2el_ms": 300.0}  # fmt: skip
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(result))
    done = run_cli("import", "vllm-bench", str(path), "--run-dir", str(engine.run_dir), "--layer", "raw", timeout=120)
    assert done.returncode == 0, done.stderr
    stages = records.read(engine.run_dir, records.LATENCY_STAGES).rows
    imported = stages[-1]
    assert imported["source"] == "vllm bench serve" and imported["stage"] == "c=4" and imported["mode"] == "closed"
    assert imported["summary"]["median_ttft_ms"] == 19.0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    refused = run_cli("import", "vllm-bench", str(bad), "--run-dir", str(engine.run_dir), timeout=120)
    assert refused.returncode == 2 and "not a vllm bench serve result" in refused.stderr


def test_bench_with_a_prompts_file(endpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok first"}\n{"prompt": "ok second", "max_tokens": 3}\n')
    out = tmp_path / "r.json"
    from servinglab import modelbuild

    tokenizer = modelbuild.ensure_model(tmp_path / "cache", "tiny", 0)
    done = run_cli("bench", "--base-url", endpoint.url, "--model", "m", "--tokenizer", str(tokenizer),
                   "--prompts-file", str(prompts), "--input-len", "1", "--output-len", "5", "--num-prompts", "5",
                   "--seed", "0", "--out", str(out), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["completed"] == 5 and result["total_output_tokens"] == 5 + 3 + 5 + 3 + 5  # cycled, own max_tokens


def test_gpu_telemetry_from_prometheus(endpoint):
    from servinglab.measure.server_metrics import prometheus_window

    window = prometheus_window(endpoint.url, {"util": "avg(DCGM_FI_DEV_GPU_UTIL)"}, 1000.0, 1060.0)
    n = len("avg(DCGM_FI_DEV_GPU_UTIL)")
    assert window == {"mean_util": 1.5 * n, "max_util": 2.0 * n}
    broken = prometheus_window(endpoint.url + "/nothing", {"util": "up"}, 1000.0, 1060.0)
    assert "util_error" in broken


@pytest.mark.parametrize("policy, expected", [("stop", 1), ("continue", 2)])
def test_a_stage_whose_server_died_ends_the_sweep_or_not(endpoint, tmp_path, monkeypatch, policy, expected):
    """After a stage the server's /health fails: the stage says so, and the sweep follows the study."""
    from servinglab import api, records
    from servinglab.experiments import latency
    from servinglab.platforms import Endpoint

    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(f"paths: {{runs_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}\n")
    study_run = api.open_study(PARAMS / "ci.yaml", overrides=[f"workloads.latency.on_server_death={policy}",
                                                             "workloads.latency.sweep.rates=[]"])  # fmt: skip
    endpoint.healthy = False
    try:
        stages = latency.run_layer_sweep(study_run.study, study_run.platform, Endpoint("raw", f"{endpoint.url}/v1", "m"),
                                         study_run.run_dir)  # fmt: skip
    finally:
        endpoint.healthy = True
    assert len(stages) == expected and all(s["server_alive_after"] is False for s in stages)
    assert [s["stage"] for s in records.read(study_run.run_dir, records.LATENCY_STAGES).rows] == ["c=1", "c=4"][:expected]
