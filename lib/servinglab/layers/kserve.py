"""kserve: an ``InferenceService`` in Standard or Knative mode, with a custom container or a ServingRuntime."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import INT32_MAX, LayerConfig, Study
from . import NEEDS_CLUSTER, NEEDS_GATEWAY, LayerKind, Mechanism, NetworkPeer, ObjectRef, Refusal, ResourceType, register
from . import common as c


class KServeLayer(LayerConfig):
    """A KServe ``InferenceService``."""

    kind: Literal["kserve"]
    mode: Literal["Standard", "Knative"] = "Standard"
    predictor: Literal["custom", "runtime"] = Field(
        "custom", description="custom: kserve-container runs the args verbatim; runtime: model + ServingRuntime"
    )
    min_replicas: int = Field(1, ge=0, le=INT32_MAX)
    max_replicas: int = Field(1, ge=1, le=INT32_MAX)

    @model_validator(mode="after")
    def _replica_bounds(self) -> KServeLayer:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

# Who sends to a Knative revision's pods: its activator (when it is in the path: from zero, under burst)
# and autoscaler (which scrapes the queue-proxy) in knative-serving, and Knative's ingress otherwise, as
# net-istio (istio-system) or Kourier (kourier-system) label it in their releases.
KNATIVE_PEERS = (
    NetworkPeer("Knative's activator", {"app": "activator"}, "knative-serving"),
    NetworkPeer("Knative's autoscaler (scrapes the queue-proxy)", {"app": "autoscaler"}, "knative-serving"),
    NetworkPeer("Knative's ingress through Istio", {"istio": "ingressgateway"}, "istio-system"),
    NetworkPeer("Knative's ingress through Kourier", {"app": "3scale-kourier-gateway"}, "kourier-system"),
)
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the weights
RUNTIME_PORT = 8080  # KServe's default container port


def runtime_name(study: Study, layer_name: str) -> str:
    return c.object_name(study, layer_name, "-vllm")


def _custom_predictor(study: Study, layer: KServeLayer) -> dict[str, Any]:
    """A ``kserve-container`` that runs vLLM's arguments verbatim, weights through the storage initializer."""
    settings = c.cluster_settings(study)
    scratch, mounts = c.scratch_volumes(settings)
    container = {
        **c.serve_container("kserve-container", study, MODEL_MOUNT, c.ENGINE_PORT, c.engine_args(study)),
        # STORAGE_URI on the kserve-container makes KServe stage the model into /mnt/models.
        "env": c.engine_env(settings, [{"name": "STORAGE_URI", "value": c.model_location(study).uri},
                                       {"name": "HF_HUB_OFFLINE", "value": "1"}]),  # fmt: skip
        "ports": [{"containerPort": c.ENGINE_PORT, "protocol": "TCP"}],
        "resources": c.resources(settings),
        # Knative manages readiness itself and bounds start-up by its progress deadline instead.
        **c.health_probes(settings, c.ENGINE_PORT, startup=layer.mode == "Standard"),
        "volumeMounts": mounts,
        "securityContext": c.container_security(),
    }
    return {"containers": [container], "volumes": scratch}


def _runtime_predictor(study: Study, layer_name: str) -> dict[str, Any]:
    """``model`` + ``runtime``: KServe picks the namespaced ServingRuntime rendered beside it."""
    settings = c.cluster_settings(study)
    return {
        "model": {
            "name": "kserve-container",  # required in a spec.canary predictor; the runtime's container
            "modelFormat": {"name": "vllm"},
            "runtime": runtime_name(study, layer_name),
            "storageUri": c.model_location(study).uri,
            "args": c.engine_args(study, served_names=True),  # appended to the runtime's own
            "resources": c.resources(settings),
        }
    }


def serving_runtime(study: Study, layer_name: str) -> dict[str, Any]:
    settings = c.cluster_settings(study)
    scratch, mounts = c.scratch_volumes(settings)
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": c.metadata(study, layer_name, runtime_name(study, layer_name)),
        "spec": {
            "supportedModelFormats": [{"name": "vllm", "autoSelect": False}],
            "multiModel": False,
            "containers": [
                {
                    **c.serve_container("kserve-container", study, MODEL_MOUNT, RUNTIME_PORT, []),
                    "env": c.engine_env(settings, [{"name": "HF_HUB_OFFLINE", "value": "1"}]),
                    "ports": [{"containerPort": RUNTIME_PORT, "protocol": "TCP"}],
                    "volumeMounts": mounts,
                    "securityContext": c.container_security(),
                }
            ],
            "volumes": scratch,
        },
    }


