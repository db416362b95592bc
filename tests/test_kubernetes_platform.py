"""The kubernetes platform's flows against a stateful Kubernetes API emulator over HTTP.

A test-side controller (tests/kube_controller.py) moves status as the real controllers do; each
scenario stops where a real cluster would show the failure. Waits are bounded by the platform's own
deadline and pytest's timeout, so a hang fails instead of stalling.
"""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import pytest
from kube_controller import Controller
from kube_emulator import EmulatedCluster, install_serving_stack

from servinglab import cli
from servinglab.config import load_study
from servinglab.experiments.deploy import deploy_layers
from servinglab.errors import PlatformError
from servinglab.layers.common import MANAGED_BY, STUDY_LABEL
from servinglab.platforms import get_platform
from servinglab.platforms.kube import Kube, load_api_client
from servinglab.platforms.kubernetes import KubernetesPlatform, LayerNotReadyError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
NS = "servinglab"


def study(*overrides: str):
    return load_study(EXAMPLE, ["platform.ready_timeout_s=20", *overrides])


def labelled(kube: Kube, study_name: str = "qwen-cluster") -> list[str]:
    found = []
    for api_version, kind in [("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
                              ("serving.kserve.io/v1beta1", "InferenceService"),
                              ("serving.kserve.io/v1alpha1", "ServingRuntime"),
                              ("serving.kserve.io/v1alpha2", "LLMInferenceService"),
                              ("networking.k8s.io/v1", "NetworkPolicy")]:  # fmt: skip
        found += [f"{kind}/{o['metadata']['name']}" for o in
                  kube.list(api_version, kind, NS, {MANAGED_BY: "servinglab", STUDY_LABEL: study_name})]  # fmt: skip
    return found


@pytest.mark.parametrize("layer", ["raw", "kserve-standard", "kserve-knative", "llm-d"])
def test_apply_creates_and_waits_until_ready_with_phases(cluster, tmp_path, layer):
    platform = get_platform(study())
    assert isinstance(platform, KubernetesPlatform)
    with Controller(cluster.kube, NS, step_s=0.05) as controller:
        deployment = platform.ensure(layer, str(tmp_path))
    assert deployment.status == "ready" and not deployment.reused
    # Every phase was seen, in order, and they add up to the time to ready.
    assert list(deployment.phases_s) == ["scheduling_s", "image_pull_s", "container_start_s", "engine_ready_s"]
    assert all(v >= 0 for v in deployment.phases_s.values())
    assert sum(deployment.phases_s.values()) == pytest.approx(deployment.time_to_ready_s, abs=0.01)
    assert deployment.time_to_ready_s >= 4 * 0.05 * 0.9  # at least the controller's steps
    assert any("Event/" in line for line in controller.shown)
    # Applied to create: the objects exist, labelled, and the namespace was created (not labelled).
    assert labelled(cluster.kube)
    assert STUDY_LABEL not in (cluster.kube.get("v1", "Namespace", None, NS)["metadata"].get("labels") or {})
    # Again with the same spec: reused, nothing re-applied.
    again = platform.ensure(layer, str(tmp_path))
    assert again.reused and again.spec_hash == deployment.spec_hash


@pytest.mark.parametrize(
    "scenario,expected",
    [
        ("image_pull", r"ImagePullBackOff: Back-off pulling image"),
        ("crashloop", r"(?s)CrashLoopBackOff after 3 restarts; last log lines:\n.*max-model-len 8192 exceeds"),
        ("oom", r"OOMKilled \(memory limit 16Gi\)"),
        ("unschedulable", r"unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu"),
        ("reconcile_failed", r"ReconcileFailed: fails to reconcile predictor"),
    ],
)
def test_failures_are_reported_with_their_reason_promptly_and_cleaned_up(cluster, tmp_path, scenario, expected):
    platform = get_platform(study("platform.ready_timeout_s=60"))
    layer = "kserve-standard" if scenario == "reconcile_failed" else "raw"
    with Controller(cluster.kube, NS, scenario=scenario, step_s=0.05, emulator=cluster.emulator):
        started = time.monotonic()
        with pytest.raises(LayerNotReadyError, match=expected):
            platform.ensure(layer, str(tmp_path))
        took = time.monotonic() - started
    assert took < 10, f"the failure was reported {took:.1f} s after the emulator showed it"  # deadline is 60 s
    assert labelled(cluster.kube) == []  # a broken layer does not keep its GPU


def test_deadline_names_the_last_state_seen(cluster, tmp_path):
    platform = get_platform(study("platform.ready_timeout_s=1.5"))
    with Controller(cluster.kube, NS, scenario="stall", step_s=0.05):
        with pytest.raises(LayerNotReadyError, match=r"not ready within platform.ready_timeout_s \(1.5 s\); last seen: pod"):
            platform.ensure("raw", str(tmp_path))
    assert labelled(cluster.kube) == []


def test_deploy_records_a_failed_layer_and_goes_on(cluster, tmp_path):
    s = study()
    platform = get_platform(s)
    with Controller(cluster.kube, NS, scenario="reconcile_failed", step_s=0.05):
        records = deploy_layers(s, platform, tmp_path, ["raw", "kserve-standard"])
    by_layer = {r["layer"]: r for r in records}
    assert by_layer["raw"]["status"] == "ready" and by_layer["raw"]["phases_s"]
    assert by_layer["kserve-standard"]["status"] == "failed" and "ReconcileFailed" in by_layer["kserve-standard"]["reason"]


def test_teardown_deletes_by_label_and_leaves_unlabelled_objects_alone(cluster, tmp_path, capsys):
    s = study()
    platform = get_platform(s)
    with Controller(cluster.kube, NS, step_s=0.02):
        for layer in s.layers:
            platform.ensure(layer, str(tmp_path))
        # Someone else's objects in the same namespace: one unlabelled, one of another study.
        cluster.kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "theirs", "namespace": NS},
                            "spec": {"ports": [{"port": 80}]}})  # fmt: skip
        cluster.kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "other-study", "namespace": NS, "labels": {MANAGED_BY: "servinglab", STUDY_LABEL: "other"}},
            "spec": {"ports": [{"port": 80}]}})  # fmt: skip
        # Deployment, Service, 2 InferenceServices, LLMInferenceService, and each layer's NetworkPolicy
        assert len(labelled(cluster.kube)) == 9
        assert cli.main(["status", str(EXAMPLE)]) == 0
        shown = capsys.readouterr().out
        assert "raw\tready\tDeployment/qwen-cluster-raw in servinglab" in shown and "llm-d\tready" in shown
        stopped = platform.teardown(["raw"])
        assert sorted(stopped) == ["Deployment/qwen-cluster-raw", "NetworkPolicy/qwen-cluster-raw-ingress",
                                   "Service/qwen-cluster-raw"]  # fmt: skip
        assert "Deployment/qwen-cluster-raw" not in labelled(cluster.kube)
        assert cli.main(["teardown", str(EXAMPLE)]) == 0
        assert cli.main(["status", str(EXAMPLE)]) == 0
        assert "nothing of study qwen-cluster is running" in capsys.readouterr().out
    assert labelled(cluster.kube) == []
    assert cluster.kube.get("v1", "Service", NS, "theirs") is not None
    assert cluster.kube.get("v1", "Service", NS, "other-study") is not None
    assert cluster.kube.list("v1", "Pod", NS) == []  # the pods went with their owners


