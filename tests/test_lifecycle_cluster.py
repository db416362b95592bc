"""Every lifecycle experiment on a cluster study, against the Kubernetes API emulator.

The test controller plays the Deployment, KServe and Knative controllers (rollouts, revisions, canary
traffic in status, scale to zero and the activator's wake-up, pods coming and going) and the test network
answers real HTTP requests from every ready pod and through the gateway, so the experiments apply, watch,
send and count exactly as they would on a cluster; only the port-forward's websocket is replaced by a
direct connection to the pod's server.
"""

from __future__ import annotations

import _thread
import json
import threading
import time
from pathlib import Path

import pytest
from kube_network import EmulatedServing

from servinglab.experiments import lifecycle
from servinglab.config import load_study
from servinglab.layers.common import HASH_LABEL, MANAGED_BY, STUDY_LABEL
from servinglab.platforms import get_platform
from servinglab.platforms.kubernetes import KubernetesPlatform

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
NS = "servinglab"
SERVED = "qwen2.5-0.5b"
ISVC = "serving.kserve.io/v1beta1"
LAYERS = ("raw", "kserve-standard", "kserve-knative", "llm-d")


@pytest.fixture
def serving(cluster, monkeypatch):
    with EmulatedServing(cluster.kube, NS, step_s=0.05, idle_s=0.5, gateway_overhead_ms=5.0) as emulated:
        # The port-forward's websocket cannot run against the emulator: connect to the pod's server instead.
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda self, pod, port: emulated.connector(pod, port))
        yield emulated


def cluster_study(serving: EmulatedServing, *overrides: str):
    return load_study(EXAMPLE, [
        "platform.ready_timeout_s=20", "platform.endpoint=gateway", f"platform.gateway_address={serving.gateway_address}",
        "workloads.lifecycle.repeats=2", "workloads.lifecycle.baseline_s=1.5", "workloads.lifecycle.steady_rate=25", "workloads.lifecycle.max_tokens=8",
        "workloads.lifecycle.canary_requests=300", "workloads.lifecycle.hop_requests=25",
        "workloads.lifecycle.warm_requests=3", "workloads.lifecycle.scale_to_zero_timeout_s=20", *overrides])  # fmt: skip


def outcomes(run_dir: Path) -> dict[tuple[str, str], list[dict]]:
    found: dict[tuple[str, str], list[dict]] = {}
    for line in (run_dir / "data" / "lifecycle.jsonl").read_text().splitlines():
        record = json.loads(line)
        found.setdefault((record["layer"], record["experiment"]), []).append(record)
    return found


def isvc(cluster, layer: str) -> dict:
    return cluster.kube.get(ISVC, "InferenceService", NS, f"qwen-cluster-{layer}")


