"""A fourth serving-layer kind, written in the test tree alone and registered through the public hook, the
way a plug-in adds one: vLLM as a plain Deployment (a variant of raw vLLM under another name), with its
own options, renderer, references, lifecycle answers, cost rule and claims. Nothing in servinglab's
library names it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from servinglab.config import LayerConfig, Study
from servinglab.layers import LayerKind, Mechanism, ObjectRef, Refusal
from servinglab.layers import common as c

NAME = "vllm-twin"
PORT = 8000


class TwinLayer(LayerConfig):
    """vLLM as one Deployment and its Service, as a team might standardise it."""

    kind: Literal["vllm-twin"]
    replicas: int = Field(1, ge=1)


class VllmTwin(LayerKind):
    name = NAME
    config = TwinLayer
    title = "vLLM twin (a test's own kind)"
    column = "vLLM twin"
    scales_by_hand = True
    engine_containers = {"engine": PORT}
    claims = {key: f"The twin's claim for {key}." for key in (
        "what_you_write", "model_lifecycle", "rollout_canary", "scale_to_zero", "ingress_url", "multi_model", "control",
        "prereqs", "confirmed")}  # fmt: skip

    def render(self, study: Study, layer_name: str, canary: Any = None) -> list[dict[str, Any]]:
        if canary is not None:
            raise ValueError("the twin has no traffic split")
        settings = c.cluster_settings(study)
        layer = c.options(study, layer_name, TwinLayer)
        name = c.object_name(study, layer_name, "-twin")
        where = c.model_location(study)
        container = {
            **c.serve_container("engine", study, f"/models/{where.claim_path}", PORT, c.engine_args(study)),
            "env": c.engine_env(settings, [{"name": "HF_HUB_OFFLINE", "value": "1"}]),
            "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
            "resources": c.resources(settings),
            **c.health_probes(settings, "http"),
            "volumeMounts": [{"name": "weights", "mountPath": "/models", "readOnly": True}],
            "securityContext": c.container_security(),
        }
        pod = {"securityContext": c.pod_security(settings), "containers": [container],
               "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": where.claim, "readOnly": True}}]}  # fmt: skip
        selector = c.selector_labels(study, layer_name)
        return [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": c.metadata(study, layer_name, name),
             "spec": {"replicas": layer.replicas, "selector": {"matchLabels": selector},
                      "template": {"metadata": {"labels": c.labels(study, layer_name)}, "spec": pod}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": c.metadata(study, layer_name, name),
             "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}},
        ]  # fmt: skip

    def top_ref(self, study: Study, layer_name: str) -> ObjectRef:
        return ObjectRef("apps/v1", "Deployment", c.object_name(study, layer_name, "-twin"))

    def pod_selector(self, study: Study, layer_name: str) -> dict[str, str]:
        return c.selector_labels(study, layer_name)

    def in_cluster_url(self, study: Study, layer_name: str) -> str:
        name = c.object_name(study, layer_name, "-twin")
        return f"http://{name}.{c.cluster_settings(study).namespace}.svc.cluster.local:{PORT}/v1"

    def mechanism(self, study: Study, layer_name: str, experiment: str) -> Mechanism | Refusal:
        if experiment == "canary":
            return Refusal("the twin has no traffic split: it is one Deployment", "layer")
        if experiment == "model_update":
            return Mechanism("Deployment rollout (the twin's)", replaces_in_place=False)
        return super().mechanism(study, layer_name, experiment)


KIND = VllmTwin()