def test_interrupt_during_the_wait_leaves_nothing(cluster, tmp_path):
    """Ctrl-C (an interrupt of the main thread) once the pod runs: the layer's objects are deleted."""
    platform = get_platform(study("platform.ready_timeout_s=60"))
    with Controller(cluster.kube, NS, scenario="stall", step_s=0.05) as controller:

        returned = threading.Event()

        def press_ctrl_c() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any("Running" in line or "containerStatuses" in line
                                                          for line in controller.shown):  # fmt: skip
                time.sleep(0.01)
            _thread.interrupt_main()
            # Python drops an interrupt that lands in a finalizer ("Exception ignored in …"); a user whose
            # first Ctrl-C did nothing presses again. Cleanup after one that worked takes far less than this.
            if not returned.wait(15):
                _thread.interrupt_main()

        threading.Thread(target=press_ctrl_c, daemon=True).start()
        try:
            with pytest.raises(KeyboardInterrupt):
                platform.ensure("kserve-knative", str(tmp_path))
        finally:
            returned.set()
    assert labelled(cluster.kube) == []


def test_port_forward_target_and_urls(cluster, tmp_path):
    s = study("layers.kserve-standard.predictor=runtime")
    platform = get_platform(s)
    with Controller(cluster.kube, NS, step_s=0.02):
        for layer in ("raw", "kserve-standard", "llm-d"):
            platform.ensure(layer, str(tmp_path))
    assert platform.port_forward_target("raw") == ("qwen-cluster-raw-1-pod", 8000)
    assert platform.port_forward_target("kserve-standard") == ("qwen-cluster-kserve-standard-1-pod", 8080)
    assert platform.port_forward_target("llm-d") == ("qwen-cluster-llm-d-1-pod", 8000)
    llmd = platform.endpoint("llm-d")  # llm-d's workload speaks TLS with its own certificate
    assert llmd.base_url.startswith("https://127.0.0.1:") and llmd.verify_tls is False and "TLS" in llmd.via
    assert platform.gateway_endpoint("kserve-standard")[0] == "http://qwen-cluster-kserve-standard.servinglab.example.com/v1"
    with pytest.raises(PlatformError, match="raw vLLM has no gateway"):
        platform.gateway_endpoint("raw")
    with pytest.raises(PlatformError, match="no ready pod"):
        platform.port_forward_target("kserve-knative")


