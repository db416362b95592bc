"""What every layer's objects share: names, labels, the model's location, the engine container's parts.

Renderers are pure: a study in, plain Kubernetes objects (dicts) out. Nothing here talks to a cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import KubernetesPlatform, LayerConfig, Study, engine_argv
from ..errors import ParamsError
from . import NetworkPeer

MANAGED_BY = "app.kubernetes.io/managed-by"
STUDY_LABEL = "servinglab.io/study"
LAYER_LABEL = "servinglab.io/layer"
HASH_LABEL = "servinglab.io/spec-hash"
RUN_ANNOTATION = "servinglab.io/run-id"
COMPONENT_LABEL = "app.kubernetes.io/component"
LOAD_COMPONENT = "loadgen"  # the in-cluster load pods: the one servinglab client a layer's policy admits by label
CLIENT_LABEL = "servinglab.io/client"  # a pod the user runs servinglab in (platform.endpoint: in-cluster)
ENGINE_PORT = 8000
MAX_NAME = 45  # Knative appends "-predictor-00001" to an InferenceService name inside a 63-character label
HOME = "/home/servinglab"
TMP = "/tmp"


@dataclass(frozen=True)
class Canary:
    """A second revision that takes ``percent`` of the traffic: the same model with other engine args."""

    percent: int
    engine_args: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None  # the new revision's tag: it answers as '<served_name>:<revision>'

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100:
            raise ValueError(f"canary percent {self.percent} is not within 0..100")


@dataclass(frozen=True)
class ModelLocation:
    """Where the engine finds the weights, per layer kind."""

    uri: str  # pvc://claim/path, hf://org/model or oci://image
    scheme: str
    rest: str

    @property
    def claim(self) -> str:
        return self.rest.split("/", 1)[0]

    @property
    def claim_path(self) -> str:
        return self.rest.split("/", 1)[1] if "/" in self.rest else ""


T = TypeVar("T", bound=LayerConfig)


def own(layer: LayerConfig, config: type[T]) -> T:
    """A layer's options as its kind's own model, as a kind's module asks for them (the registry hands them on
    as the base model)."""
    if not isinstance(layer, config):
        raise ParamsError(f"a {layer.kind} layer's options are not {config.__name__}")
    return layer


def options(study: Study, layer_name: str, config: type[T]) -> T:
    """``own`` for a layer of the study, by name."""
    return own(study.layers[layer_name], config)


def cluster_settings(study: Study) -> KubernetesPlatform:
    if study.platform.kind != "kubernetes":
        raise ParamsError(f"{study.source_file}: platform.kind is '{study.platform.kind}'; rendering needs kubernetes")
    return study.platform


def model_location(study: Study) -> ModelLocation:
    source = study.model.source
    if source.kind != "uri":
        raise ParamsError(
            f"{study.source_file}: model.source.kind '{source.kind}' is a path on this machine; a cluster reads "
            "weights from pvc://, hf:// or oci:// (model.source: {kind: uri, uri: ...})"
        )
    scheme, rest = source.uri.split("://", 1)
    location = ModelLocation(source.uri, scheme, rest.strip("/"))
    if scheme == "pvc" and not location.claim:
        raise ParamsError(f"{study.source_file}: model.source.uri '{source.uri}' names no claim (pvc://claim/path)")
    return location


def object_name(study: Study, layer_name: str, suffix: str = "") -> str:
    name = f"{study.study}-{layer_name}{suffix}"
    if len(f"{study.study}-{layer_name}") > MAX_NAME:
        raise ParamsError(
            f"{study.source_file}: layers.{layer_name}: object name '{study.study}-{layer_name}' is longer than "
            f"{MAX_NAME} characters (Kubernetes and Knative derive longer names from it); shorten the study or layer name"
        )
    return name


# KServe's Gateway API ingress when the study names none (inferenceservice-config: kserveIngressGateway).
DEFAULT_GATEWAY = "kserve/kserve-ingress-gateway"
ENVOY_GATEWAY_NAMESPACE = "envoy-gateway-system"  # where Envoy Gateway runs a Gateway's proxies by default


def gateway_peers(study: Study) -> list[NetworkPeer]:
    """The proxy pods of the Gateway a layer is reached through (``platform.gateway``, else KServe's).

    Implementations label them differently: the Gateway API's ``gateway-name`` label (GEP-1762; Istio and
    kgateway, in the Gateway's namespace), and Envoy Gateway's owning-gateway labels in its own namespace.
    """
    settings = cluster_settings(study)
    namespace, _, name = (settings.gateway or DEFAULT_GATEWAY).rpartition("/")
    namespace = namespace or settings.namespace
    return [
        NetworkPeer(f"the gateway {namespace}/{name} (gateway.networking.k8s.io/gateway-name)",
                    {"gateway.networking.k8s.io/gateway-name": name}, namespace),
        NetworkPeer(f"the gateway {namespace}/{name} (Envoy Gateway's proxy)",
                    {"gateway.envoyproxy.io/owning-gateway-name": name,
                     "gateway.envoyproxy.io/owning-gateway-namespace": namespace}, ENVOY_GATEWAY_NAMESPACE),
    ]  # fmt: skip


def selector_labels(study: Study, layer_name: str) -> dict[str, str]:
    """The labels a selector may use: fixed for the life of the layer (selectors cannot change)."""
    return {STUDY_LABEL: study.study, LAYER_LABEL: layer_name}


def labels(study: Study, layer_name: str) -> dict[str, str]:
    return {MANAGED_BY: "servinglab", **selector_labels(study, layer_name)}


def owner_marks(obj: dict[str, Any]) -> dict[str, str]:
    """The labels that say who owns a rendered object: servinglab, its study and layer, and any component
    label (the in-cluster load's); not the spec hash, which a change of the owner's own spec moves."""
    found = obj["metadata"].get("labels") or {}
    return {k: v for k, v in found.items() if k in (MANAGED_BY, STUDY_LABEL, LAYER_LABEL, COMPONENT_LABEL)}


def foreign_owner(existing: dict[str, Any] | None, marks: dict[str, str]) -> str | None:
    """How ``existing`` is labelled when it lacks one of ``marks``; None when it is absent or carries them all.

    Object names join study and layer with '-', so study 'a' with layer 'b-c' and study 'a-b' with layer
    'c' name the same objects: only the labels tell the owners apart.
    """
    if existing is None:
        return None
    found = existing["metadata"].get("labels") or {}
    if all(found.get(k) == v for k, v in marks.items()):
        return None
    shown = [f"{k}={found[k]}" for k in (MANAGED_BY, STUDY_LABEL, LAYER_LABEL, COMPONENT_LABEL) if k in found]
    return ", ".join(shown) or "no servinglab labels"


def metadata(study: Study, layer_name: str, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": cluster_settings(study).namespace,
        "labels": labels(study, layer_name),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def stamp(objects: list[dict[str, Any]], run_id: str | None) -> list[dict[str, Any]]:
    """Label every object (and pod template) with the hash of the layer's spec; the run id as annotation.

    The hash covers what was rendered before stamping, so the same study renders the same hash; the run
    id stays out of pod templates and selectors, which it would roll or break on every run.
    """
    digest = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:12]
    for obj in objects:
        obj["metadata"]["labels"][HASH_LABEL] = digest
        template = obj.get("spec", {}).get("template")
        if obj["kind"] == "Deployment" and template is not None:
            template["metadata"]["labels"][HASH_LABEL] = digest
        if run_id:
            obj["metadata"].setdefault("annotations", {})[RUN_ANNOTATION] = run_id
    return objects


def resources(settings: KubernetesPlatform) -> dict[str, Any]:
    """Requests equal to limits, explicit CPU limit included (KServe would otherwise default it to 1)."""
    amounts = {"cpu": settings.cpu, "memory": settings.memory}
    if settings.gpus:
        amounts[settings.gpu_resource] = str(settings.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def tolerations(settings: KubernetesPlatform) -> list[dict[str, Any]]:
    if not settings.gpus:
        return []
    return [{"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]


def pod_security(settings: KubernetesPlatform) -> dict[str, Any]:
    uid = settings.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """No privilege, no capability, and a read-only image: everything vLLM writes goes to the scratch
    volumes (``scratch_volumes``), so a compromised engine cannot alter its own code."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def without_api_token() -> dict[str, Any]:
    """Pod fields that keep the service account's token out of the pod: neither the engine nor the load
    generator talks to the API server, so a mounted token would only be something to steal."""
    return {"automountServiceAccountToken": False}


def engine_env(settings: KubernetesPlatform, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A writable home for a non-root user, no usage reporting, and the API key from its Secret."""
    env = [
        {"name": "HOME", "value": HOME},
        {"name": "USER", "value": "servinglab"},
        {"name": "XDG_CACHE_HOME", "value": f"{HOME}/.cache"},
        # The compile caches, named where the root file system is read-only: on the home volume.
        {"name": "TRITON_CACHE_DIR", "value": f"{HOME}/.cache/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{HOME}/.cache/torchinductor"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
        *(extra or []),
    ]
    if settings.api_key_secret:
        env.append(
            {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": settings.api_key_secret, "key": "api-key"}}}
        )
    return env


def scratch_volumes(settings: KubernetesPlatform) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Memory-backed /dev/shm (PyTorch's shared memory), a writable home (vLLM's, Hugging Face's and the
    compilers' caches) and a writable /tmp: what vLLM writes under a read-only root; (volumes, mounts)."""
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "home", "mountPath": HOME},
              {"name": "tmp", "mountPath": TMP}]  # fmt: skip
    return volumes, mounts


def health_probes(settings: KubernetesPlatform, port: int | str, startup: bool = True) -> dict[str, Any]:
    """Probes on vLLM's /health; the start-up probe gives weight loading its whole budget."""

    def check() -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": port}}

    probes: dict[str, Any] = {
        "readinessProbe": {**check(), "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {**check(), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }
    if startup:
        period = 10
        probes["startupProbe"] = {
            **check(), "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": max(1, settings.startup_budget_s // period),
        }  # fmt: skip
    return probes


def serve_container(name: str, study: Study, model_path: str, port: int, argv: list[str]) -> dict[str, Any]:
    """The head of every engine container: ``vllm serve <model>`` under the served name, on ``port``."""
    settings = cluster_settings(study)
    return {
        "name": name,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["vllm", "serve"],
        "args": [model_path, "--served-model-name", *study.model.served_names(), "--host", "0.0.0.0", "--port",
                 str(port), *argv],  # fmt: skip
    }


def engine_args(study: Study, served_names: bool = False) -> list[str]:
    """The study's engine arguments; with ``served_names``, a revision's names too (for a container whose
    head someone else writes: vLLM takes the last ``--served-model-name`` it is given)."""
    argv = engine_argv(study.model.engine_args)
    if served_names and study.model.revision:
        argv += ["--served-model-name", *study.model.served_names()]
    return argv


def without_bookkeeping(obj: Any) -> Any:
    """An object as its user would write it: without the spec-hash label and run-id annotation servinglab adds."""
    if isinstance(obj, dict):
        return {k: without_bookkeeping(v) for k, v in obj.items() if k not in (HASH_LABEL, RUN_ANNOTATION)
                and not (k == "annotations" and isinstance(v, dict) and set(v) <= {RUN_ANNOTATION})}  # fmt: skip
    if isinstance(obj, list):
        return [without_bookkeeping(v) for v in obj]
    return obj
