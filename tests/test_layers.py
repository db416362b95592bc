"""Layer renderers and validation of what they render, with no cluster."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from servinglab import cli
from servinglab.config import load_study
from servinglab.errors import ParamsError, UnsupportedLayerError
from servinglab.layers.common import HASH_LABEL, MANAGED_BY, RUN_ANNOTATION, Canary
from servinglab.layers.render import render_layer, render_study, to_yaml
from servinglab.layers.validate import ManifestError, bundled_crd_schemas, validate_objects

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
GOLDEN = Path(__file__).parent / "golden" / "layers"


@pytest.fixture(autouse=True)
def _no_override_file(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)


def study(*overrides: str):
    return load_study(EXAMPLE, list(overrides))


def workload(*args, **kwargs) -> list[dict]:
    """A layer's own objects, without the NetworkPolicy that guards them (tested in tests/hostile)."""
    return [o for o in render_layer(*args, **kwargs) if o["kind"] != "NetworkPolicy"]


@pytest.mark.parametrize("layer", ["raw", "kserve-standard", "kserve-knative", "llm-d"])
def test_golden(layer):
    """The example study renders exactly the reviewed manifests (SERVINGLAB_UPDATE_GOLDEN=1 rewrites them)."""
    text = to_yaml(render_layer(study(), layer))
    golden = GOLDEN / f"{layer}.yaml"
    if os.environ.get("SERVINGLAB_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


VARIANTS = list(
    itertools.product(
        ["platform.gpus=1", "platform.gpus=0"],
        ["model.source.uri=pvc://models/qwen", "model.source.uri=hf://Qwen/Qwen2.5-0.5B-Instruct",
         "model.source.uri=oci://registry.example/models/qwen:1.0"],  # fmt: skip
        ["platform.api_key_secret=null", "platform.api_key_secret=vllm-key"],
    )
)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(x.split(".")[-1] for x in v))
def test_every_layer_validates_in_every_variant(variant):
    s = study(*variant, "platform.staging_image=python:3.12-slim" if "hf://" in variant[1] else "platform.node_selector={}")
    for name, objects in render_study(s, run_id="20260101T000000Z").items():
        validate_objects(objects, s.platform.kubernetes_version)


@pytest.mark.parametrize(
    "mode,predictor,canary",
    [(m, p, c) for m in ("Standard", "Knative") for p in ("custom", "runtime") for c in (None, 20)],
)
def test_kserve_options_validate(mode, predictor, canary):
    s = study(f"layers.kserve-standard.mode={mode}", f"layers.kserve-standard.predictor={predictor}")
    objects = workload(s, "kserve-standard", canary=Canary(canary, {"max-model-len": 4096}) if canary else None)
    validate_objects(objects, "1.33")
    isvc = objects[-1]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == mode
    predictor_spec = isvc["spec"]["predictor"]
    resources = (predictor_spec.get("model") or predictor_spec["containers"][0])["resources"]
    assert resources["limits"]["cpu"] == "4"  # explicit: KServe would default the CPU limit to 1
    if predictor == "runtime":
        assert objects[0]["kind"] == "ServingRuntime" and predictor_spec["model"]["runtime"] == objects[0]["metadata"]["name"]
    if canary and mode == "Knative":
        assert predictor_spec["canaryTrafficPercent"] == 20 and "canary" not in isvc["spec"]
    if canary and mode == "Standard":
        assert isvc["spec"]["canary"][0]["trafficPercent"] == 20 and "canaryTrafficPercent" not in predictor_spec


@pytest.mark.parametrize("version,scheduler", [(v, s) for v in ("v1alpha1", "v1alpha2") for s in (True, False)])
def test_llm_d_versions_validate(version, scheduler):
    s = study(f"layers.llm-d.api_version={version}", f"layers.llm-d.scheduler={str(scheduler).lower()}")
    (llmisvc,) = workload(s, "llm-d")
    validate_objects([llmisvc], "1.33")
    assert llmisvc["apiVersion"] == f"serving.kserve.io/{version}"
    assert ("scheduler" in llmisvc["spec"]["router"]) is scheduler
    engine_args = {e["name"]: e["value"] for e in llmisvc["spec"]["template"]["containers"][0]["env"] if "value" in e}
    assert engine_args["VLLM_ADDITIONAL_ARGS"] == "--dtype bfloat16 --max-model-len 8192 --gpu-memory-utilization 0.6"


