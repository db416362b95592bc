"""kserve: an ``InferenceService`` in Standard or Knative mode, with a custom container or a ServingRuntime."""

from __future__ import annotations

from typing import Any

from ..config import KServeLayer, Study
from . import common as c

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
    layer = study.layers[layer_name]
    settings = c.cluster_settings(study)
    body = _custom_predictor(study, layer) if layer.predictor == "custom" else _runtime_predictor(study, layer_name)
    spec: dict[str, Any] = {
        "minReplicas": layer.min_replicas,
        "maxReplicas": layer.max_replicas,
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
    layer = study.layers[layer_name]
    name = c.object_name(study, layer_name)
    annotations = {"serving.kserve.io/deploymentMode": layer.mode}
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
