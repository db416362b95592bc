"""The load generator as an indexed Job: slicing, rendering, merging, and the whole Job path on the emulator.

The Job path runs against the Kubernetes API emulator with a test-side Job controller
(tests/kube_jobs.py) that runs each pod's worker in a thread against a local streaming endpoint standing
for the layer's Service. Waits are bounded by the driver's own deadlines and pytest's timeout.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from kube_emulator import EmulatedCluster
from kube_jobs import JobController
from streaming_endpoint import StreamingEndpoint

from servinglab import cli, records
from servinglab.experiments import latency
from servinglab.experiments.clusterload import (
    OUTCOME_PREFIX,
    RECORD_PREFIX,
    LoadJobError,
    build_job_plan,
    in_cluster_target,
    render_load_job,
    client_description,
    run_in_cluster,
)
from servinglab.measure.server_metrics import ServerWindow
from servinglab.measure.stage import SliceResult, StagePlan, merge_slices, slice_stage, split_concurrency
from servinglab.config import load_study
from servinglab.errors import ParamsError
from servinglab.layers.render import to_yaml
from servinglab.layers.validate import validate_objects
from servinglab.measure.loadgen import StageSpec, Target
from servinglab.measure.client_metrics import summarize
from servinglab.platforms import Endpoint
from servinglab.platforms.base import MetricsTarget
from servinglab.platforms.kube import Kube, load_api_client
from servinglab.platforms.kubernetes import KubernetesPlatform
from servinglab.measure.schedule import arrival_offsets_s
from servinglab.measure.workload import RequestSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
GOLDEN = Path(__file__).parent / "golden" / "layers"
NS = "servinglab"
IMAGE = "registry.example/servinglab-loadgen:0.1.0"
PLANTED_KEY = "sk-planted-never-in-a-configmap"


@pytest.fixture(autouse=True)
def _no_override_file(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)


def study(*overrides: str):
    # The example's llm-d layer serves its own certificate: the study says by name that the pods skip its check.
    return load_study(EXAMPLE, ["workloads.latency.client=in-cluster", f"workloads.latency.in_cluster.image={IMAGE}",
                                "workloads.latency.in_cluster.insecure_skip_tls_verify=true", *overrides])  # fmt: skip


def specs(count: int, prefix: str = "ok") -> list[RequestSpec]:
    return [RequestSpec(f"{prefix} request {i}", 3, 4) for i in range(count)]


def job_plan(name: str, target: Target, requests: list[RequestSpec], warmups: list[RequestSpec], stage: StageSpec,
             pods: int, start: float) -> dict:  # fmt: skip
    """A Job's plan for layer raw, planned as the sweep plans a stage."""
    return build_job_plan("raw", StagePlan.make(name, requests, warmups, stage), target, pods, start)


# --------------------------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("pods", [1, 2, 3, 5])
@pytest.mark.parametrize("rate,concurrency", [(math.inf, 4), (math.inf, 7), (math.inf, 2), (3.0, None), (3.0, 3)])
def test_every_request_once_on_the_single_client_schedule(pods, rate, concurrency):
    count = 41
    stage = StageSpec(request_rate=rate, burstiness=0.7, max_concurrency=concurrency, seed=11)
    plan = job_plan("s", Target("http://svc/v1", "m"), specs(count), specs(3, "warm"), stage, pods, 1e9)
    single = arrival_offsets_s(count, rate, 0.7, 11)  # what one client would send
    sent = sorted((k, at) for piece in plan["slices"] for k, at in zip(piece["requests"], piece["offsets_s"]))
    assert [k for k, _ in sent] == list(range(count))  # every request exactly once
    assert np.array_equal([at for _, at in sent], single)  # at the single client's offsets, to the bit
    assert sorted(k for piece in plan["slices"] for k in piece["warmups"]) == [0, 1, 2]
    assert plan["plan"]["requests"] == [{"prompt": s.prompt, "prompt_len": 3, "max_tokens": 4} for s in specs(count)]
    caps = [piece["max_concurrency"] for piece in plan["slices"]]
    if concurrency is None:
        assert caps == [None] * pods
    else:
        assert sum(caps) == concurrency and max(caps) - min(caps) <= 1
        assert all(not piece["requests"] and not piece["warmups"] for piece in plan["slices"] if piece["max_concurrency"] == 0)
    if math.isinf(rate) and concurrency:
        # Closed loop: a pod's share of the requests follows its share of the concurrency.
        for piece in plan["slices"]:
            assert abs(len(piece["requests"]) - count * piece["max_concurrency"] / concurrency) <= concurrency
    active = [p for p in plan["slices"] if p["max_concurrency"] != 0]
    if not math.isinf(rate) or (concurrency % pods == 0):
        # Open loop, or a concurrency the pods share equally: pod i sends requests i, i+N, ...
        assert [p["requests"] for p in active] == [list(range(count))[i :: len(active)] for i in range(len(active))]


