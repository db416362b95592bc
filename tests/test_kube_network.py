"""The test side of a cluster behaves as specified: rollouts, canary traffic, scaling, the gateway.

The platform's own flows (``ensure``, ``scale``, ``wait_ready``, ``endpoint``) drive the emulator; the
test controller (tests/kube_controller.py) moves status and pods as the real controllers do, and the test
network (tests/kube_network.py) answers real HTTP requests from every ready pod and through the gateway.
"""

from __future__ import annotations

import http.client
import json
import queue
import ssl
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from kube_network import EmulatedServing, engine_argv, served_names

from servinglab.measure import server_metrics
from servinglab.config import load_study
from servinglab.layers.common import Canary
from servinglab.layers.validate import bundled_crd_schemas, unknown_fields
from servinglab.platforms import get_platform
from servinglab.platforms.kube import Kube, conditions
from servinglab.platforms.kubernetes import KubernetesPlatform, LayerNotReadyError

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
NS = "servinglab"
SERVED = "qwen2.5-0.5b"
ISVC = "serving.kserve.io/v1beta1"


def platform_for(serving: EmulatedServing, *overrides: str) -> KubernetesPlatform:
    study = load_study(EXAMPLE, ["platform.ready_timeout_s=20", "platform.endpoint=gateway",
                                 f"platform.gateway_address={serving.gateway_address}", *overrides])  # fmt: skip
    return get_platform(study)


