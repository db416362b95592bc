"""llm-d: a KServe ``LLMInferenceService`` on one node, with or without the inference scheduler."""

from __future__ import annotations

import shlex
from typing import Any, Literal

from pydantic import Field

from ..config import INT32_MAX, LayerConfig, Study
from ..errors import UnsupportedLayerError
from . import NEEDS_CLUSTER, LayerKind, Mechanism, NetworkPeer, ObjectRef, Refusal, ResourceType, register
from . import common as c


class LlmdLayer(LayerConfig):
    """A KServe ``LLMInferenceService`` (llm-d)."""

    kind: Literal["llm-d"]
    api_version: Literal["v1alpha1", "v1alpha2"] = "v1alpha2"
    scheduler: bool = Field(True, description="route through the inference scheduler")
    replicas: int = Field(1, ge=1, le=INT32_MAX)


def render(study: Study, layer_name: str, canary: c.Canary | None = None) -> list[dict[str, Any]]:
    if canary is not None:
        raise UnsupportedLayerError(
            f"layers.{layer_name}: LLMInferenceService has no traffic split of its own; "
            "a canary needs a second service and a weighted HTTPRoute"
        )
    settings = c.cluster_settings(study)
    layer = c.options(study, layer_name, LlmdLayer)
    scratch, mounts = c.scratch_volumes(settings)
    # KServe's well-known config runs `vllm serve` itself; extra engine arguments travel in this variable.
    argv = c.engine_args(study, served_names=True)
    extra = [{"name": "VLLM_ADDITIONAL_ARGS", "value": shlex.join(argv)}] if argv else []
    container = {
        "name": "main",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": c.engine_env(settings, extra),
        "resources": c.resources(settings),
        "volumeMounts": mounts,
        "securityContext": c.container_security(),
    }
    template: dict[str, Any] = {"containers": [container], "volumes": scratch, **c.without_api_token(),
                                "securityContext": c.pod_security(settings)}  # fmt: skip
    if settings.node_selector:
        template["nodeSelector"] = dict(settings.node_selector)
    if tolerations := c.tolerations(settings):
        template["tolerations"] = tolerations
    gateway: dict[str, Any] = {}
    if settings.gateway:
        namespace, _, gw = settings.gateway.rpartition("/")
        gateway = {"refs": [{"name": gw, "namespace": namespace or settings.namespace}]}
    router: dict[str, Any] = {"route": {}, "gateway": gateway}
    if layer.scheduler:
        router["scheduler"] = {}
    return [
        {
            "apiVersion": f"serving.kserve.io/{layer.api_version}",
            "kind": "LLMInferenceService",
            "metadata": c.metadata(study, layer_name, c.object_name(study, layer_name)),
            "spec": {
                "model": {"uri": c.model_location(study).uri, "name": study.model.served_name},
                "replicas": layer.replicas,
                "template": template,
                "router": router,
            },
        }
    ]


LLM_INFERENCE_SERVICE = ResourceType("LLMInferenceService", "llminferenceservices",
                                     ("serving.kserve.io/v1alpha2", "serving.kserve.io/v1alpha1"))  # fmt: skip
CRD = "llminferenceservices.serving.kserve.io"