def test_concurrency_split_and_idle_pods():
    assert split_concurrency(7, 3) == [3, 2, 2]
    assert split_concurrency(2, 4) == [1, 1, 0, 0]
    assert split_concurrency(None, 2) == [None, None]
    slices = slice_stage(np.zeros(10), 4, 2, math.inf)
    assert [s.requests for s in slices] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9], [], []]
    with pytest.raises(ParamsError):
        slice_stage(np.zeros(3), 0, None, math.inf)


# ------------------------------------------------------------------------------------------- rendering


def plan_for(s, pods: int = 3) -> dict:
    platform = KubernetesPlatform(s)
    target = in_cluster_target(s, platform, "raw")
    stage = StageSpec(request_rate=2.0, burstiness=1.0, max_concurrency=4, seed=42, duration_s=None)
    return job_plan("rate=2", target, specs(5), specs(1, "warm"), stage, pods, 1767225600.0)


def test_golden_and_schema_valid():
    """The Job and its ConfigMap as reviewed (SERVINGLAB_UPDATE_GOLDEN=1 rewrites the golden)."""
    s = study("workloads.latency.in_cluster.pods=3")
    objects = render_load_job(s, "raw", plan_for(s), run_id="20260101T000000Z")
    validate_objects(objects, s.platform.kubernetes_version)
    text = to_yaml(objects)
    golden = GOLDEN / "loadgen-job.yaml"
    if os.environ.get("SERVINGLAB_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    config_map, job = objects
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 3600
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "loadgen"
    assert "run-id" not in json.dumps(job["spec"])  # the run id is an annotation only
    plan = json.loads(config_map["data"]["plan.json"])
    assert plan["target"]["base_url"] == "http://qwen-cluster-raw.servinglab.svc.cluster.local:8000/v1"


def test_no_key_in_the_configmap_and_the_key_from_the_secret(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", PLANTED_KEY)
    s = study("auth.api_key_env=VLLM_API_KEY", "platform.api_key_secret=vllm-key")
    assert s.api_key() == PLANTED_KEY
    plan = plan_for(s)
    keyed = job_plan("c=1", Target("http://svc/v1", "m", api_key=PLANTED_KEY), specs(2), [],
                           StageSpec(max_concurrency=1), 2, 1e9)  # fmt: skip
    config_map, job = render_load_job(s, "raw", keyed)
    assert PLANTED_KEY not in json.dumps(plan) and PLANTED_KEY not in yaml.safe_dump([config_map, job])
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "api-key"}}} in env
    llmd = in_cluster_target(s, KubernetesPlatform(s), "llm-d")
    assert llmd.base_url.startswith("https://") and llmd.verify_tls is False  # the workload's own certificate


def test_a_plan_too_large_for_a_configmap_is_refused():
    s = study()
    big = job_plan("c=1", Target("http://svc/v1", "m"), [RequestSpec("x" * 2000, 1, 1)] * 600, [],
                         StageSpec(max_concurrency=1), 2, 1e9)  # fmt: skip
    with pytest.raises(ParamsError, match=r"workloads.latency: stage c=1 of layer raw: its plan .* larger than a ConfigMap"):
        render_load_job(s, "raw", big)


# --------------------------------------------------------------------------------------------- merging


def record(index: int, ttft_ms: float, sent_s: float = 0.0, tokens: int = 4, gap_ms: float = 5.0) -> dict:
    token_ms = [ttft_ms + gap_ms * i for i in range(tokens)]
    return {"index": index, "warmup": False, "ok": True, "ttft_ms": ttft_ms, "e2el_ms": token_ms[-1],
            "token_ms": token_ms, "output_tokens": tokens, "client_tokens": tokens, "prompt_tokens": 3,
            "expected_prompt_tokens": 3, "sent_s": sent_s, "schedule_lag_ms": 0.1, "status": 200}  # fmt: skip