def test_every_experiment_on_every_layer(cluster, serving, tmp_path):
    study = cluster_study(serving)
    platform = get_platform(study)
    for layer in LAYERS:
        platform.ensure(layer, str(tmp_path))
    hashes = {layer: platform.kube.get(*platform.top_ref(layer))["metadata"]["labels"][HASH_LABEL] for layer in LAYERS}
    records = lifecycle.run_lifecycle(study, platform, tmp_path)
    lifecycle.assert_measured(records)
    found = outcomes(tmp_path)

    # Time to ready, twice per layer, with the cluster's phases.
    for layer in LAYERS:
        trials = found[(layer, "time_to_ready")]
        assert [t["status"] for t in trials] == ["measured", "measured"]
        for t in trials:
            m = t["measurements"]
            assert sorted(m["phases_s"]) == ["container_start_s", "engine_ready_s", "image_pull_s", "scheduling_s"]
            assert sum(m["phases_s"].values()) == pytest.approx(m["time_to_ready_s"], abs=0.01)
            # The URL the controller published each time (the report checks it stays the same); none for raw.
            assert m["url"] == (None if layer == "raw" else f"http://qwen-cluster-{layer}.servinglab.example.com")

    # Model update on every layer: the new revision answers under its own name after the change.
    for layer in LAYERS:
        m = found[(layer, "model_update")][0]["measurements"]
        assert m["answered_as_after"] == [f"{SERVED}:update"], layer
        assert m["change_to_served_s"] is not None and m["before"]["failed"] == 0
        assert m["before"]["requests"] >= 5 and m["changed_args"] == {"max-num-seqs": 128}
    # raw vLLM's one-GPU Deployment recreates its pod: an outage the steady load runs into; the KServe
    # and llm-d rollouts bring the new pod up before the old one goes.
    raw_update = found[("raw", "model_update")][0]["measurements"]
    assert raw_update["how"] == "Deployment rollout (Recreate)" and raw_update["longest_gap_s"] >= 0.15
    rolling = found[("kserve-standard", "model_update")][0]["measurements"]["during"]
    assert rolling["failed"] <= max(1, rolling["requests"] // 10), rolling  # a stream cut when its old pod goes, at most

    # Canary on both KServe layers: the split the gateway made, counted from the answers.
    for layer, how in (("kserve-knative", "canaryTrafficPercent"), ("kserve-standard", "spec.canary")):
        m = found[(layer, "canary")][0]["measurements"]
        split = m["split"]
        assert how in m["how"] and split["answered"] == 300 and split["requested_percent"] == 20
        assert split["ci_low_percent"] < split["observed_percent"] < split["ci_high_percent"]
        assert abs(split["observed_percent"] - 20) < 8
        assert m["answered_as"] == [SERVED, f"{SERVED}:canary"]
        assert sorted(t["percent"] for t in m["status_traffic"]) == [20, 80]
        assert m["promote"]["answered_as_after"] == [f"{SERVED}:canary"]
        assert m["rollback"]["answered_as_after"] == [SERVED]
        for change in ("promote", "rollback"):  # every request of the change is counted, failed ones by kind
            during = m[change]["during"]
            assert during["requests"] >= 5 and during["failed"] == sum(during["errors"].values())
    for layer in ("raw", "llm-d"):
        [outcome] = found[(layer, "canary")]
        assert outcome["status"] == "unsupported" and "by hand" in outcome["reason"] and outcome["refused_by"] == "layer"

    # Scale to zero: Knative by itself after the idle window, then the activator wakes it; raw vLLM by hand.
    knative = found[("kserve-knative", "scale_to_zero")][0]["measurements"]
    assert knative["time_to_zero_s"] >= 0.5 and "activator" in knative["how"]
    assert {"scheduling_s", "container_start_s", "engine_ready_s", "first_token_s"} <= set(knative["cold_phases_s"])
    assert knative["cold_start_s"] * 1000 > knative["warm_ttft_ms_p50"]
    by_hand = found[("raw", "scale_to_zero")][0]["measurements"]
    assert "kubectl scale" in by_hand["how"] and by_hand["cold_start_s"] >= 4 * 0.05 * 0.9
    assert "HPA" in found[("kserve-standard", "scale_to_zero")][0]["reason"]
    assert found[("llm-d", "scale_to_zero")][0]["status"] == "unsupported"

    # The gateway's own latency, found by pairs: the network adds 5 ms there.
    for layer in ("kserve-standard", "kserve-knative", "llm-d"):
        m = found[(layer, "gateway_hop")][0]["measurements"]
        overhead = m["overhead_ttft_ms"]
        assert overhead["pairs"] == 25 and 2.0 < overhead["median_difference"] < 20, (layer, overhead)
        assert overhead["ci_low"] > 1.0 and "port-forward" in m["direct_via"] and "gateway" in m["gateway_via"]
    assert found[("raw", "gateway_hop")][0]["status"] == "unsupported"

    # Every layer is back as the study specifies it: same spec hash, ready, serving the plain name.
    for layer in LAYERS:
        top = platform.kube.get(*platform.top_ref(layer))
        assert top["metadata"]["labels"][HASH_LABEL] == hashes[layer] and platform._ready(top), layer
    assert "canaryTrafficPercent" not in isvc(cluster, "kserve-knative")["spec"]["predictor"]
    assert "canary" not in isvc(cluster, "kserve-standard")["spec"]
    # Every request the experiments sent is on disk.
    sent = (tmp_path / "data" / "lifecycle_requests.jsonl").read_text().splitlines()
    assert len(sent) >= 2 * 300 + 3 * 2 * 25


def test_a_canary_that_never_gets_ready_is_rolled_back(cluster, tmp_path, monkeypatch):
    with EmulatedServing(cluster.kube, NS, scenario="canary_never_ready", step_s=0.05) as serving:
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda self, pod, port: serving.connector(pod, port))
        study = cluster_study(serving)
        platform = get_platform(study)
        platform.ensure("kserve-knative", str(tmp_path))
        before = isvc(cluster, "kserve-knative")["metadata"]["labels"][HASH_LABEL]
        records = lifecycle.run_lifecycle(study, platform, tmp_path, ["kserve-knative"], ["canary", "gateway_hop"])
        [canary, hop] = records
        assert canary["status"] == "failed" and "CrashLoopBackOff" in canary["reason"]
        assert canary["settled"] == "restored"
        # The next experiment ran on the restored layer.
        assert hop["status"] == "measured"
        restored = isvc(cluster, "kserve-knative")
        assert restored["metadata"]["labels"][HASH_LABEL] == before and platform._ready(restored)
        with pytest.raises(Exception, match="did not measure"):
            lifecycle.assert_measured(records)


