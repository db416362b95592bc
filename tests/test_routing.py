"""Routing with shared prefixes: the experiment's two stages per layer, the requests each pod served and its
prefix-cache hits, and the decision table's row built from those records.

On the emulated cluster this proves the plumbing only: the test network's pods count prefix hits per block
of prompt words and its gateway spreads requests in turn, so nothing here measures llm-d's scheduling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kube_network import EmulatedServing
from synthetic import closed_stage
from test_report import make_run

from servinglab import records, report
from servinglab.api import run_context
from servinglab.config import load_study
from servinglab.errors import ParamsError
from servinglab.experiments import deploy, routing
from servinglab.platforms import get_platform
from servinglab.platforms.kubernetes import KubernetesPlatform
from servinglab.report.rundata import load_run
from servinglab.report.table import decision_table

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "params" / "cluster-routing.yaml"
SMALL = ["workloads.routing.prefix_len=48", "workloads.routing.input_len=8", "workloads.routing.output_len=3",
         "workloads.routing.num_prompts=12", "workloads.routing.concurrency=3", "workloads.routing.num_prefixes=2",
         "workloads.latency.workers=1"]  # fmt: skip


@pytest.fixture
def serving(cluster, monkeypatch):
    with EmulatedServing(cluster.kube, "servinglab", step_s=0.05) as emulated:
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda self, pod, port: emulated.connector(pod, port))
        yield emulated


def test_the_routing_study_validates_with_two_replicas_per_layer(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)  # the file as written, not shrunk to the local study
    study = load_study(STUDY)
    assert study.workloads.routing is not None and study.workloads.routing.prefix_len >= 256
    assert study.platform.endpoint == "gateway"
    assert {routing.layer_kinds.of(layer).serving_replicas(layer) for layer in study.layers.values()} == {2}
    assert load_study(REPO / "params" / "cluster-example.yaml").workloads.routing is None  # opt-in
    with pytest.raises(ParamsError, match=r"workloads\.routing\.prefix_len"):
        load_study(STUDY, ["workloads.routing.prefix_len=0"])


@pytest.mark.timeout(180)
def test_two_replicas_per_layer_on_the_emulated_cluster(serving, tmp_path):
    study = load_study(STUDY, ["platform.ready_timeout_s=20", f"platform.gateway_address={serving.gateway_address}",
                               "platform.gpus=0", "platform.image=vllm/vllm-openai-cpu:v0.32.0", *SMALL])  # fmt: skip
    platform = get_platform(study)
    run = records.create_run(tmp_path / "runs", study.study, run_context(study) | {"status": "running"})
    # raw vLLM (no gateway: a port-forward from here) and llm-d (its gateway); KServe's gateway path is llm-d's.
    measured = ["raw", "llm-d"]
    deploy.assert_deployed(deploy.deploy_layers(study, platform, run, measured))
    lines: list[str] = []
    stages = routing.run_routing(study, platform, run, measured, say=lines.append)

    assert [(s["layer"], s["routing"]["workload"]) for s in stages] == [
        (layer, workload) for layer in measured for workload in ("no-prefix", "shared-prefix")]
    assert all(s["mode"] == "routing" and s["summary"]["completed"] == 12 for s in stages)
    assert records.read(run, records.LATENCY_STAGES).rows == stages and len(lines) == 4
    by = {(s["layer"], s["routing"]["workload"]): s for s in stages}
    for layer in measured:
        shared, unshared = by[(layer, "shared-prefix")], by[(layer, "no-prefix")]
        pods = shared["server"]["requests_per_pod"]
        assert len(pods) == 2 and sum(pods.values()) == 12, (layer, pods)  # every pod scraped, every request found
        assert shared["server"]["prefix_cache_hit_rate"] > 0.5 > unshared["server"]["prefix_cache_hit_rate"], layer
        assert all("prefix_cache_hit_rate" in p for p in shared["server"]["per_pod"].values() if p.get("requests_total"))
        assert shared["routing"]["replicas"] == 2 and shared["routing"]["pods"] == 2
    # raw vLLM has no gateway: from this machine it is a port-forward, whose connections all reach one pod.
    raw = by[("raw", "shared-prefix")]
    assert raw["routing"]["path"] == "port-forward" and raw["routing"]["routed_by"] is None
    assert sorted(raw["server"]["requests_per_pod"].values()) == [0, 12]
    llmd = by[("llm-d", "shared-prefix")]  # the test gateway spreads requests in turn over both pods
    assert llmd["routing"]["path"] == "gateway" and llmd["routing"]["routed_by"]
    assert sorted(llmd["server"]["requests_per_pod"].values()) == [6, 6]

    cells = decision_table(load_run(run)).cells()["routing"]
    assert cells["raw"].status == "not-run" and "port-forward" in cells["raw"].text
    assert "bypasses the layer's routing: measuring it needs a path through it: in-cluster, its Service" in cells["raw"].text
    cell = cells["llm-d"]
    assert cell.status == "measured" and cell.trials == 24, cell
    assert all(f"{pod} 6" in cell.text for pod in llmd["server"]["requests_per_pod"]), cell.text
    assert "prefix-cache hit rate" in cell.text and "without shared prefixes" in cell.text
    assert "llm-d's inference scheduler" in cell.text
    assert cells["kserve-standard"].status == "not-deployed"
    html = report.render_html(run)
    assert 'id="row-routing"' in html and "Routing with shared prefixes" in html
    assert "KV-aware routing" in html  # llm-d's claim, as the run recorded its kind


def local_routing_stage(workload: str, hit_rate: float) -> dict:
    stage, _ = closed_stage("raw", 4, 9.0, 1000.0)
    return stage | {"stage": f"{workload} c=4", "mode": "routing", "server": {
        "available": True, "prefix_cache_hit_rate": hit_rate, "requests_per_pod": {"raw": 40}, "per_pod": {}},
        "routing": {"workload": workload, "prefix_len": 256, "num_prefixes": 1 if workload == "shared-prefix" else 0,
                    "input_len": 64, "output_len": 16, "path": "direct", "via": "direct", "routed_by": None,
                    "replicas": 1, "pods": 1}}  # fmt: skip


def test_on_the_local_platform_the_row_says_what_routing_needs(tmp_path):
    run = make_run(tmp_path, "complete")
    cells = decision_table(load_run(run)).cells()["routing"]
    assert {cell.status for cell in cells.values()} == {"needs-platform"}
    assert "needs platform: kubernetes, with two or more replicas" in cells["raw"].text
    records.append(run, records.LATENCY_STAGES, [local_routing_stage("no-prefix", 0.01),
                                                 local_routing_stage("shared-prefix", 0.62)], provenance="synthetic")  # fmt: skip
    raw = decision_table(load_run(run)).cells()["routing"]["raw"]
    assert raw.status == "needs-platform"
    assert "on this one process, prefix-cache hit rate 62.0 % with shared prefixes, 1.0 % without" in raw.text
    # The routing stages stay out of the sweep's rows.
    assert "no-prefix" not in decision_table(load_run(run)).cells()["ttft"]["raw"].text


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_a_real_engine_finds_the_shared_prefixes_in_its_cache(engine, tmp_path):
    """The session's vLLM (CPU build, blocks of 128 tokens): a 256-token shared prefix is found in the cache by
    every request after the first, and the unshared stage finds nothing; the local row says what routing needs."""
    from servinglab.config import RoutingWorkload

    study = engine.study.model_copy(deep=True)
    study.workloads.routing = RoutingWorkload(prefix_len=256, input_len=32, output_len=4, concurrency=2, num_prompts=8)
    run = records.create_run(tmp_path / "runs", study.study, run_context(study) | {"status": "running"})
    records.append(run, records.DEPLOYMENTS, [engine.deployment.to_record()])
    shared, unshared = reversed(routing.run_layer_routing(study, engine.platform, engine.platform.endpoint("raw"), run))
    assert (shared["routing"]["workload"], shared["routing"]["path"], shared["routing"]["routed_by"]) == (
        "shared-prefix", "direct", None)
    assert shared["server"]["requests_per_pod"] == {"raw": 8} and shared["summary"]["completed"] == 8
    prompt_tokens = shared["server"]["prompt_tokens_total"] / 8  # with the chat template
    # Every request after the first finds at least the prefix's two whole blocks.
    assert shared["server"]["prefix_cache_hits_total"] >= 7 * 256
    assert shared["server"]["prefix_cache_hit_rate"] >= 0.8 * (7 / 8) * 256 / prompt_tokens
    assert unshared["server"]["prefix_cache_hit_rate"] < 0.05
    cell = decision_table(load_run(run)).cells()["routing"]["raw"]
    assert cell.status == "needs-platform" and "on this one process, prefix-cache hit rate" in cell.text