def outcome(records: list[dict], t0: float, late_s: float, duration_s: float) -> dict:
    return {"sent": len(records), "completed": len(records), "failed": 0, "cancelled": 0, "t0_unix_s": t0,
            "late_s": late_s, "duration_s": duration_s, "loop_lag_ms": [0.1, 0.2]}  # fmt: skip


def test_percentiles_over_the_union_not_averaged():
    start = 1000.0
    fast = [record(i, 10.0 + i * 0.01, sent_s=i * 0.01) for i in range(90)]  # pod 0: many quick requests
    slow = [record(90 + i, 1000.0 + i, sent_s=i * 0.1) for i in range(10)]  # pod 1: a few slow ones
    pods = [
        SliceResult(0, 90, "p0", log_found=True, records=fast, outcome=outcome(fast, start + 0.001, 0.001, 0.9)),
        SliceResult(1, 10, "p1", log_found=True, records=slow, outcome=outcome(slow, start + 2.5, 2.5, 2.0)),
    ]
    merged = merge_slices(pods, start, requested_rate=math.inf, tag="client_pod")
    union = summarize(fast + slow, merged.duration_s, None, math.inf)
    for key in ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "p99_itl_ms", "median_e2el_ms",
                "median_tpot_ms", "completed"):  # fmt: skip
        assert merged.summary[key] == union[key], key
    per_pod = [summarize(fast, 0.9), summarize(slow, 2.0)]
    for key, q in (("median_ttft_ms", 50), ("p99_ttft_ms", 99)):
        assert merged.summary[key] == pytest.approx(float(np.percentile([r["ttft_ms"] for r in fast + slow], q)))
        averaged = sum(p[key] for p in per_pod) / 2
        assert abs(averaged - merged.summary[key]) > 400, key  # averaging pods' percentiles says something else
    # From the earliest pod start to the last end on the common time line (pod 1 started 2.5 s late).
    assert merged.start_unix_s == start + 0.001
    assert merged.duration_s == pytest.approx(2.5 + 2.0 - 0.001)
    assert merged.summary["request_throughput"] == pytest.approx(100 / merged.duration_s)
    assert [r["client_pod"] for r in merged.records] == [0] * 90 + [1] * 10
    assert any("slice 1 started 2.5 s after the common start" in w and "did not fully overlap" in w
               for w in merged.summary["warnings"])  # fmt: skip


def test_missing_records_and_dead_pods_are_named():
    start = 50.0
    rows = [record(i, 20.0, sent_s=0.1 * i) for i in range(4)]
    pods = [
        SliceResult(0, 4, "p0", log_found=True, records=rows[:3], outcome=outcome(rows, start, 0.0, 1.0)),
        SliceResult(1, 4, "p1", log_found=True, records=[record(4, 30.0, sent_s=0.2)], outcome=None),
        SliceResult(2, 4, None, log_found=False),
    ]
    merged = merge_slices(pods, start)
    warnings = "\n".join(merged.summary["warnings"])
    assert "slice 0: 3 of the 4 records pod p0 wrote reached servinglab" in warnings
    assert "slice 1: pod p1 ended before its slice did; its 1 of 4 records are kept" in warnings
    assert "slice 2 (4 requests): nothing came back from its pod (none found)" in warnings
    assert merged.summary["completed"] == 4


def test_log_lines_other_than_records_are_ignored():
    from servinglab.experiments.clusterload import parse_log

    text = (f"{RECORD_PREFIX}{json.dumps(record(0, 5.0))}\nsome warning from a library\n{RECORD_PREFIX}{{\"cut"
            f"\n{OUTCOME_PREFIX}{json.dumps({'sent': 1})}\n")  # fmt: skip
    rows, final, other = parse_log(text)
    assert [r["index"] for r in rows] == [0] and final == {"sent": 1}
    assert other[0] == "some warning from a library" and len(other) == 2


# ---------------------------------------------------------------------------------------------- config


