"""raw-vllm: a Deployment, a Service and the weights' volume, written as a careful user would."""

from __future__ import annotations

from typing import Any

from ..config import Study
from ..errors import ParamsError, UnsupportedLayerError
from . import common as c

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
    claim = {
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
            "volumeMounts": [{"name": "weights", "mountPath": MODELS}, {"name": "home", "mountPath": c.HOME}],
            "securityContext": c.container_security(),
        }
        return [claim], [volume], [stage], mount, local, [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    mount = {"name": "weights", "mountPath": MODELS}
    return [claim], [volume], [], mount, where.rest, [{"name": "HF_HOME", "value": f"{MODELS}/.hf"}]


def render(study: Study, layer_name: str, canary: c.Canary | None = None) -> list[dict[str, Any]]:
    if canary is not None:
        raise UnsupportedLayerError(
            f"layers.{layer_name}: raw vLLM has no traffic split; a canary means a second Deployment and a "
            "weighted route (Gateway API HTTPRoute or a mesh) written and promoted by hand"
        )
    settings = c.cluster_settings(study)
    layer = study.layers[layer_name]
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
    # One GPU per replica and one replica: a rolling update would wait for a second GPU that is not there.
    strategy = {"type": "Recreate"} if settings.gpus and layer.replicas == 1 else {"type": "RollingUpdate"}
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