def test_misspelt_kserve_field_is_rejected_though_the_crd_schema_allows_it():
    (isvc,) = workload(study(), "kserve-knative")
    isvc["spec"]["predictor"]["canaryTraficPercent"] = 10
    schema = bundled_crd_schemas()[("serving.kserve.io/v1beta1", "InferenceService")]
    # A plain JSON-schema check lets it through: the CRD does not forbid unknown fields.
    jsonschema.Draft7Validator(schema).validate({k: v for k, v in isvc.items() if k != "metadata"})
    with pytest.raises(ManifestError) as caught:
        validate_objects([isvc], "1.33")
    (problem,) = caught.value.problems
    assert problem.path == ".spec.predictor" and "canaryTraficPercent" in problem.reason
    assert "InferenceService/qwen-cluster-kserve-knative .spec.predictor" in str(caught.value)


def test_wrong_type_and_builtin_unknown_field_are_rejected_with_their_paths():
    (isvc,) = workload(study(), "kserve-standard")
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    deployment = next(o for o in workload(study(), "raw") if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(ManifestError) as caught:
        validate_objects([isvc, deployment], "1.33")
    found = {(p.kind, p.path) for p in caught.value.problems}
    assert ("InferenceService", ".spec.predictor.minReplicas") in found
    assert ("Deployment", ".spec.template.spec.containers[0]") in found


def test_fields_under_preserve_unknown_fields_are_accepted():
    (llmisvc,) = workload(study(), "llm-d")
    llmisvc["spec"]["model"]["lora"] = {"adapters": [{"name": "a", "anything": {"nested": True}}]}
    validate_objects([llmisvc], "1.33")


def test_run_id_is_an_annotation_only_and_the_hash_follows_the_spec():
    first = render_layer(study(), "raw", run_id="run-1")
    second = render_layer(study(), "raw", run_id="run-2")
    deployment = next(o for o in first if o["kind"] == "Deployment")
    assert deployment["metadata"]["annotations"][RUN_ANNOTATION] == "run-1"
    assert RUN_ANNOTATION not in (deployment["spec"]["template"]["metadata"].get("annotations") or {})
    assert "run-1" not in yaml.safe_dump(deployment["spec"])  # neither the pod template nor the selector
    assert HASH_LABEL not in deployment["spec"]["selector"]["matchLabels"]
    for a, b in zip(first, second):
        assert a["metadata"]["labels"] == b["metadata"]["labels"] and a["spec"] == b["spec"]
    changed = render_layer(study("model.engine_args.max-model-len=4096"), "raw")
    assert changed[0]["metadata"]["labels"][HASH_LABEL] != first[0]["metadata"]["labels"][HASH_LABEL]
    for obj in first:
        assert obj["metadata"]["labels"][MANAGED_BY] == "servinglab"


def test_raw_vllm_deployment_details():
    objects = workload(study("model.source.uri=hf://Qwen/Qwen2.5-0.5B-Instruct", "platform.staging_image=hfcli:1.0"), "raw")
    kinds = [o["kind"] for o in objects]
    assert kinds == ["PersistentVolumeClaim", "Deployment", "Service"]
    pod = objects[1]["spec"]["template"]["spec"]
    assert objects[1]["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"medium": "Memory", "sizeLimit": "2Gi"} == next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert pod["initContainers"][0]["command"][:3] == ["hf", "download", "Qwen/Qwen2.5-0.5B-Instruct"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert {"HOME", "USER", "HF_HUB_OFFLINE"} <= env
    cpu_only = workload(study("platform.gpus=0"), "raw")[0]
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu_only) and cpu_only["spec"]["strategy"]["type"] == "RollingUpdate"
    with pytest.raises(UnsupportedLayerError, match="no traffic split"):
        render_layer(study(), "raw", canary=Canary(10))


def test_bad_study_values_stop_with_the_key():
    with pytest.raises(ParamsError, match="platform.image"):
        study("platform.image=vllm/vllm-openai:latest")
    with pytest.raises(ParamsError, match="shorten the study or layer name"):
        render_layer(study("study=a-very-long-study-name-for-a-cluster"), "kserve-standard")


def test_render_cli(tmp_path, capsys):
    assert cli.main(["render", str(EXAMPLE)]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted({d["kind"] for d in documents}) == ["Deployment", "InferenceService", "LLMInferenceService",
                                                      "NetworkPolicy", "Service"]  # fmt: skip
    assert cli.main(["render", str(EXAMPLE), "--out", str(tmp_path), "--layer", "raw"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["raw.yaml"]
    assert cli.main(["render", str(REPO / "params" / "local.yaml")]) == cli.EXIT_BAD_INPUT
    assert "render needs kubernetes" in capsys.readouterr().err


def test_wrong_builtin_type_is_reported_with_its_path():
    bad = copy.deepcopy(workload(study(), "raw"))
    bad[0]["spec"]["replicas"] = "two"
    with pytest.raises(ManifestError, match=r"Deployment/qwen-cluster-raw \.spec\.replicas"):
        validate_objects(bad, "1.33")