def test_config_errors(tmp_path):
    with pytest.raises(ParamsError, match=r"workloads.latency.client: in-cluster .* needs platform: kubernetes"):
        load_study(REPO / "params" / "local.yaml", ["workloads.latency.client=in-cluster"])
    with pytest.raises(ParamsError, match=r"--set workloads.latency.client=in-cluster: "
                                          r"workloads.latency.in_cluster.image: required"):
        load_study(EXAMPLE, ["workloads.latency.client=in-cluster"])
    with pytest.raises(ParamsError, match=r"workloads.latency.in_cluster.image: image 'lg:latest' must be pinned"):
        study("workloads.latency.in_cluster.image=lg:latest")
    with pytest.raises(ParamsError, match=r"workloads.latency.in_cluster.image: image 'registry.example/lg' must be pinned"):
        study("workloads.latency.in_cluster.image=registry.example/lg")
    with pytest.raises(ParamsError, match=r"timeout_s \(30\) must exceed start_delay_s \(60\)"):
        study("workloads.latency.in_cluster.timeout_s=30")
    with pytest.raises(ParamsError, match=r"workloads.latency.in_cluster.cpu"):
        study("workloads.latency.in_cluster.cpu=two")
    # In the study file, the file is named.
    data = yaml.safe_load(EXAMPLE.read_text())
    data["workloads"]["latency"] = {"client": "in-cluster", "in_cluster": {"pods": 4}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=rf"{tmp_path / 's.yaml'}: workloads.latency.in_cluster.image: required"):
        load_study(tmp_path / "s.yaml")
    assert load_study(EXAMPLE).workloads.latency.client == "local"  # the default


# -------------------------------------------------------------------------------------------- the worker


@pytest.fixture(scope="module")
def endpoint():
    with StreamingEndpoint() as running:
        yield running