class Llmd(LayerKind):
    name = "llm-d"
    config = LlmdLayer
    title = "LLMInferenceService (llm-d)"
    column = "LLMInferenceService (llm-d)"
    has_gateway = True
    serves_tls = True  # KServe's LLMInferenceService runs vLLM with TLS, with a certificate of its own
    engine_containers = {"main": c.ENGINE_PORT}
    resources = (LLM_INFERENCE_SERVICE,)
    crds = {
        CRD: "KServe LLMInferenceService",
        "gateways.gateway.networking.k8s.io": "Gateway API",
        "httproutes.gateway.networking.k8s.io": "Gateway API HTTPRoute",
        "inferencepools.inference.networking.k8s.io": "Gateway API Inference Extension",
        "inferencepools.inference.networking.x-k8s.io": "Gateway API Inference Extension (x-k8s.io)",
    }
    controllers = ("llmisvc-controller-manager",)
    component = {"tool": "llm-d", "resource": "LLMInferenceService"}
    control_plane = ("kserve", "llm-d")
    claims = {
        "what_you_write": "You write one LLMInferenceService; the controller makes workloads and routing.",
        "model_lifecycle": "Declarative, through the LLMInferenceService spec.",
        "rollout_canary": "No claim on the source page.",
        "scale_to_zero": "No claim on the source page.",
        "ingress_url": "Routed by the inference gateway's KV-aware scheduler.",
        "multi_model": "One resource shape for every model.",
        "control": "KServe's controller plus the inference gateway and scheduler.",
        "prereqs": "KServe's LLMInferenceService controller and the Gateway API inference extension.",
        "confirmed": "No claim on the source page.",
        "routing": "KV-aware routing: the scheduler sends a request to the replica that holds its prefix.",
    }

    def render(self, study: Study, layer_name: str, canary: Any = None) -> list[dict[str, Any]]:
        return render(study, layer_name, canary)

    def top_ref(self, study: Study, layer_name: str) -> ObjectRef:
        layer = c.options(study, layer_name, LlmdLayer)
        return ObjectRef(f"serving.kserve.io/{layer.api_version}", "LLMInferenceService", c.object_name(study, layer_name))

    def pod_selector(self, study: Study, layer_name: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": c.object_name(study, layer_name), "kserve.io/component": "workload"}

    def network_peers(self, study: Study, layer_name: str) -> list[NetworkPeer]:
        """The gateway, whose proxies send to the pod the scheduler picks, and the scheduler itself (the
        endpoint picker scrapes every pod's metrics), labelled as KServe's controller labels it."""
        peers = c.gateway_peers(study)
        if c.options(study, layer_name, LlmdLayer).scheduler:
            peers.append(NetworkPeer("llm-d's endpoint picker (the inference scheduler)", {
                "app.kubernetes.io/component": "llminferenceservice-router-scheduler",
                "app.kubernetes.io/name": c.object_name(study, layer_name),
                "app.kubernetes.io/part-of": "llminferenceservice"}))  # fmt: skip
        return peers

    def routing(self, study: Study, layer_name: str) -> dict[str, str]:
        # The workload Service (the in-cluster URL) reaches the pods without the scheduler: only the gateway
        # path carries llm-d's routing.
        if c.options(study, layer_name, LlmdLayer).scheduler:
            return {"gateway": "the gateway through llm-d's inference scheduler (prefix-cache aware)"}
        return {"gateway": "the gateway's route to the workload, without a scheduler (scheduler: false)"}

    def in_cluster_url(self, study: Study, layer_name: str) -> str:
        name, namespace = c.object_name(study, layer_name), c.cluster_settings(study).namespace
        return f"https://{name}-kserve-workload-svc.{namespace}.svc.cluster.local:{c.ENGINE_PORT}/v1"

    def adapt_to_cluster(self, layer: LayerConfig, checks: dict[str, Any]) -> None:
        """A study that leaves ``api_version`` unset uses what the cluster serves, v1alpha2 first."""
        spec = c.own(layer, LlmdLayer)
        served = checks.get("crds", {}).get(CRD) or []
        if "api_version" not in spec.model_fields_set and served and spec.api_version not in served:
            spec.api_version = "v1alpha2" if "v1alpha2" in served else served[-1]

    def required_crds(self, layer: LayerConfig) -> list[str]:
        spec = c.own(layer, LlmdLayer)
        crds = [CRD, "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io"]
        return crds + (["inferencepools.inference.networking.k8s.io"] if spec.scheduler else [])

    def missing_prerequisites(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        spec = c.own(layer, LlmdLayer)
        crds, missing = checks.get("crds", {}), []
        versions = crds.get(CRD, [])
        if spec.api_version not in versions:
            missing.append(f"the LLMInferenceService CRD serving {spec.api_version}"
                           + (f" (the cluster serves {', '.join(versions)})" if versions else ""))  # fmt: skip
        if "gateways.gateway.networking.k8s.io" not in crds:
            missing.append("the Gateway API CRDs")
        if spec.scheduler and not any(n.startswith("inferencepools.") for n in crds):
            missing.append("the Gateway API Inference Extension (InferencePool CRD) for the scheduler")
        return missing

    def control_plane_namespaces(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        found = [ctl["namespace"] for ctl in checks.get("controllers", []) if ctl["name"] in self.controllers] or ["kserve"]
        return list(dict.fromkeys([*found, "llm-d"]))

    def mechanism(self, study: Study, layer_name: str, experiment: str) -> Mechanism | Refusal:
        if experiment == "model_update":
            return Mechanism("LLMInferenceService rollout", frozenset({NEEDS_CLUSTER}))
        if experiment == "canary":
            return Refusal("LLMInferenceService has no canary field: a split needs a second LLMInferenceService and "
                           "weighted routes written by hand", "layer")  # fmt: skip
        if experiment == "scale_to_zero":
            return Refusal("LLMInferenceService keeps spec.replicas pods: it has no request-driven activation from "
                           "zero", "layer")  # fmt: skip
        if experiment == "gateway_hop":
            return Mechanism("the same requests through the gateway and straight to the engine", frozenset({NEEDS_CLUSTER}))
        return super().mechanism(study, layer_name, experiment)


KIND = register(Llmd())
