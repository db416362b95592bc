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


def _stages(run: Path, segment: int, ttft_ms: float, concurrencies: tuple[int, ...]) -> None:
    """Closed-loop stages recorded under a params segment, as 30_latency records them there."""
    from synthetic import closed_stage

    with records.writing_under_segment(segment):
        for c in concurrencies:
            stage, rows = closed_stage("raw", c, ttft_ms, 1000.0 * c)
            stage_id = f"segment{segment}-c{c}"  # each measurement its own, as a real sweep's uuid is
            records.append(run, records.LATENCY_REQUESTS, [r | {"stage_id": stage_id} for r in rows], provenance="synthetic")
            records.append(run, records.LATENCY_STAGES, [stage | {"stage_id": stage_id}], provenance="synthetic")


def test_stages_measured_with_other_parameters_are_kept_apart_in_the_report(tmp_path):
    """A run of two invocations (the batch, then ``--only 30_latency --set workloads.latency.input_len=512``
    into it) and a third that changed nothing: the report's tables, figures and verdicts read the stages of
    the run's own parameters, and the second invocation's stages appear apart, labelled with the change."""
    from servinglab import report
    from servinglab.api import run_context
    from servinglab.config import load_study
    from servinglab.report.rundata import load_run
    from servinglab.report.table import decision_table

    def freeze(run: Path, sets: list[str]) -> int:
        study = load_study(PARAMS / "ci.yaml", sets)
        return records.freeze_params(run, {"study_file": str(study.source_file), "sources": study.sources,
                                           "overrides": sets, "only": None, "params": study.resolved()})[0]  # fmt: skip

    def make(root: Path, later: bool) -> Path:
        study = load_study(PARAMS / "ci.yaml")
        run = records.create_run(root, "ci", run_context(study) | {"status": "ok"})
        _stages(run, freeze(run, []), 10.0, (1, 4))
        if later:
            _stages(run, freeze(run, ["workloads.latency.input_len=512"]), 500.0, (1, 4))
            _stages(run, freeze(run, []), 12.0, (16,))  # --only 30_latency again, parameters unchanged
        return run

    run_dir = make(tmp_path / "two", later=True)
    run = load_run(run_dir)
    assert [(s["stage"], s["params_segment"]) for s in run.latency_stages] == [("c=1", 1), ("c=4", 1), ("c=16", 3)]
    assert [(g.segment, g.changes, [s["stage"] for s in g.stages]) for g in run.stages_apart] == [
        (2, ["workloads.latency.input_len=512"], ["c=1", "c=4"])]
    assert run.stages_apart[0].label == "params segment 2: workloads.latency.input_len=512"
    assert {r["stage_id"] for r in run.latency_requests} == {"segment1-c1", "segment1-c4", "segment3-c16"}

    # The verdicts are those of the run's own parameters: the same as with segment 2 never measured.
    alone = make(tmp_path / "one", later=False)
    _stages(alone, freeze(alone, []), 12.0, (16,))
    assert [[c.text for c in cells] for _, cells in decision_table(run).rows] == \
        [[c.text for c in cells] for _, cells in decision_table(load_run(alone)).rows]  # fmt: skip

    html = report.render_html(run_dir)
    main_table = html.split('id="latency-stages"', 1)[1].split("</table>", 1)[0]
    assert main_table.count("<tr><td>raw</td>") == 3
    assert "Measured with other parameters: params segment 2: workloads.latency.input_len=512" in html
    apart = html.split('id="latency-stages-segment-2"', 1)[1].split("</table>", 1)[0]
    assert apart.count("<tr><td>raw</td>") == 2 and "500.0" in apart