def ask(client: httpx.Client, url: str, headers: dict[str, str] | None = None, model: str = SERVED,
        max_tokens: int = 3) -> tuple[int, str | None]:  # fmt: skip
    """One streamed chat completion; (status, the model its chunks name when the stream ended with [DONE])."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    try:
        with client.stream("POST", f"{url}/chat/completions", json=body, headers=headers or {}) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, None
            models, done, tokens = set(), False, 0
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    models.add(chunk["model"])
                    tokens = chunk["usage"]["completion_tokens"]
            return 200, models.pop() if done and len(models) == 1 and tokens == max_tokens else None
    except httpx.HTTPError:
        return 0, None


def over(sock, method: str, path: str, body: dict | None = None, tls: bool = False) -> tuple[int, dict]:  # noqa: ANN001
    """One HTTP request over a socket ``connect`` returned (TLS without checking the certificate)."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    connection = http.client.HTTPConnection("127.0.0.1", timeout=10)
    connection.sock = sock
    connection.request(method, path, body=json.dumps(body) if body else None, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, data = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return status, data


def direct_model(serving: EmulatedServing, pod: str, port: int, tls: bool = False) -> str:
    status, answer = over(serving.connect(pod, port), "POST", "/v1/chat/completions",
                          {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, tls)  # fmt: skip
    assert status == 200, answer
    return answer["model"]


class PodLog:
    """Pod events as they happen: (type, pod, ready) in order."""

    def __init__(self, kube: Kube) -> None:
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        kube.watch("v1", "Pod", NS, None, self.events, self.stop)
        time.sleep(0.2)  # the watch is open before anything changes

    def seen(self) -> list[tuple[str, str, bool]]:
        out = []
        while not self.events.empty():
            event = self.events.get()
            if event.type != "ERROR":
                ready = conditions(event.object).get("Ready", {}).get("status") == "True"
                out.append((event.type, event.object["metadata"]["name"], ready))
        return out


def ready_pods(platform: KubernetesPlatform, layer: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in platform.pods(layer)
                  if conditions(p).get("Ready", {}).get("status") == "True")  # fmt: skip


def top(platform: KubernetesPlatform, layer: str) -> dict:
    return platform.kube.get(*platform.top_ref(layer))


def predictor_status(platform: KubernetesPlatform, layer: str) -> dict:
    return top(platform, layer)["status"]["components"]["predictor"]


def assert_status_follows_the_crd(obj: dict) -> None:
    """The status the test controller wrote uses the CRD's field names only (what the real controller writes)."""
    schema = bundled_crd_schemas()[(obj["apiVersion"], obj["kind"])]["properties"]["status"]
    jsonschema.validate(obj["status"], schema)
    assert list(unknown_fields(obj["status"], schema)) == []


def test_served_name_is_the_first_value_of_the_last_flag():
    assert served_names(["vllm", "serve", "/m", "--served-model-name", "a:v2", "a", "--port", "8000"]) == ["a:v2", "a"]
    assert served_names(["--served-model-name", "a", "--served-model-name=b"]) == ["b"]
    assert served_names(["vllm", "serve", "/m"]) == []
    main = {"name": "main", "args": ["--served-model-name", "base"],
            "env": [{"name": "VLLM_ADDITIONAL_ARGS", "value": "--dtype bfloat16 --served-model-name 'x:1' x"}]}  # fmt: skip
    assert served_names(engine_argv(main)) == ["x:1", "x"]


@pytest.mark.parametrize("layer,port,tls", [("raw", 8000, False), ("kserve-standard", 8000, False),
                                            ("kserve-knative", 8000, False), ("llm-d", 8000, True)])  # fmt: skip
def test_a_rollout_replaces_the_pods_in_the_strategys_order(cluster, tmp_path, layer, port, tls):
    with EmulatedServing(cluster.kube, NS, step_s=0.05) as serving:
        platform = platform_for(serving, "layers.kserve-knative.min_replicas=1")
        platform.ensure(layer, str(tmp_path))
        [old] = ready_pods(platform, layer)
        assert direct_model(serving, old, port, tls) == SERVED
        log = PodLog(cluster.kube)
        revised = platform.with_study(platform.study.revised({"max-model-len": 4096}, "v2"))
        revised.ensure(layer, str(tmp_path), keep_on_failure=True)
        events = log.seen()
        log.stop.set()
        [new] = ready_pods(platform, layer)
        assert new != old and cluster.kube.get("v1", "Pod", NS, old) is None
        created = next(i for i, e in enumerate(events) if e[:2] == ("ADDED", new))
        new_ready = next(i for i, e in enumerate(events) if e[1] == new and e[2])
        old_deleted = next(i for i, e in enumerate(events) if e[:2] == ("DELETED", old))
        if layer == "raw":  # Recreate: the old pod goes first, then the new one comes
            assert old_deleted < created
        else:  # the new pod is ready before the old one is deleted
            assert new_ready < old_deleted
        assert platform._ready(top(platform, layer))
        with pytest.raises(ConnectionRefusedError):
            serving.connect(old, port)
        assert direct_model(serving, new, port, tls) == f"{SERVED}:v2"
        with pytest.raises(ConnectionRefusedError):
            serving.connect(new, port + 1)  # nothing listens there
        assert not serving.controller.errors


def test_a_pod_deleted_mid_stream_resets_it_and_refuses_new_connections(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, step_s=0.02, token_delay_s=0.05) as serving:
        platform = platform_for(serving)
        platform.ensure("raw", str(tmp_path))
        [pod] = ready_pods(platform, "raw")
        sock = serving.connect(pod, 8000)
        result: dict = {}

        def stream() -> None:
            try:
                over(sock, "POST", "/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 100, "stream": True})  # fmt: skip
                result["outcome"] = "finished"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                result["outcome"] = type(exc).__name__

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.3)
        cluster.kube.delete("v1", "Pod", NS, pod)  # someone else deletes it: the kubelet stops its containers
        reader.join(10)
        assert result["outcome"] != "finished"
        deadline = time.monotonic() + 5
        while pod in serving.network.servers and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):
            serving.connect(pod, 8000)


def test_knative_canary_splits_traffic_and_reports_it(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, step_s=0.05, token_delay_s=0.0, seed=7) as serving:
        platform = platform_for(serving, "layers.kserve-knative.min_replicas=1")
        name = "qwen-cluster-kserve-knative"
        platform.ensure("kserve-knative", str(tmp_path))
        first = predictor_status(platform, "kserve-knative")
        assert first["traffic"] == [{"revisionName": f"{name}-predictor-00001", "percent": 100, "latestRevision": True}]
        assert first["latestRolledoutRevision"] == first["latestReadyRevision"] == f"{name}-predictor-00001"

        platform.ensure("kserve-knative", str(tmp_path), canary=Canary(25, {"max-model-len": 4096}, "canary"))
        status = predictor_status(platform, "kserve-knative")
        assert [(t["tag"], t["revisionName"], t["percent"], t["latestRevision"]) for t in status["traffic"]] == [
            ("latest", f"{name}-predictor-00002", 25, True), ("prev", f"{name}-predictor-00001", 75, False)]
        assert status["latestCreatedRevision"] == status["latestReadyRevision"] == f"{name}-predictor-00002"
        assert status["latestRolledoutRevision"] == f"{name}-predictor-00001"
        revisions = {p["metadata"]["labels"]["serving.knative.dev/revision"] for p in platform.pods("kserve-knative")}
        assert revisions == {f"{name}-predictor-00001", f"{name}-predictor-00002"}  # both revisions keep pods
        assert_status_follows_the_crd(top(platform, "kserve-knative"))

        endpoint = platform.endpoint("kserve-knative")
        with httpx.Client(trust_env=False, timeout=10) as client:
            answers = [ask(client, endpoint.base_url, endpoint.headers) for _ in range(400)]
        assert all(status == 200 for status, _ in answers)
        canary = sum(model == f"{SERVED}:canary" for _, model in answers)
        assert sum(model == SERVED for _, model in answers) + canary == 400
        assert 0.19 <= canary / 400 <= 0.31
        assert serving.requests_seen[f"{name}-predictor-00002"] == canary

        # Promoted: the same template without canaryTrafficPercent makes no new revision; it takes 100 %.
        promoted = platform.with_study(platform.study.revised({"max-model-len": 4096}, "canary"))
        promoted.ensure("kserve-knative", str(tmp_path))
        status = predictor_status(platform, "kserve-knative")
        assert status["traffic"] == [{"revisionName": f"{name}-predictor-00002", "percent": 100, "latestRevision": True}]
        assert status["latestRolledoutRevision"] == f"{name}-predictor-00002"
        assert status["previousRolledoutRevision"] == f"{name}-predictor-00001"
        assert {p["metadata"]["labels"]["serving.knative.dev/revision"] for p in platform.pods("kserve-knative")} == {
            f"{name}-predictor-00002"}
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert {ask(client, endpoint.base_url, endpoint.headers)[1] for _ in range(20)} == {f"{SERVED}:canary"}
        assert not serving.controller.errors


def test_knative_scales_to_zero_and_holds_the_first_request_until_a_pod_is_up(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, step_s=0.05, idle_s=0.4) as serving:
        platform = platform_for(serving)  # the example's Knative layer has min_replicas 0
        platform.ensure("kserve-knative", str(tmp_path))
        revision = "qwen-cluster-kserve-knative-predictor-00001"
        platform.wait_for_pods("kserve-knative", 0, timeout_s=10)
        assert platform._ready(top(platform, "kserve-knative"))  # Knative keeps it Ready at zero
        endpoint = platform.endpoint("kserve-knative")
        with httpx.Client(trust_env=False, timeout=10) as client:
            started = time.monotonic()
            assert ask(client, endpoint.base_url, endpoint.headers) == (200, SERVED)
            cold_s = time.monotonic() - started
            assert cold_s >= 4 * 0.05  # scheduled, pulled, started, ready: the request waited for all of it
            assert len(ready_pods(platform, "kserve-knative")) == 1
            started = time.monotonic()
            assert ask(client, endpoint.base_url, endpoint.headers) == (200, SERVED)
            assert time.monotonic() - started < cold_s / 2  # warm
        assert serving.requests_seen[revision] == 2
        assert f"Revision/{revision} scale from zero" in serving.controller.shown
        platform.wait_for_pods("kserve-knative", 0, timeout_s=10)  # idle again: back to zero
        assert not serving.controller.errors


def test_standard_mode_canary_predictor_takes_its_share(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, step_s=0.05, token_delay_s=0.0, seed=3) as serving:
        platform = platform_for(serving)
        name = "qwen-cluster-kserve-standard"
        platform.ensure("kserve-standard", str(tmp_path))
        platform.ensure("kserve-standard", str(tmp_path), canary=Canary(30, {"max-model-len": 4096}, "canary"))
        status = top(platform, "kserve-standard")["status"]
        assert [(t["revisionName"], t["percent"]) for t in status["components"]["predictor"]["traffic"]] == [
            (f"{name}-predictor", 70), (f"{name}-predictor-canary", 30)]
        assert status["canaryStatuses"] == [{"name": f"{name}-predictor-canary", "trafficPercent": 30, "ready": True}]
        assert_status_follows_the_crd(top(platform, "kserve-standard"))
        assert len(ready_pods(platform, "kserve-standard")) == 2
        endpoint = platform.endpoint("kserve-standard")
        with httpx.Client(trust_env=False, timeout=10) as client:
            models = [ask(client, endpoint.base_url, endpoint.headers)[1] for _ in range(300)]
        assert 0.23 <= models.count(f"{SERVED}:canary") / 300 <= 0.37 and models.count(None) == 0
        platform.ensure("kserve-standard", str(tmp_path))  # the canary removed: its pods go, all traffic back
        status = top(platform, "kserve-standard")["status"]
        assert "traffic" not in status["components"]["predictor"] and "canaryStatuses" not in status
        assert [p for p in ready_pods(platform, "kserve-standard") if "canary" in p] == []
        assert not serving.controller.errors


def test_raw_deployment_scales_to_zero_and_back_step_by_step(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, step_s=0.05) as serving:
        platform = platform_for(serving)
        platform.ensure("raw", str(tmp_path))
        [first] = ready_pods(platform, "raw")
        platform.scale("raw", 0)
        platform.wait_for_pods("raw", 0, timeout_s=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            deployment = top(platform, "raw")
            if deployment["status"].get("observedGeneration") == deployment["metadata"]["generation"]:
                break
            time.sleep(0.05)
        status = deployment["status"]
        assert deployment["spec"]["replicas"] == 0 and deployment["metadata"]["generation"] == 2
        assert "replicas" not in status and "readyReplicas" not in status  # zero counts are omitted
        assert conditions(deployment)["Available"]["status"] == "True"
        with pytest.raises(ConnectionRefusedError):
            serving.connect(first, 8000)
        since = time.time()
        platform.scale("raw", 1)
        marks = platform.wait_ready("raw", since)
        assert list(marks) == ["applied", "scheduled", "started", "ready", "image_pulled"]
        assert marks["ready"] - since >= 4 * 0.05 * 0.9
        [again] = ready_pods(platform, "raw")
        assert again != first and direct_model(serving, again, 8000) == SERVED


@pytest.mark.parametrize("layer", ["kserve-knative", "kserve-standard"])
def test_canary_never_ready(cluster, tmp_path, layer):
    with EmulatedServing(cluster.kube, NS, scenario="canary_never_ready", step_s=0.05, token_delay_s=0.0,
                         emulator=cluster.emulator) as serving:  # fmt: skip
        platform = platform_for(serving, "layers.kserve-knative.min_replicas=1")
        platform.ensure(layer, str(tmp_path))  # the first generation comes up fine
        with pytest.raises(LayerNotReadyError, match="CrashLoopBackOff"):
            platform.ensure(layer, str(tmp_path), canary=Canary(50, {"max-model-len": 4096}, "canary"),
                            keep_on_failure=True)  # fmt: skip
        time.sleep(0.3)  # the controller's last status lands
        isvc = top(platform, layer)
        assert not platform._ready(isvc)
        url, headers = platform.gateway_endpoint(layer)  # not ready, so by hand: status.url through the gateway
        with httpx.Client(trust_env=False, timeout=10) as client:
            answers = [ask(client, url, headers) for _ in range(100)]
        if layer == "kserve-knative":
            # Knative routes "latest" to the latest *ready* revision: everything stays on the old one.
            predictor = isvc["status"]["components"]["predictor"]
            name = "qwen-cluster-kserve-knative-predictor"
            assert predictor["latestCreatedRevision"] == f"{name}-00002"
            assert predictor["latestReadyRevision"] == f"{name}-00001"
            assert {t["revisionName"] for t in predictor["traffic"]} == {f"{name}-00001"}
            assert conditions(isvc)["Ready"]["status"] == "False" and conditions(isvc)["Ready"]["reason"] == "RevisionFailed"
            assert answers == [(200, SERVED)] * 100
        else:
            # The HTTPRoute's weight sends the canary's share to a Service without ready endpoints.
            assert isvc["status"]["canaryStatuses"][0]["ready"] is False
            failed = sum(status == 503 for status, _ in answers)
            assert 35 <= failed <= 65 and all(a == (200, SERVED) for a in answers if a[0] != 503)
        assert not serving.controller.errors


def test_scale_up_stall_leaves_new_pods_unschedulable(cluster, tmp_path):
    with EmulatedServing(cluster.kube, NS, scenario="scale_up_stall", step_s=0.05, idle_s=0.3,
                         activation_timeout_s=1.0) as serving:  # fmt: skip
        platform = platform_for(serving, "platform.unschedulable_grace_s=0.5")
        platform.ensure("raw", str(tmp_path))  # the first bring-up works
        platform.ensure("kserve-knative", str(tmp_path))
        platform.scale("raw", 0)
        platform.wait_for_pods("raw", 0, timeout_s=10)
        since = time.time()
        platform.scale("raw", 1)
        with pytest.raises(LayerNotReadyError, match="unschedulable: 0/3 nodes are available"):
            platform.wait_ready("raw", since)
        platform.wait_for_pods("kserve-knative", 0, timeout_s=10)
        endpoint = platform.endpoint("kserve-knative")
        with httpx.Client(trust_env=False, timeout=10) as client:
            started = time.monotonic()
            assert ask(client, endpoint.base_url, endpoint.headers) == (503, None)  # the activator gave up
            assert 1.0 <= time.monotonic() - started < 3
        [pod] = platform.pods("kserve-knative")
        assert conditions(pod)["PodScheduled"]["reason"] == "Unschedulable"
        assert not serving.controller.errors


def test_gateway_routes_by_host_and_costs_its_overhead(cluster, tmp_path, monkeypatch):
    with EmulatedServing(cluster.kube, NS, step_s=0.02, gateway_overhead_ms=15, token_delay_s=0.0) as serving:
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda platform, pod, port: serving.connector(pod, port))
        platform = platform_for(serving)
        platform.ensure("llm-d", str(tmp_path))
        paths = platform.paths("llm-d")
        direct, gateway = paths["direct"], paths["gateway"]
        assert direct.base_url.startswith("https://127.0.0.1:") and gateway.headers["Host"].startswith("qwen-cluster-llm-d.")
        timings: dict[str, list[float]] = {"direct": [], "gateway": []}
        with httpx.Client(trust_env=False, timeout=10, verify=False) as client:
            for _ in range(20):
                for label, endpoint in (("direct", direct), ("gateway", gateway)):
                    started = time.perf_counter()
                    assert ask(client, endpoint.base_url, endpoint.headers) == (200, SERVED)
                    timings[label].append(time.perf_counter() - started)
            models = client.get(f"{gateway.base_url}/models", headers=gateway.headers).json()
            assert [m["id"] for m in models["data"]] == [SERVED]
            unknown = client.get(f"{gateway.base_url}/models", headers={"Host": "nobody.servinglab.example.com"})
            assert unknown.status_code == 404
            scraped = server_metrics.parse(client.get(f"{direct.base_url.removesuffix('/v1')}/metrics").text)
        assert scraped["vllm:generation_tokens"] == 40 * 3 and scraped["vllm:e2e_request_latency_seconds"]["count"] == 40
        assert scraped["vllm:inter_token_latency_seconds"]["count"] == 40 * 2
        assert_status_follows_the_crd(top(platform, "llm-d"))
        median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        assert median["gateway"] - median["direct"] >= 0.010


def test_a_layer_deployed_again_after_teardown_owns_all_its_pods(cluster, tmp_path):
    """The garbage collector removes every dependent for good, so a namesake deployed next owns its pods."""
    with EmulatedServing(cluster.kube, NS, step_s=0.02) as serving:
        platform = platform_for(serving)
        for _ in range(3):
            platform.ensure("raw", str(tmp_path))
            platform.teardown(["raw"])
        assert cluster.kube.list("v1", "Pod", NS) == [] and cluster.kube.list("apps/v1", "ReplicaSet", NS) == []
        platform.ensure("raw", str(tmp_path))
        platform.scale("raw", 0)
        platform.wait_for_pods("raw", 0, timeout_s=10)
        assert not serving.controller.errors
