"""``servinglab run STUDY --only NOTEBOOK --run-dir RUN``: one notebook re-run into a finished run.

A notebook that measures running layers gets them deployed when they do not run with the study's spec, and
the invocation stops only what it started: a server that was already running and ready is reused and left
running. Every notebook is re-run on the local study against the session's one shared engine (no test here
starts another); deploying what is missing and stopping only that is shown on a cluster study, whose
layers start in the Kubernetes emulator, served by the test side's network, in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS, run_cli
from kube_emulator import EmulatedCluster, install_serving_stack
from kube_network import EmulatedServing

from servinglab import records

# The smallest work each notebook allows: one closed-loop stage of few prompts, no open-loop stage, and a
# lifecycle experiment the local platform refuses (recorded as such) rather than one that restarts the engine.
SMALL = ("workloads.latency.concurrency=[1]", "workloads.latency.min_prompts=2", "workloads.latency.num_warmups=0",
         "workloads.latency.rate_sweep.rates=[]", "workloads.lifecycle.experiments=[canary]")  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(engine) -> Path:
    """A run of the local study to add to, as a finished batch leaves it (the shared engine is up)."""
    from servinglab.api import run_context

    return records.create_run(engine.study.runs_dir, engine.study.study, run_context(engine.study) | {"status": "ok"})


def engine_pid(engine) -> int | None:
    entries = engine.platform.running()
    return entries[0].pid if entries else None


@pytest.mark.engine
@pytest.mark.parametrize("notebook", ["00_preflight", "10_deploy", "20_smoke", "30_latency", "40_lifecycle", "90_report"])
def test_only_reruns_a_notebook_and_leaves_the_running_engine_running(engine, finished_run, notebook):
    before = engine_pid(engine)
    assert before is not None
    sets = [arg for item in SMALL for arg in ("--set", item)]
    done = run_cli("run", str(PARAMS / "local.yaml"), "--only", notebook, "--run-dir", str(finished_run),
                   "--no-progress", *sets, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    context = json.loads((finished_run / "run.json").read_text())
    entry = next(n for n in context["notebooks"] if n["name"] == notebook)
    assert entry["status"] == "ok"
    # The engine that was running with the study's spec served this notebook and goes on running.
    assert engine_pid(engine) == before
    assert "teardown: " not in done.stdout
    segment = entry["params_segment"]
    deployed = [r for r in records.read(finished_run, records.DEPLOYMENTS).rows
                if r.get("params_segment") == segment and r["status"] == "ready"]  # fmt: skip
    assert all(r["reused"] for r in deployed), deployed
    if notebook in ("20_smoke", "30_latency", "40_lifecycle"):
        assert [(r["layer"], r["reused"]) for r in deployed] == [("raw", True)]  # ensured before it ran
        assert "raw: reused, already running with this spec" in done.stdout
    if notebook == "30_latency":
        assert "stage raw c=1: " in done.stdout
        stages = [s for s in records.read(finished_run, records.LATENCY_STAGES).rows if s.get("params_segment") == segment]
        assert [s["stage"] for s in stages] == ["c=1"]
    if notebook == "40_lifecycle":
        assert "lifecycle canary on raw, trial 1 of 1: unsupported: " in done.stdout


def test_only_deploys_what_the_notebook_needs_and_stops_only_that(tmp_path, monkeypatch):
    """On a cluster study with two layers, one already running: ``--only 20_smoke`` reuses that one, starts
    the other, checks both, and at its end deletes only the one it started."""
    from servinglab import api
    from servinglab.layers.common import MANAGED_BY
    from servinglab.platforms.kube import Kube, load_api_client

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with EmulatedCluster() as cluster:
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", kubeconfig)
        kube = Kube(load_api_client(kubeconfig))
        install_serving_stack(kube)
        with EmulatedServing(kube, "servinglab", step_s=0.05) as serving:
            study_file = tmp_path / "cluster.yaml"
            study_file.write_text(yaml.safe_dump({
                "study": "emulated",
                "platform": {"kind": "kubernetes", "namespace": "servinglab", "create_namespace": True,
                             "ready_timeout_s": 30, "endpoint": "gateway", "gateway_address": serving.gateway_address},
                "model": {"name": "qwen", "served_name": "qwen2.5-0.5b", "source": {"kind": "uri", "uri": "pvc://models/q"}},
                "layers": {"kserve": {"kind": "kserve", "mode": "Standard"}, "llm-d": {"kind": "llm-d"}},
                "workloads": {"smoke": {"prompt": "Say hello.", "max_tokens": 8}},
                "client": {"tls_verify": {"llm-d": False}},
                "paths": {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports"),
                          "cache_dir": str(tmp_path / "cache")},
            }, sort_keys=False))  # fmt: skip
            study_run = api.open_study(study_file)
            assert study_run.platform.ensure("kserve", str(study_run.run_dir)).status == "ready"
            done = run_cli("run", str(study_file), "--only", "20_smoke", "--run-dir", str(study_run.run_dir),
                           "--no-progress", timeout=600)  # fmt: skip
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            smoke = records.read(study_run.run_dir, records.SMOKE).rows
            assert {r["layer"] for r in smoke if r["check"] == "chat_completion_200" and r["passed"]} == {"kserve", "llm-d"}
            deployed = {r["layer"]: r["reused"] for r in records.read(study_run.run_dir, records.DEPLOYMENTS).rows}
            assert deployed == {"kserve": True, "llm-d": False}
            # The start of the layer it deployed was told phase by phase, then its teardown, and nothing else's.
            assert "llm-d: engine start: Ready after " in done.stdout
            assert "left running (not started by this invocation): kserve" in done.stdout
            left = kube.list("serving.kserve.io/v1beta1", "InferenceService", "servinglab", {MANAGED_BY: "servinglab"})
            assert [o["metadata"]["name"] for o in left] == ["emulated-kserve"]
            assert kube.list("serving.kserve.io/v1alpha2", "LLMInferenceService", "servinglab", {MANAGED_BY: "servinglab"}) == []
            study_run.platform.teardown()
