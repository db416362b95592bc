"""A neighbour's pod in the cluster tries the layers' engines: only declared peers get through, and the
engine and load pods hold no API token and cannot rewrite their own image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from servinglab import layers
from servinglab.config import load_study
from servinglab.errors import ParamsError
from servinglab.experiments.clusterload import client_description, in_cluster_target, render_load_job
from servinglab.layers.render import render_layer
from servinglab.layers.validate import validate_objects
from servinglab.platforms.kubernetes import KubernetesPlatform

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
LOADGEN_IMAGE = "registry.example/servinglab-loadgen:0.1.0"
LAYERS = ["raw", "kserve-standard", "kserve-knative", "llm-d"]

LOAD_PODS = ("servinglab", (("app.kubernetes.io/component", "loadgen"), ("servinglab.io/layer", "{layer}"),
                            ("servinglab.io/study", "qwen-cluster")))  # fmt: skip
GATEWAY = {
    ("kserve", (("gateway.networking.k8s.io/gateway-name", "kserve-ingress-gateway"),)),
    ("envoy-gateway-system", (("gateway.envoyproxy.io/owning-gateway-name", "kserve-ingress-gateway"),
                              ("gateway.envoyproxy.io/owning-gateway-namespace", "kserve"))),
}  # fmt: skip
KNATIVE = {
    ("knative-serving", (("app", "activator"),)),
    ("knative-serving", (("app", "autoscaler"),)),
    ("istio-system", (("istio", "ingressgateway"),)),
    ("kourier-system", (("app", "3scale-kourier-gateway"),)),
}
EPP = ("servinglab", (("app.kubernetes.io/component", "llminferenceservice-router-scheduler"),
                      ("app.kubernetes.io/name", "qwen-cluster-llm-d"), ("app.kubernetes.io/part-of", "llminferenceservice")))  # fmt: skip
EXPECTED_PEERS = {"raw": set(), "kserve-standard": GATEWAY, "kserve-knative": KNATIVE, "llm-d": GATEWAY | {EPP}}


@pytest.fixture(autouse=True)
def _no_override_file(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)


def study(*overrides: str):
    return load_study(EXAMPLE, list(overrides))


def policies(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


def admitted(policy: dict) -> set[tuple[str, tuple]]:
    """Every peer the policy admits, as (namespace or '*', sorted pod labels)."""
    own = policy["metadata"]["namespace"]
    (rule,) = policy["spec"]["ingress"]
    peers = set()
    for entry in rule["from"]:
        assert set(entry) <= {"podSelector", "namespaceSelector"}, entry  # no ipBlock: no address range is trusted
        labels = tuple(sorted(entry["podSelector"]["matchLabels"].items()))
        assert labels, "a peer with no pod labels would admit a whole namespace"
        selector = entry.get("namespaceSelector")
        namespace = own if selector is None else (selector.get("matchLabels") or {}).get("kubernetes.io/metadata.name", "*")
        peers.add((namespace, labels))
    return peers


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs an engine object carries (a Deployment's template, a predictor, an llm-d template)."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job"):
        return [spec["template"]["spec"]]
    if obj["kind"] == "InferenceService":
        return [spec["predictor"]]
    if obj["kind"] == "LLMInferenceService":
        return [spec["template"]]
    return []


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_admits_exactly_its_declared_peers(layer):
    s = study()
    objects = render_layer(s, layer)
    (policy,) = policies(objects)
    assert objects[0] is policy  # applied before any pod it guards can start
    kind = layers.of(s.layers[layer])
    assert policy["spec"]["podSelector"] == {"matchLabels": kind.pod_selector(s, layer)}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    load = (LOAD_PODS[0], tuple(sorted((k, v.format(layer=layer)) for k, v in LOAD_PODS[1])))
    expected = {load} | {(ns, tuple(sorted(labels))) for ns, labels in EXPECTED_PEERS[layer]}
    assert admitted(policy) == expected
    validate_objects(objects, s.platform.kubernetes_version)


def test_peers_follow_what_the_study_configures():
    s = study("platform.endpoint=in-cluster", "platform.gateway=gw-ns/inference-gw",
              "telemetry.prometheus_url=http://prometheus-operated.monitoring.svc:9090")  # fmt: skip
    (policy,) = policies(render_layer(s, "llm-d"))
    peers = admitted(policy)
    assert ("servinglab", (("servinglab.io/client", "qwen-cluster"),)) in peers
    assert ("monitoring", (("app.kubernetes.io/name", "prometheus"),)) in peers
    assert ("gw-ns", (("gateway.networking.k8s.io/gateway-name", "inference-gw"),)) in peers
    assert not any("kserve-ingress-gateway" in str(p) for p in peers)
    outside = study("telemetry.prometheus_url=https://prometheus.example.com")
    (policy,) = policies(render_layer(outside, "raw"))
    assert ("*", (("app.kubernetes.io/name", "prometheus"),)) in admitted(policy)
    validate_objects(render_layer(s, "llm-d"), s.platform.kubernetes_version)


def test_network_policy_false_renders_none():
    s = study("platform.network_policy=false")
    for layer in LAYERS:
        assert policies(render_layer(s, layer)) == []


ENGINE_CASES = [("raw", ()), ("llm-d", ()),
                *[(layer, (f"layers.{layer}.predictor={p}",)) for layer in ("kserve-standard", "kserve-knative")
                  for p in ("custom", "runtime")]]  # fmt: skip


@pytest.mark.parametrize("layer,overrides", ENGINE_CASES)
def test_engine_pods_mount_no_token_and_write_only_to_their_volumes(layer, overrides):
    s = study(*overrides)
    objects = render_layer(s, layer)
    checked = 0
    for obj in objects:
        for pod in pod_specs(obj):
            assert pod["automountServiceAccountToken"] is False, obj["kind"]
            checked += 1
        containers = [c for p in pod_specs(obj) for c in p.get("containers", []) + p.get("initContainers", [])]
        if obj["kind"] == "ServingRuntime":
            containers = obj["spec"]["containers"]
        for container in containers:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/home/servinglab"} <= mounts, container["name"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            writable = [v for k, v in env.items() if k in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR",
                                                          "TORCHINDUCTOR_CACHE_DIR")]  # fmt: skip
            assert all(any(v.startswith(m) for m in mounts) for v in writable), env
    assert checked == 1
    validate_objects(objects, s.platform.kubernetes_version)


def test_staging_container_writes_only_to_its_volumes():
    s = study("model.source.uri=hf://Qwen/Qwen2.5-0.5B-Instruct", "platform.staging_image=hfcli:1.0")
    deployment = next(o for o in render_layer(s, "raw") if o["kind"] == "Deployment")
    (stage,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert stage["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"/tmp", "/home/servinglab"} <= {m["mountPath"] for m in stage["volumeMounts"]}


def in_cluster_study(*overrides: str):
    return study("workloads.latency.client=in-cluster", f"workloads.latency.in_cluster.image={LOADGEN_IMAGE}", *overrides)


def test_load_pods_mount_no_token():
    s = in_cluster_study("workloads.latency.in_cluster.insecure_skip_tls_verify=true")
    plan = {"plan": {"stage": "c=1"}, "slices": [{}]}
    config_map, job = render_load_job(s, "raw", plan)
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_load_pods_skip_tls_verification_only_when_the_study_says_so():
    with pytest.raises(ParamsError) as caught:
        in_cluster_study()
    message = str(caught.value)
    assert "workloads.latency.in_cluster.insecure_skip_tls_verify" in message and "llm-d" in message
    assert "\n" not in message
    s = in_cluster_study("workloads.latency.in_cluster.insecure_skip_tls_verify=true")
    platform = KubernetesPlatform(s)
    assert in_cluster_target(s, platform, "llm-d").verify_tls is False
    assert in_cluster_target(s, platform, "raw").verify_tls is True  # the key never loosens a plain layer
    assert "TLS not verified (insecure_skip_tls_verify)" in client_description(s, "llm-d")
    assert "TLS" not in client_description(s, "raw")


def test_load_image_base_is_pinned_or_says_why_not():
    text = (REPO / "docker" / "loadgen" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    if "@sha256:" not in base:
        assert re.search(r"not pinned by digest", text), "an unpinned base must say why in the Dockerfile"