def predictor(study: Study, layer_name: str) -> dict[str, Any]:
    layer = c.options(study, layer_name, KServeLayer)
    settings = c.cluster_settings(study)
    body = _custom_predictor(study, layer) if layer.predictor == "custom" else _runtime_predictor(study, layer_name)
    spec: dict[str, Any] = {
        "minReplicas": layer.min_replicas,
        "maxReplicas": layer.max_replicas,
        **c.without_api_token(),  # Knative accepts this field only as false, which is what it is
        "securityContext": c.pod_security(settings),
        **body,
    }
    if layer.mode == "Knative":
        # Knative gives a revision 10 minutes to become ready; a cold GPU node can need the whole budget.
        spec["annotations"] = {"serving.knative.dev/progress-deadline": f"{settings.startup_budget_s}s"}
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if tolerations := c.tolerations(settings):
        spec["tolerations"] = tolerations
    return spec


def render(study: Study, layer_name: str, canary: c.Canary | None = None) -> list[dict[str, Any]]:
    layer = c.options(study, layer_name, KServeLayer)
    name = c.object_name(study, layer_name)
    annotations: dict[str, str] = {"serving.kserve.io/deploymentMode": layer.mode}
    spec: dict[str, Any] = {"predictor": predictor(study, layer_name)}
    if canary is not None:
        revised = study.revised(canary.engine_args, canary.revision)
        if layer.mode == "Knative":
            # Knative: the spec as changed becomes the new revision and takes canaryTrafficPercent.
            spec["predictor"] = predictor(revised, layer_name)
            spec["predictor"]["canaryTrafficPercent"] = canary.percent
        else:
            # Standard mode (KServe 0.20+): a weighted second predictor, split in the HTTPRoute.
            spec["canary"] = [{"trafficPercent": canary.percent, "predictor": predictor(revised, layer_name)}]
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": c.metadata(study, layer_name, name, annotations),
        "spec": spec,
    }
    objects = [isvc]
    if layer.predictor == "runtime":
        objects.insert(0, serving_runtime(study, layer_name))
    return objects


INFERENCE_SERVICE = ResourceType("InferenceService", "inferenceservices", ("serving.kserve.io/v1beta1",))
SERVING_RUNTIME = ResourceType("ServingRuntime", "servingruntimes", ("serving.kserve.io/v1alpha1",))
GATEWAY_CRDS = ["gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io"]
GATEWAY_NEEDED = ("the split and the activation happen in the gateway: set platform.endpoint: gateway (or "
                  "platform.gateway_address) so requests go through it")  # fmt: skip