def test_dry_run_rejection_stops_before_anything_is_applied(cluster, tmp_path):
    platform = get_platform(study())
    cluster.emulator.dry_run_rejections["deployments"] = "admission webhook denied the request: no GPU quota"
    with pytest.raises(PlatformError, match="rejected Deployment/qwen-cluster-raw in a dry run: admission webhook denied"):
        platform.ensure("raw", str(tmp_path))
    assert labelled(cluster.kube) == []


def test_endpoint_paths(cluster, tmp_path):
    s = study("platform.endpoint=gateway", "platform.gateway_address=10.0.0.7:8080")
    platform = get_platform(s)
    with Controller(cluster.kube, NS, step_s=0.02):
        for layer in ("raw", "kserve-knative"):
            platform.ensure(layer, str(tmp_path))
    through_gateway = platform.endpoint("kserve-knative")
    assert through_gateway.base_url == "http://10.0.0.7:8080/v1"
    assert through_gateway.headers == {"Host": "qwen-cluster-kserve-knative.servinglab.example.com"}
    assert through_gateway.via.startswith("gateway ")
    raw = platform.endpoint("raw")  # no gateway in front of raw vLLM: a port-forward to its pod
    assert raw.via == "port-forward to a ready pod of Deployment/qwen-cluster-raw (first qwen-cluster-raw-1-pod:8000)"
    assert raw.base_url.startswith("http://127.0.0.1:")
    inside = get_platform(study("platform.endpoint=in-cluster")).endpoint("raw")
    assert inside.via == "in-cluster" and inside.base_url == "http://qwen-cluster-raw.servinglab.svc.cluster.local:8000/v1"
    with pytest.raises(PlatformError, match="not deployed and ready"):
        platform.endpoint("llm-d")


def test_port_forward_relays_a_streamed_completion():
    """The relay itself, connected to a local OpenAI-compatible endpoint instead of a pod's stream."""
    import socket

    import openai
    from streaming_endpoint import StreamingEndpoint

    from servinglab.platforms.portforward import PortForward

    with StreamingEndpoint() as upstream:
        host, port = upstream.url.removeprefix("http://").split(":")
        forward = PortForward(lambda: socket.create_connection((host, int(port))), f"test {port}")
        try:
            client = openai.OpenAI(base_url=f"{forward.url}/v1", api_key="k", max_retries=0, timeout=10)
            chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok"}],
                                                          max_tokens=5, stream=True))  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5 and text
        finally:
            forward.close()


def test_preflight_finds_what_the_cluster_runs(cluster, tmp_path):
    from servinglab import api
    from servinglab.experiments.preflight import run_preflight

    run = api.open_study(EXAMPLE, "", [f"paths.runs_dir={tmp_path / 'runs'}"])
    found = run_preflight(run.study, run.platform, run.run_dir)
    checks = found["facts"]["cluster"]
    assert checks["gpus"] == {"resource": "nvidia.com/gpu", "by_node": {"node-0": 1, "node-1": 1}, "total": 2,
                              "labels": {"products": ["NVIDIA-H200"], "count": 2, "memory_mib": 143771,
                                         "driver": "580.159.04", "cuda": "13.0", "source": "node labels"}}
    assert found["facts"]["hardware"]["gpu"] == checks["gpus"]["labels"]  # the run context's GPU line reads this
    assert checks["controllers"][0]["version"] == "v0.20.0"
    assert checks["kind_facts"]["kserve"] == {"default deployment mode": "Knative"}
    assert checks["crds"]["llminferenceservices.serving.kserve.io"] == ["v1alpha1", "v1alpha2"]
    assert checks["gateway_classes"] == ["istio"] and checks["storage_classes"] == ["standard (default)"]
    assert checks["control_plane"]["kserve"] == {"pods": 1, "cpu_cores": 0.1, "memory_gib": 0.293}
    assert checks["missing_crds"] == ["Gateway API Inference Extension (x-k8s.io)"]
    assert all(row["hostable"] for row in found["layers"])


