"""A fourth serving-layer kind, defined in the test tree alone (tests/fourth_kind.py) and registered through the
public hook: it is validated as study input, rendered and validated as objects, deployed and torn down on
the emulated cluster, refused by a lifecycle experiment it has no means for, and shown in the report under
a column of its own, with no change to any library file and nothing private patched."""

from __future__ import annotations

import json
from pathlib import Path

import fourth_kind
import pytest
from kube_controller import Controller

from servinglab import cli, layers, records, report
from servinglab.api import run_context
from servinglab.config import load_study
from servinglab.errors import ParamsError
from servinglab.experiments import deploy, lifecycle, preflight
from servinglab.platforms import get_platform
from servinglab.report.rundata import load_run
from servinglab.report.table import decision_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
NS = "servinglab"
TWIN = ["layers.twin={kind: vllm-twin, replicas: 1}", "platform.ready_timeout_s=20"]


@pytest.fixture
def twin():
    layers.register(fourth_kind.KIND)
    yield fourth_kind.KIND
    layers.unregister(fourth_kind.NAME)


def test_an_unknown_kind_is_an_error_and_a_registered_one_is_study_input(twin, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with pytest.raises(ParamsError, match=r"layers.twin.kind: unknown layer kind vllm-triplet; expected one of "
                                          r"raw-vllm, kserve, llm-d, vllm-twin"):  # fmt: skip
        load_study(EXAMPLE, ["layers.twin={kind: vllm-triplet}"])
    with pytest.raises(ParamsError, match=r"layers.twin.replicsa: unknown key \(did you mean 'replicas'\?\)"):
        load_study(EXAMPLE, ["layers.twin={kind: vllm-twin, replicsa: 2}"])
    study = load_study(EXAMPLE, TWIN)
    assert isinstance(study.layers["twin"], fourth_kind.TwinLayer)
    with pytest.raises(ParamsError, match="unknown layer kind 'vllm-quad'"):
        layers.get("vllm-quad")


def test_the_fourth_kind_renders_validated_objects(twin, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    assert cli.main(["render", str(EXAMPLE), "--layer", "twin", *(f"--set={s}" for s in TWIN)]) == 0
    out = capsys.readouterr().out
    assert "kind: Deployment\nmetadata:\n  name: qwen-cluster-twin-twin" in out
    assert "servinglab.io/layer: twin" in out and "servinglab.io/spec-hash:" in out


def test_deploy_refuse_report_and_teardown_on_the_emulated_cluster(twin, cluster, tmp_path):
    study = load_study(EXAMPLE, TWIN)
    platform = get_platform(study)
    run_dir = records.create_run(tmp_path / "runs", study.study, run_context(study) | {"status": "ok"})
    with Controller(cluster.kube, NS, step_s=0.05) as controller:
        preflight.run_preflight(study, platform, run_dir)
        [deployed] = deploy.deploy_layers(study, platform, run_dir, ["twin"])
        assert deployed["status"] == "ready" and deployed["kind"] == "vllm-twin", deployed
        # A new kind's pods are guarded like the built-ins': its NetworkPolicy comes without a line of its own.
        assert deployed["applied"] == ["NetworkPolicy/qwen-cluster-twin-ingress", "Deployment/qwen-cluster-twin-twin",
                                       "Service/qwen-cluster-twin-twin"]  # fmt: skip
        assert platform.status()[0]["where"] == "Deployment/qwen-cluster-twin-twin in servinglab"
        [refused] = lifecycle.run_lifecycle(study, platform, run_dir, ["twin"], ["canary"])
        assert (refused["status"], refused["refused_by"]) == ("unsupported", "layer")
        assert refused["reason"] == "the twin has no traffic split: it is one Deployment"
        stopped = platform.teardown(["twin"])
    assert sorted(stopped) == ["Deployment/qwen-cluster-twin-twin", "NetworkPolicy/qwen-cluster-twin-ingress",
                               "Service/qwen-cluster-twin-twin"]  # fmt: skip
    assert not controller.errors
    assert cluster.kube.get("apps/v1", "Deployment", NS, "qwen-cluster-twin-twin") is None

    recorded = records.read_manifest(records.manifest_path(run_dir, "twin"))
    assert [o["kind"] for o in recorded] == ["NetworkPolicy", "Deployment", "Service"]
    context = json.loads((run_dir / "run.json").read_text())
    assert context["layer_kinds"]["vllm-twin"]["column"] == "vLLM twin"
    table = decision_table(load_run(run_dir))
    assert ("vLLM twin", 1) in table.groups
    cells = table.cells()
    assert cells["rollout_canary"]["twin"].status == "observed"
    assert cells["rollout_canary"]["twin"].text == "no traffic split: the twin has no traffic split: it is one Deployment"
    assert cells["what_you_write"]["twin"].text.startswith("you write 3 objects (Deployment, NetworkPolicy, Service)")
    html = report.render_html(run_dir)
    assert ">vLLM twin</th>" in html and "The twin&#39;s claim for rollout_canary." in html

    # The run recorded what the kind was: the report reads it without the kind registered.
    layers.unregister(fourth_kind.NAME)
    assert report.render_html(run_dir) == html