class KServe(LayerKind):
    name = "kserve"
    config = KServeLayer
    title = "KServe InferenceService"
    column = "KServe InferenceService"
    has_gateway = True
    engine_containers = {"kserve-container": RUNTIME_PORT}
    resources = (INFERENCE_SERVICE, SERVING_RUNTIME)
    crds = {
        "inferenceservices.serving.kserve.io": "KServe InferenceService",
        "servingruntimes.serving.kserve.io": "KServe ServingRuntime",
        "services.serving.knative.dev": "Knative Serving",
        "certificates.cert-manager.io": "cert-manager",
        "gateways.gateway.networking.k8s.io": "Gateway API",
        "httproutes.gateway.networking.k8s.io": "Gateway API HTTPRoute",
    }
    controllers = ("kserve-controller-manager",)
    component = {"tool": "kserve", "resource": "InferenceService"}
    control_plane = ("kserve", "cert-manager", "knative-serving")  # scanned by the preflight; which count: below
    claims = {
        "what_you_write": "You write one InferenceService; the controller makes the rest.",
        "model_lifecycle": "Declarative; the controller tracks revisions.",
        "rollout_canary": "canaryTrafficPercent splits traffic between revisions.",
        "scale_to_zero": "Built in: minReplicas 0.",
        "ingress_url": "An HTTPRoute and a stable URL per InferenceService, made for you.",
        "multi_model": "One resource shape for every model (governance).",
        "control": "A controller, cert-manager and KServe's opinionated defaults.",
        "prereqs": "cert-manager, the KServe controller, a network controller.",
        "confirmed": "Ready; /v1/models and chat (200) answer as on raw vLLM.",
        "routing": "No claim on the source page: fronted by the same gateway as the routing layer, blind to prefixes.",
    }

    def render(self, study: Study, layer_name: str, canary: Any = None) -> list[dict[str, Any]]:
        return render(study, layer_name, canary)

    def top_ref(self, study: Study, layer_name: str) -> ObjectRef:
        return ObjectRef(INFERENCE_SERVICE.api_versions[0], "InferenceService", c.object_name(study, layer_name))

    def pod_selector(self, study: Study, layer_name: str) -> dict[str, str]:
        return {"serving.kserve.io/inferenceservice": c.object_name(study, layer_name)}

    def network_peers(self, study: Study, layer_name: str) -> list[NetworkPeer]:
        """Knative mode: Knative's data path; Standard mode: the Gateway API gateway in front."""
        if c.options(study, layer_name, KServeLayer).mode == "Knative":
            return list(KNATIVE_PEERS)
        return c.gateway_peers(study)

    def routing(self, study: Study, layer_name: str) -> dict[str, str]:
        if c.options(study, layer_name, KServeLayer).mode == "Knative":
            gateway = "Knative's ingress and activator, which spread requests over the revision's pods"
        else:
            gateway = "the gateway's HTTPRoute to the predictor Service, which spreads connections over the pods"
        return {"gateway": gateway, "in-cluster": "the predictor Service (kube-proxy picks a pod per connection)"}

    def in_cluster_url(self, study: Study, layer_name: str) -> str:
        return f"http://{c.object_name(study, layer_name)}-predictor.{c.cluster_settings(study).namespace}.svc.cluster.local/v1"

    def required_crds(self, layer: LayerConfig) -> list[str]:
        spec = c.own(layer, KServeLayer)
        crds = ["inferenceservices.serving.kserve.io", "certificates.cert-manager.io"]
        if spec.predictor == "runtime":
            crds.append("servingruntimes.serving.kserve.io")
        return crds + (["services.serving.knative.dev"] if spec.mode == "Knative" else GATEWAY_CRDS)

    def missing_prerequisites(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        spec = c.own(layer, KServeLayer)
        crds, missing = checks.get("crds", {}), []
        if "inferenceservices.serving.kserve.io" not in crds:
            missing.append("the KServe InferenceService CRD")
        if spec.predictor == "runtime" and "servingruntimes.serving.kserve.io" not in crds:
            missing.append("the KServe ServingRuntime CRD")
        if spec.mode == "Knative" and "services.serving.knative.dev" not in crds:
            missing.append("Knative Serving (Knative mode)")
        if not any(ctl["name"] in self.controllers for ctl in checks.get("controllers", [])):
            missing.append(f"the KServe controller ({self.controllers[0]})")
        return missing

    def control_plane_namespaces(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        spec = c.own(layer, KServeLayer)
        found = [ctl["namespace"] for ctl in checks.get("controllers", []) if ctl["name"] in self.controllers] or ["kserve"]
        found.append("cert-manager")
        if spec.mode == "Knative":
            found.append("knative-serving")
        return list(dict.fromkeys(found))

    def cluster_facts(self, read: Any, checks: dict[str, Any]) -> dict[str, Any]:
        """The default deployment mode KServe's controller applies (its inferenceservice-config)."""
        mode = None
        for controller in checks.get("controllers", []):
            if controller["name"] not in self.controllers:
                continue
            config = read.get("v1", "ConfigMap", controller["namespace"], "inferenceservice-config")
            if config and "deploy" in (config.get("data") or {}):
                mode = json.loads(config["data"]["deploy"]).get("defaultDeploymentMode")
        return {"default deployment mode": mode} if mode else {}

    def mechanism(self, study: Study, layer_name: str, experiment: str) -> Mechanism | Refusal:
        layer = c.options(study, layer_name, KServeLayer)
        if experiment == "model_update":
            return Mechanism("new InferenceService revision", frozenset({NEEDS_CLUSTER}))
        if experiment == "canary":
            how = ("predictor.canaryTrafficPercent (Knative)" if layer.mode == "Knative"
                   else "spec.canary with trafficPercent (Standard, weights in the HTTPRoute)")  # fmt: skip
            return Mechanism(how, frozenset({NEEDS_CLUSTER, NEEDS_GATEWAY}))
        if experiment == "scale_to_zero":
            if layer.mode == "Standard":
                return Refusal("in Standard mode the HPA keeps at least one replica (minReplicas 0 is raised to 1)", "layer")
            if layer.min_replicas > 0 and study.platform.kind == "kubernetes":
                return Refusal(f"min_replicas is {layer.min_replicas}: set it to 0 for this Knative layer to scale "
                               "to zero", "settings")  # fmt: skip
            return Mechanism("Knative scale to zero (minReplicas 0), woken by the activator",
                             frozenset({NEEDS_CLUSTER, NEEDS_GATEWAY}), mode="on-demand")  # fmt: skip
        if experiment == "gateway_hop":
            return Mechanism("the same requests through the gateway and straight to the engine", frozenset({NEEDS_CLUSTER}))
        return super().mechanism(study, layer_name, experiment)

    def serving_replicas(self, layer: LayerConfig) -> int:
        spec = c.own(layer, KServeLayer)
        return max(1, spec.min_replicas)

    def idle_replicas(self, layer: LayerConfig) -> int:
        """Knative scales to its minimum; Standard mode's HPA never goes below one."""
        spec = c.own(layer, KServeLayer)
        return spec.min_replicas if spec.mode == "Knative" else max(1, spec.min_replicas)


KIND = register(KServe())