def test_preflight_names_the_missing_prerequisite_per_layer(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with EmulatedCluster() as bare:
        monkeypatch.setenv("KUBECONFIG", bare.kubeconfig(tmp_path / "kubeconfig"))
        kube = Kube(load_api_client())
        install_serving_stack(kube, gpus_per_node=(), knative=False, llmisvc_versions=("v1alpha1",), inference_pools=False)
        platform = get_platform(study())
        reasons = {name: platform.unsupported_reason(name) for name in platform.study.layers}
        assert platform.study.layers["llm-d"].api_version == "v1alpha1"  # unset in the study: what the cluster serves
        pinned = get_platform(study("layers.llm-d.api_version=v1alpha2")).unsupported_reason("llm-d")
        assert "the LLMInferenceService CRD serving v1alpha2 (the cluster serves v1alpha1)" in pinned
        cpu_only = get_platform(study("platform.gpus=0", "platform.image=vllm/vllm-openai-cpu:v0.32.0"))
        assert cpu_only.unsupported_reason("raw") is None and cpu_only.unsupported_reason("kserve-standard") is None
    assert reasons["raw"] == "the cluster lacks a node with 1 allocatable nvidia.com/gpu"
    assert "Knative Serving (Knative mode)" in reasons["kserve-knative"]
    assert "Knative" not in reasons["kserve-standard"]
    assert reasons["llm-d"] == ("the cluster lacks a node with 1 allocatable nvidia.com/gpu; the Gateway API "
                                "Inference Extension (InferencePool CRD) for the scheduler")


def test_what_you_write_and_what_the_platform_creates(cluster, tmp_path):
    s = study()
    platform = get_platform(s)
    with Controller(cluster.kube, NS, step_s=0.02):
        raw = platform.ensure("raw", str(tmp_path))
        kserve = platform.ensure("kserve-standard", str(tmp_path))
        llmd = platform.ensure("llm-d", str(tmp_path))
    assert raw.applied == ["NetworkPolicy/qwen-cluster-raw-ingress", "Deployment/qwen-cluster-raw",
                           "Service/qwen-cluster-raw"]  # fmt: skip
    assert raw.created == ["Pod/qwen-cluster-raw-1-pod", "ReplicaSet/qwen-cluster-raw-5d8f7c9b6"]
    assert kserve.applied == ["NetworkPolicy/qwen-cluster-kserve-standard-ingress",
                              "InferenceService/qwen-cluster-kserve-standard"]  # fmt: skip
    assert kserve.created == [
        "Deployment/qwen-cluster-kserve-standard-predictor", "HTTPRoute/qwen-cluster-kserve-standard",
        "HorizontalPodAutoscaler/qwen-cluster-kserve-standard-predictor", "Pod/qwen-cluster-kserve-standard-1-pod",
        "ReplicaSet/qwen-cluster-kserve-standard-predictor-7c6d5", "Service/qwen-cluster-kserve-standard-predictor",
    ]
    assert "HTTPRoute/qwen-cluster-llm-d-kserve-route" in llmd.created and len(llmd.applied) == 2


def test_the_study_context_is_used_whatever_the_current_context(cluster, tmp_path, monkeypatch):
    import yaml

    config = yaml.safe_load(Path(cluster.kubeconfig(tmp_path / "kubeconfig")).read_text())
    config["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
    config["contexts"].append({"name": "elsewhere", "context": {"cluster": "nowhere", "user": "tester"}})
    config["current-context"] = "elsewhere"
    config = yaml.safe_dump(config)
    (tmp_path / "two-contexts").write_text(config)
    monkeypatch.delenv("KUBECONFIG")
    chosen = get_platform(study(f"platform.kubeconfig={tmp_path / 'two-contexts'}", "platform.context=emulator"))
    assert chosen.cluster_checks()["gpus"]["total"] == 2
    current = get_platform(study(f"platform.kubeconfig={tmp_path / 'two-contexts'}"))
    with pytest.raises(PlatformError, match=r"cannot reach the Kubernetes API at http://127.0.0.1:9"):
        current.cluster_checks()  # the current context points at a closed port


def test_unschedulable_waits_out_the_grace_an_autoscaler_needs(cluster, tmp_path):
    platform = get_platform(study("platform.unschedulable_grace_s=1.0"))
    with Controller(cluster.kube, NS, scenario="unschedulable", step_s=0.05):
        started = time.monotonic()
        with pytest.raises(LayerNotReadyError, match="unschedulable"):
            platform.ensure("raw", str(tmp_path))
        assert time.monotonic() - started >= 1.0


def test_a_ready_condition_of_the_previous_generation_does_not_count(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)  # the cluster study as written
    platform = KubernetesPlatform(study())
    isvc = {"kind": "InferenceService", "metadata": {"generation": 2},
            "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}}
    assert not platform._ready(isvc)
    isvc["status"]["observedGeneration"] = 2
    assert platform._ready(isvc)
    rolling = {"kind": "Deployment", "metadata": {"generation": 3}, "spec": {"replicas": 2},
               "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 1, "readyReplicas": 3,
                          "availableReplicas": 3, "conditions": [{"type": "Available", "status": "True"}]}}
    assert not platform._ready(rolling)  # old replicas still serve: the rollout is not done
    rolling["status"].update(replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2)
    assert platform._ready(rolling)
    old_pod = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"}}
    assert not platform._current_pod(old_pod, time.time())