def test_worker_command_prints_records_then_its_outcome(endpoint, tmp_path, monkeypatch, capsys):
    stage = StageSpec(request_rate=50.0, max_concurrency=3, seed=5)
    start = time.time() + 0.3
    plan = job_plan("rate=50", Target(f"{endpoint.url}/v1", "m"), specs(6), specs(1, "warm"), stage, 2, start)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert cli.main(["loadgen-worker", "--plan", str(tmp_path / "plan.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line[len(RECORD_PREFIX) :]) for line in lines if line.startswith(RECORD_PREFIX)]
    assert lines[-1].startswith(OUTCOME_PREFIX) and len(rows) + 1 == len(lines)
    assert sorted(r["index"] for r in rows if not r["warmup"]) == [1, 3, 5]  # slice 1's, by stage index
    assert all(r["ok"] for r in rows)
    final = json.loads(lines[-1][len(OUTCOME_PREFIX) :])
    assert final["slice"] == 1 and final["completed"] == 3 and final["t0_unix_s"] >= start
    assert 0 <= final["late_s"] < 0.5 and final["schedule_lag_ms"]["count"] == 3
    offsets = dict(zip(plan["slices"][1]["requests"], plan["slices"][1]["offsets_s"]))
    for row in rows:
        if not row["warmup"]:
            assert row["scheduled_s"] == offsets[row["index"]]  # sent at its place in the whole schedule
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert cli.main(["loadgen-worker", "--plan", str(tmp_path / "plan.json")]) == cli.EXIT_BAD_INPUT
    assert "JOB_COMPLETION_INDEX is not set" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- on the emulator


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    emulated = EmulatedCluster()
    emulated.emulator.resources["batch/v1/jobs"] = {}  # the emulator's default resources have no Jobs
    with emulated:
        config = emulated.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", config)
        emulated.kube = Kube(load_api_client(config))
        yield emulated


def job_study(*overrides: str):
    return study("workloads.latency.in_cluster.pods=3", "workloads.latency.in_cluster.start_delay_s=0.5",
                 "workloads.latency.in_cluster.timeout_s=60", *overrides)  # fmt: skip


def leftovers(kube: Kube) -> list[str]:
    found = [f"Job/{o['metadata']['name']}" for o in kube.list("batch/v1", "Job", NS)]
    found += [f"ConfigMap/{o['metadata']['name']}" for o in kube.list("v1", "ConfigMap", NS)]
    return found + [f"Pod/{o['metadata']['name']}" for o in kube.list("v1", "Pod", NS)]


def watched(endpoint: StreamingEndpoint) -> ServerWindow:
    """The server's side of a stage, from this machine, as the sweep watches it."""
    return ServerWindow([MetricsTarget("raw", endpoint.url)], Endpoint("raw", f"{endpoint.url}/v1", "m"))


def test_a_stage_as_an_indexed_job(cluster, endpoint, tmp_path):
    s = job_study()
    platform = KubernetesPlatform(s)
    stage = StageSpec(max_concurrency=4, seed=42)
    window = watched(endpoint)
    with JobController(cluster.kube, NS, cluster.emulator, endpoint.url) as jobs:
        started = time.monotonic()
        merged = run_in_cluster(s, platform, "raw", tmp_path, StagePlan.make("c=4", specs(20), specs(2, "warm"), stage),
                                window)  # fmt: skip
        took = time.monotonic() - started
        assert leftovers(cluster.kube) == []  # Job, ConfigMap and pods deleted
    assert not jobs.errors and jobs.jobs == ["qwen-cluster-raw-load"] and jobs.deleted == ["qwen-cluster-raw-load"]
    assert took < 20
    rows = records.read(tmp_path, records.LATENCY_REQUESTS).rows
    measured = [r for r in rows if not r["warmup"]]
    assert sorted(r["index"] for r in measured) == list(range(20)) and all(r["ok"] for r in measured)
    assert sorted(r["index"] for r in rows if r["warmup"]) == [0, 1]
    assert {r["client_pod"] for r in measured} == {0, 1, 2}
    assert all(r["layer"] == "raw" and r["stage"] == "c=4" and r["repeat"] == 0 for r in rows)
    by_pod = {i: sorted(r["index"] for r in measured if r["client_pod"] == i) for i in range(3)}
    assert by_pod == {i: jobs.plans[0]["slices"][i]["requests"] for i in range(3)}
    assert window.fields["server_alive_after"] is True and window.periods == 1
    summary = merged.summary
    assert summary["completed"] == 20 and summary["failed"] == 0
    union = summarize(rows, summary["duration"])  # the records as written, all pods together
    for key in [k for k in union if any(f"_{m}_ms" in k for m in ("ttft", "tpot", "itl", "e2el"))]:
        assert summary[key] == union[key], key
    assert [p["slice"] for p in merged.clients] == [0, 1, 2]
    assert [p["completed"] for p in merged.clients] == [len(jobs.plans[0]["slices"][i]["requests"]) for i in range(3)]
    assert all(p["late_s"] < 1.0 for p in merged.clients)
    assert not [w for w in summary["warnings"] if "slice" in w]
    assert jobs.plans[0]["target"]["base_url"] == "http://qwen-cluster-raw.servinglab.svc.cluster.local:8000/v1"
    assert client_description(s, "raw") == "in-cluster Job qwen-cluster-raw-load, 3 pods"


def test_a_failed_pod_fails_the_job_keeps_the_others_records_and_deletes_the_job(cluster, endpoint, tmp_path):
    s = job_study()
    platform = KubernetesPlatform(s)
    with JobController(cluster.kube, NS, cluster.emulator, endpoint.url, scenario="pod_fails", fail_index=1) as jobs:
        with pytest.raises(LoadJobError) as caught:
            run_in_cluster(s, platform, "raw", tmp_path, StagePlan.make("c=4", specs(20), [], StageSpec(max_concurrency=4, seed=1)),
                           ServerWindow([]))
        assert leftovers(cluster.kube) == []
    message = str(caught.value)
    assert "layers.raw: stage c=4: in-cluster load Job qwen-cluster-raw-load: the Job failed (BackoffLimitExceeded" in message
    assert "pod qwen-cluster-raw-load-1-x1q (slice 1) exited with code 1 (Error)" in message
    assert "RuntimeError: planted failure" in message and "data/latency_requests.jsonl" in message
    rows = records.read(tmp_path, records.LATENCY_REQUESTS).rows
    plan = jobs.plans[0]
    kept = {i: sorted(r["index"] for r in rows if r["client_pod"] == i) for i in range(3)}
    assert kept[0] == plan["slices"][0]["requests"] and kept[2] == plan["slices"][2]["requests"]
    assert len(kept[1]) == 2  # what the failed pod printed before it died
    assert records.read(tmp_path, records.LATENCY_STAGES).rows == []  # the sweep writes a stage that ended


def test_an_image_that_cannot_be_pulled_fails_promptly(cluster, endpoint, tmp_path):
    s = job_study("workloads.latency.in_cluster.start_delay_s=30")
    platform = KubernetesPlatform(s)
    with JobController(cluster.kube, NS, cluster.emulator, endpoint.url, scenario="image_pull"):
        started = time.monotonic()
        with pytest.raises(LoadJobError, match=rf"container loadgen: ImagePullBackOff: Back-off pulling image \"{IMAGE}\""):
            run_in_cluster(s, platform, "raw", tmp_path, StagePlan.make("c=4", specs(4), [], StageSpec(max_concurrency=4)),
                           ServerWindow([]))
        assert time.monotonic() - started < 10  # not the start delay, not the deadline
        assert leftovers(cluster.kube) == []


class WordTokenizer:
    """A server tokenizer stand-in: one token per word of a 200-word vocabulary."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def encode(self, text: str) -> list[int]:
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def prompt_ids(self) -> list[int]:
        return list(range(200))


@pytest.mark.parametrize("client", ["in-cluster", "local"])
def test_the_sweep_records_where_each_stage_ran(cluster, endpoint, tmp_path, monkeypatch, client):
    monkeypatch.setattr(latency, "ServerTokenizer", WordTokenizer)
    s = job_study(f"workloads.latency.client={client}", "workloads.latency.concurrency=[2]",
                  "workloads.latency.min_prompts=6", "workloads.latency.input_len=5", "workloads.latency.output_len=3",
                  "workloads.latency.sweep.rates=[4]", "workloads.latency.sweep.num_prompts=5",
                  "workloads.latency.repeats=2")  # fmt: skip
    platform = KubernetesPlatform(s)
    (tmp_path / "data").mkdir()  # as in a run directory
    with JobController(cluster.kube, NS, cluster.emulator, endpoint.url) as jobs:
        stages = latency.run_layer_sweep(s, platform, Endpoint("raw", f"{endpoint.url}/v1", "m"), tmp_path)
    assert [st["stage"] for st in stages] == ["c=2", "rate=4"]
    assert all(st["repeats"] == 2 and st["summary"]["completed"] == 2 * st["num_prompts"] for st in stages)
    assert [len(st["repeat_summaries"]) for st in stages] == [2, 2]
    repeats = {(r["stage"], r["repeat"]) for r in records.read(tmp_path, records.LATENCY_REQUESTS).rows}
    assert repeats == {("c=2", 0), ("c=2", 1), ("rate=4", 0), ("rate=4", 1)}
    if client == "in-cluster":
        assert [st["client"] for st in stages] == ["in-cluster Job qwen-cluster-raw-load, 3 pods"] * 2
        assert len(jobs.plans) == 4 and jobs.plans[2]["plan"]["request_rate"] == 4
        # The Job sent the prompts the single client would have sent, seeded per stage.
        single = [r for r in records.read(tmp_path, records.LATENCY_REQUESTS).rows if r["stage"] == "c=2"]
        assert {r["client_pod"] for r in single} == {0, 1}  # concurrency 2 over 3 pods: the third sends nothing
    else:
        assert [st["client"] for st in stages] == [latency.this_machine()] * 2 and jobs.jobs == []
    assert leftovers(cluster.kube) == []


def test_teardown_removes_a_load_job_left_behind(cluster, endpoint, tmp_path):
    """A kernel killed mid-stage leaves its Job running: the study's teardown deletes it with the layers."""
    s = job_study("workloads.latency.in_cluster.start_delay_s=30")
    platform = KubernetesPlatform(s)
    with JobController(cluster.kube, NS, cluster.emulator, endpoint.url, scenario="image_pull"):
        for obj in render_load_job(s, "raw", plan_for(s)):
            cluster.kube.apply(obj)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            len(pods := cluster.kube.list("v1", "Pod", NS)) == 3 and all((p.get("status") or {}).get("containerStatuses")
                                                                       for p in pods)):  # fmt: skip
            time.sleep(0.05)  # until the Job's pods are stuck pulling, as a left-behind Job's would be
        assert sorted(platform.teardown(["raw"])) == ["ConfigMap/qwen-cluster-raw-load", "Job/qwen-cluster-raw-load"]
        assert leftovers(cluster.kube) == []


def test_a_refused_job_is_named_and_its_plan_deleted(cluster, tmp_path, monkeypatch):
    from kubernetes.client.exceptions import ApiException

    apply = Kube.apply

    def forbid_jobs(self, obj, dry_run=False):  # an RBAC role that may create ConfigMaps but not Jobs
        if obj["kind"] == "Job":
            raise ApiException(status=403, reason="Forbidden")
        return apply(self, obj, dry_run)

    monkeypatch.setattr(Kube, "apply", forbid_jobs)
    s = job_study()
    with pytest.raises(LoadJobError, match=r"layers.raw: stage c=4: the cluster refused Job/qwen-cluster-raw-load: Forbidden"):
        run_in_cluster(s, KubernetesPlatform(s), "raw", tmp_path, StagePlan.make("c=4", specs(4), [], StageSpec(max_concurrency=4)),
                           ServerWindow([]))
    assert leftovers(cluster.kube) == []  # the plan went too
