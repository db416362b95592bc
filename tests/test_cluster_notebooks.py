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

from servinglab.layers import MANAGED_BY
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
