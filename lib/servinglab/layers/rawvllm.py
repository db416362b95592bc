"""raw-vllm: vLLM's OpenAI server with nothing in front. On a cluster a Deployment, a Service and the
weights' volume, written as a careful user would; on the local platform a server process."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..config import INT32_MAX, LayerConfig, Study
from ..errors import ParamsError, UnsupportedLayerError
from . import LayerKind, Mechanism, ObjectRef, Refusal, register
from . import common as c


class RawVllmLayer(LayerConfig):
    """vLLM's OpenAI server with nothing in front: a process locally, a Deployment on a cluster."""

    kind: Literal["raw-vllm"]
    replicas: int = Field(1, ge=1, le=INT32_MAX)

MODELS = "/models"


def _weights(study: Study, layer_name: str, name: str) -> tuple[list[dict], list[dict], list[dict], dict, str, list[dict]]:
    """(extra objects, volumes, init containers, mount, model argument, extra env) for the model source."""
    settings = c.cluster_settings(study)
    where = c.model_location(study)
    mount = {"name": "weights", "mountPath": MODELS, "readOnly": True}
    if where.scheme == "pvc":
        volume = {"name": "weights", "persistentVolumeClaim": {"claimName": where.claim, "readOnly": True}}
        path = f"{MODELS}/{where.claim_path}".rstrip("/")
        return [], [volume], [], mount, path, [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    if where.scheme == "oci":
        volume = {"name": "weights", "image": {"reference": where.rest, "pullPolicy": "IfNotPresent"}}
        return [], [volume], [], mount, MODELS, [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    # hf://org/model: a claim servinglab creates; staged by an init container, or downloaded by vLLM itself.
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": c.metadata(study, layer_name, f"{name}-weights"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": settings.weights_claim_size}}},
    }
    if settings.storage_class:
        claim["spec"]["storageClassName"] = settings.storage_class
    volume = {"name": "weights", "persistentVolumeClaim": {"claimName": f"{name}-weights"}}
    if settings.staging_image:
        local = f"{MODELS}/{where.rest}"
        stage = {
            "name": "stage-weights",
            "image": settings.staging_image,
            "command": ["hf", "download", where.rest, "--local-dir", local],
            "env": [{"name": "HOME", "value": c.HOME}, {"name": "HF_HOME", "value": f"{MODELS}/.hf"}],
            "volumeMounts": [{"name": "weights", "mountPath": MODELS}, {"name": "home", "mountPath": c.HOME},
                             {"name": "tmp", "mountPath": c.TMP}],  # fmt: skip
            "securityContext": c.container_security(),
        }
        return [claim], [volume], [stage], mount, local, [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    mount = {"name": "weights", "mountPath": MODELS}
    return [claim], [volume], [], mount, where.rest, [{"name": "HF_HOME", "value": f"{MODELS}/.hf"}]


def _strategy(study: Study, layer_name: str) -> dict[str, str]:
    # One GPU per replica and one replica: a rolling update would wait for a second GPU that is not there.
    gpus = c.cluster_settings(study).gpus
    return {"type": "Recreate"} if gpus and c.options(study, layer_name, RawVllmLayer).replicas == 1 else {"type": "RollingUpdate"}


def render(study: Study, layer_name: str, canary: c.Canary | None = None) -> list[dict[str, Any]]:
    if canary is not None:
        raise UnsupportedLayerError(
            f"layers.{layer_name}: raw vLLM has no traffic split; a canary means a second Deployment and a "
            "weighted route (Gateway API HTTPRoute or a mesh) written and promoted by hand"
        )
    settings = c.cluster_settings(study)
    layer = c.options(study, layer_name, RawVllmLayer)
    name = c.object_name(study, layer_name)
    if layer.replicas > 1 and c.model_location(study).scheme == "hf":
        raise ParamsError(
            f"{study.source_file}: layers.{layer_name}.replicas: {layer.replicas} replicas cannot share the "
            "ReadWriteOnce claim an hf:// source is staged into; stage the weights on a pvc:// claim"
        )
    extra, volumes, init, weights_mount, model_arg, weights_env = _weights(study, layer_name, name)
    scratch, scratch_mounts = c.scratch_volumes(settings)
    container = {
        **c.serve_container("vllm", study, model_arg, c.ENGINE_PORT, c.engine_args(study)),
        "env": c.engine_env(settings, weights_env),
        "ports": [{"name": "http", "containerPort": c.ENGINE_PORT, "protocol": "TCP"}],
        "resources": c.resources(settings),
        **c.health_probes(settings, "http"),
        "volumeMounts": [weights_mount, *scratch_mounts],
        "securityContext": c.container_security(),
    }
    pod: dict[str, Any] = {
        **c.without_api_token(),
        "securityContext": c.pod_security(settings),
        "containers": [container],
        "volumes": volumes + scratch,
        "terminationGracePeriodSeconds": 30,
    }
    if init:
        pod["initContainers"] = init
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if tolerations := c.tolerations(settings):
        pod["tolerations"] = tolerations
    strategy = _strategy(study, layer_name)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(study, layer_name, name),
        "spec": {
            "replicas": layer.replicas,
            "strategy": strategy,
            # The default 600 s would call a long image pull plus weight load a failed rollout.
            "progressDeadlineSeconds": settings.startup_budget_s + 1200,
            "selector": {"matchLabels": c.selector_labels(study, layer_name)},
            "template": {"metadata": {"labels": c.labels(study, layer_name)}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(study, layer_name, name),
        "spec": {
            "type": "ClusterIP",
            "selector": c.selector_labels(study, layer_name),
            "ports": [{"name": "http", "port": c.ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [*extra, deployment, service]


class RawVllm(LayerKind):
    name = "raw-vllm"
    config = RawVllmLayer
    title = "raw vLLM"
    column = "raw vLLM"
    hosted_locally = True
    scales_by_hand = True
    engine_containers = {"vllm": c.ENGINE_PORT}
    claims = {
        "what_you_write": "You write the Deployment, Service, volume claim and probes yourself.",
        "model_lifecycle": "Manual: change image or arguments and restart.",
        "rollout_canary": "Build it yourself: Recreate strategy, no traffic split.",
        "scale_to_zero": "By hand: replicas to 0 (and a GitOps exception for it).",
        "ingress_url": "A Service; you wire the gateway route.",
        "multi_model": "None: each model is its own set of manifests.",
        "control": "Total control, fewest moving parts.",
        "prereqs": "Nothing beyond the cluster.",
        "confirmed": "Serves /v1/models and chat (200) with a vLLM system_fingerprint.",
        "routing": "No claim on the source page: its Service spreads connections over the pods, blind to prefixes.",
    }

    def render(self, study: Study, layer_name: str, canary: Any = None) -> list[dict[str, Any]]:
        return render(study, layer_name, canary)

    def top_ref(self, study: Study, layer_name: str) -> ObjectRef:
        return ObjectRef("apps/v1", "Deployment", c.object_name(study, layer_name))

    def pod_selector(self, study: Study, layer_name: str) -> dict[str, str]:
        return c.selector_labels(study, layer_name)

    def in_cluster_url(self, study: Study, layer_name: str) -> str:
        return f"http://{c.object_name(study, layer_name)}.{c.cluster_settings(study).namespace}.svc.cluster.local:{c.ENGINE_PORT}/v1"

    def routing(self, study: Study, layer_name: str) -> dict[str, str]:
        # No gateway: only a client inside the cluster goes through the Service that spreads the load.
        return {"in-cluster": "its Service (kube-proxy picks a pod per connection)"}

    def mechanism(self, study: Study, layer_name: str, experiment: str) -> Mechanism | Refusal:
        on_cluster = study.platform.kind == "kubernetes"
        if experiment == "model_update":
            if not on_cluster:
                return Mechanism("restart with the new arguments", replaces_in_place=True)
            strategy = _strategy(study, layer_name)["type"]
            return Mechanism(f"Deployment rollout ({strategy})", replaces_in_place=strategy == "Recreate")
        if experiment == "canary":
            return Refusal("raw vLLM has no traffic split: a canary means a second Deployment, a Service for each "
                           "revision and a weighted proxy or HTTPRoute, written and rolled back by hand", "layer")  # fmt: skip
        if experiment == "scale_to_zero":
            how = ("by hand: kubectl scale to 0, then to 1, then the request once the pod is ready" if on_cluster
                   else "by hand: stop the server, start it again, send the request once it is ready")  # fmt: skip
            return Mechanism(how, mode="by-hand")
        if experiment == "gateway_hop":
            return Refusal("raw vLLM has no gateway: its Service is the only hop, so there is no overhead to measure",
                           "layer")  # fmt: skip
        return super().mechanism(study, layer_name, experiment)


KIND = register(RawVllm())