def test_a_stalled_scale_up_is_torn_down_as_the_study_says(cluster, tmp_path, monkeypatch):
    with EmulatedServing(cluster.kube, NS, scenario="scale_up_stall", step_s=0.05) as serving:
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda self, pod, port: serving.connector(pod, port))
        study = cluster_study(serving, "workloads.lifecycle.on_interrupt=teardown", "platform.unschedulable_grace_s=0.5")
        platform = get_platform(study)
        platform.ensure("raw", str(tmp_path))
        [record] = lifecycle.run_lifecycle(study, platform, tmp_path, ["raw"], ["scale_to_zero"])
        assert record["status"] == "failed" and "unschedulable" in record["reason"]
        assert record["settled"] == "torn down"
        assert cluster.kube.list("apps/v1", "Deployment", NS, {MANAGED_BY: "servinglab", STUDY_LABEL: "qwen-cluster"}) == []
        # What was measured before the stall is kept: the warm requests.
        sent = [json.loads(line) for line in (tmp_path / "data" / "lifecycle_requests.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in sent] == ["warm"] * 3 and all(r["ok"] for r in sent)


def test_ctrl_c_during_a_canary_restores_the_layer_and_keeps_the_requests(cluster, serving, tmp_path):
    study = cluster_study(serving, "workloads.lifecycle.canary_requests=100000")
    platform = get_platform(study)
    platform.ensure("kserve-standard", str(tmp_path))
    before = isvc(cluster, "kserve-standard")["metadata"]["labels"][HASH_LABEL]
    requests_file = tmp_path / "data" / "lifecycle_requests.jsonl"

    returned = threading.Event()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not requests_file.exists() or len(requests_file.read_text().splitlines()) < 50):
            time.sleep(0.02)
        _thread.interrupt_main()
        # Python drops an interrupt that lands in a finalizer ("Exception ignored in …"): press again, as a
        # user would, when the first did nothing; a restore after one that worked ends well before this.
        if not returned.wait(20):
            _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lifecycle.run_lifecycle(study, platform, tmp_path, ["kserve-standard"], ["canary"])
    finally:
        returned.set()
    [record] = outcomes(tmp_path)[("kserve-standard", "canary")]
    assert record["status"] == "interrupted" and record["settled"] == "restored"
    restored = isvc(cluster, "kserve-standard")
    assert restored["metadata"]["labels"][HASH_LABEL] == before and "canary" not in restored["spec"]
    assert platform._ready(restored)
    assert len(requests_file.read_text().splitlines()) >= 50
