"""llm-d: a KServe ``LLMInferenceService`` on one node, with or without the inference scheduler."""

from __future__ import annotations

import shlex
from typing import Any

from ..config import Study
from ..errors import UnsupportedLayerError
from . import common as c


def render(study: Study, layer_name: str, canary: c.Canary | None = None) -> list[dict[str, Any]]:
    if canary is not None:
        raise UnsupportedLayerError(
            f"layers.{layer_name}: LLMInferenceService has no traffic split of its own; "
            "a canary needs a second service and a weighted HTTPRoute"
        )
    settings = c.cluster_settings(study)
    layer = study.layers[layer_name]
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
    template: dict[str, Any] = {"containers": [container], "volumes": scratch, "securityContext": c.pod_security(settings)}
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
