"""00_preflight, 10_deploy and 20_smoke, unchanged, on a cluster study.

The Kubernetes API is the emulator (with the test-side controller); the layers' gateway address is the
shared real vLLM server, so the smoke checks talk to a real engine through the path a cluster's
gateway would give them (status.url's host in the Host header).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from kube_controller import Controller
from kube_emulator import EmulatedCluster, install_serving_stack

from servinglab.layers.common import MANAGED_BY
from servinglab.platforms.kube import Kube, load_api_client

pytestmark = pytest.mark.engine


def test_preflight_deploy_and_smoke_notebooks_on_a_cluster_study(engine, tmp_path):
    address = engine.deployment.base_url.removeprefix("http://").removesuffix("/v1")
    study_file = tmp_path / "cluster.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": "emulated",
        "platform": {"kind": "kubernetes", "namespace": "servinglab", "create_namespace": True, "ready_timeout_s": 60,
                     "endpoint": "gateway", "gateway_address": address},
        "model": {"name": "tiny", "served_name": engine.study.model.served_name,
                  "source": {"kind": "uri", "uri": "pvc://models/tiny"}},
        "layers": {"kserve": {"kind": "kserve", "mode": "Standard"}, "llm-d": {"kind": "llm-d"}},
        "workloads": {"smoke": {"prompt": "Say hello.", "max_tokens": 8}},
        "run": {"notebooks": ["00_preflight", "10_deploy", "20_smoke"]},
    }, sort_keys=False))  # fmt: skip
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"paths": {"runs_dir": str(tmp_path / "runs"),
                                                   "reports_dir": str(tmp_path / "reports"),
                                                   "cache_dir": str(tmp_path / "cache")}}))  # fmt: skip
    with EmulatedCluster() as cluster:
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        kube = Kube(load_api_client(kubeconfig))
        install_serving_stack(kube)
        with Controller(kube, "servinglab", step_s=0.05):
            done = run_cli("run", str(study_file), "--no-progress", env_overrides=overrides,
                           extra_env={"KUBECONFIG": kubeconfig}, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run_dir = (tmp_path / "runs" / "emulated" / "latest").resolve()
        preflight = json.loads((run_dir / "data" / "preflight.jsonl").read_text().splitlines()[0])
        assert preflight["facts"]["cluster"]["gpus"]["total"] == 2
        assert all(layer["hostable"] for layer in preflight["layers"])
        deployments = [json.loads(line) for line in (run_dir / "data" / "deployments.jsonl").read_text().splitlines()]
        assert {d["layer"]: d["status"] for d in deployments} == {"kserve": "ready", "llm-d": "ready"}
        phases = {d["layer"]: sorted(d["phases_s"]) for d in deployments}
        assert phases == {layer: ["container_start_s", "engine_ready_s", "image_pull_s", "scheduling_s"]
                          for layer in ("kserve", "llm-d")}  # fmt: skip
        smoke = [json.loads(line) for line in (run_dir / "data" / "smoke.jsonl").read_text().splitlines()]
        passed = {(r["layer"], r["check"]) for r in smoke if r["passed"]}
        assert {("kserve", "chat_completion_200"), ("llm-d", "chat_completion_200"),
                ("kserve", "models_lists_served_name")} <= passed  # fmt: skip
        assert all(r["passed"] for r in smoke), [r for r in smoke if not r["passed"]]
        # The batch tore the study down: nothing labelled is left on the cluster.
        left = kube.list("serving.kserve.io/v1beta1", "InferenceService", "servinglab", {MANAGED_BY: "servinglab"})
        left += kube.list("serving.kserve.io/v1alpha2", "LLMInferenceService", "servinglab", {MANAGED_BY: "servinglab"})
        assert left == []
        executed = json.loads((run_dir / "notebooks" / "20_smoke.ipynb").read_text())
        assert "gateway" in json.dumps(executed["cells"])  # the notebook says which path the requests took


@pytest.mark.timeout(600)
def test_lifecycle_notebook_runs_every_experiment_on_a_cluster_study(tmp_path, monkeypatch):
    """40_lifecycle, unchanged, through `servinglab run`: every experiment on every layer that has it.

    The controllers and the gateway are the test side's (tests/kube_network.py); the notebook's kernel
    reaches pods through a relay that stands in for the API server's port-forward.
    """
    from forward_relay import ENV, Relay
    from kube_network import EmulatedServing

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with EmulatedCluster() as cluster:
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        kube = Kube(load_api_client(kubeconfig))
        install_serving_stack(kube)
        with EmulatedServing(kube, "servinglab", step_s=0.05, idle_s=0.5, gateway_overhead_ms=5.0) as serving:
            relay = Relay(serving.connect)
            study_file = tmp_path / "cluster.yaml"
            study_file.write_text(yaml.safe_dump({
                "study": "emulated",
                "platform": {"kind": "kubernetes", "namespace": "servinglab", "create_namespace": True,
                             "ready_timeout_s": 30, "endpoint": "gateway", "gateway_address": serving.gateway_address},
                "model": {"name": "qwen", "served_name": "qwen2.5-0.5b", "source": {"kind": "uri", "uri": "pvc://models/q"}},
                "layers": {"raw": {"kind": "raw-vllm"}, "kserve-knative": {"kind": "kserve", "mode": "Knative", "min_replicas": 0},
                           "kserve-standard": {"kind": "kserve", "mode": "Standard"}, "llm-d": {"kind": "llm-d"}},
                "workloads": {"lifecycle": {"repeats": 2, "baseline_s": 0.6, "steady_rate": 20, "canary_requests": 200,
                                            "hop_requests": 20, "warm_requests": 3, "scale_to_zero_timeout_s": 30}},
                "costs": {"gpu_hourly": 0.7},
                # llm-d's workload serves a certificate of its own, as on a cluster: the study says so by name.
                "client": {"tls_verify": {"llm-d": False}},
                "run": {"notebooks": ["00_preflight", "10_deploy", "40_lifecycle"]},
                "paths": {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports"),
                          "cache_dir": str(tmp_path / "cache")},
            }, sort_keys=False))  # fmt: skip
            try:
                done = run_cli("run", str(study_file), "--no-progress", timeout=540, extra_env={
                    "KUBECONFIG": kubeconfig, ENV: relay.address,
                    "PYTHONPATH": str(relay.site_folder(tmp_path / "site"))})  # fmt: skip
            finally:
                relay.close()
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run_dir = (tmp_path / "runs" / "emulated" / "latest").resolve()
        outcomes = [json.loads(line) for line in (run_dir / "data" / "lifecycle.jsonl").read_text().splitlines()]
        measured = {(r["layer"], r["experiment"]) for r in outcomes if r["status"] == "measured"}
        assert measured == {
            *((layer, e) for layer in ("raw", "kserve-knative", "kserve-standard", "llm-d")
              for e in ("time_to_ready", "model_update")),
            ("kserve-knative", "canary"), ("kserve-standard", "canary"),
            ("kserve-knative", "scale_to_zero"), ("raw", "scale_to_zero"),
            ("kserve-knative", "gateway_hop"), ("kserve-standard", "gateway_hop"), ("llm-d", "gateway_hop"),
        }  # fmt: skip
        assert all(r["status"] == "unsupported" and r["reason"] for r in outcomes if (r["layer"], r["experiment"]) not in measured)
        executed = json.dumps(json.loads((run_dir / "notebooks" / "40_lifecycle.ipynb").read_text())["cells"])
        assert "canaryTrafficPercent (Knative)" in executed and "spec.canary with trafficPercent" in executed
        assert "cost_per_1k_requests" not in executed  # no latency stage in this batch: no load-point cost
        assert "idle_cost_per_month" in executed
        # The batch tore everything down.
        assert kube.list("apps/v1", "Deployment", "servinglab", {MANAGED_BY: "servinglab"}) == []
