"""A stateful Kubernetes API for tests: kmock's emulator, extended where the platform relies on the real
API's behaviour, served over HTTP from its own thread.

Extensions (kmock's emulator leaves these out): server-side apply creates a missing object and replaces
the applied fields of an existing one (status kept); a create answers 201; list and watch honour
equality label selectors; objects get a uid, creationTimestamp, generation (bumped when an apply or
a merge patch changes the spec) and a resourceVersion.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums
from kmock._internal.k8s import KubernetesNotFoundError, KubernetesObjectConflictError

from servinglab.layers.validate import bundled_crds

RESOURCES = [
    "v1/namespaces", "v1/pods", "v1/services", "v1/persistentvolumeclaims", "v1/events", "v1/nodes",
    "apps/v1/deployments", "apps/v1/replicasets", "autoscaling/v2/horizontalpodautoscalers",
    "serving.kserve.io/v1beta1/inferenceservices", "serving.kserve.io/v1alpha1/servingruntimes",
    "serving.kserve.io/v1alpha1/llminferenceservices", "serving.kserve.io/v1alpha2/llminferenceservices",
    "gateway.networking.k8s.io/v1/httproutes", "apiextensions.k8s.io/v1/customresourcedefinitions",
    "v1/configmaps", "storage.k8s.io/v1/storageclasses", "gateway.networking.k8s.io/v1/gatewayclasses",
    "networking.k8s.io/v1/networkpolicies",
]  # fmt: skip


def _crd(name: str, versions: list[str], kind: str) -> dict[str, Any]:
    plural, group = name.split(".", 1)
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name},
            "spec": {"group": group, "names": {"kind": kind, "plural": plural}, "scope": "Namespaced",
                     "versions": [{"name": v, "served": True, "storage": v == versions[-1]} for v in versions]}}  # fmt: skip


def install_serving_stack(kube, gpus_per_node: tuple[int, ...] = (1, 1), knative: bool = True,  # noqa: ANN001
                          llmisvc_versions: tuple[str, ...] = ("v1alpha1", "v1alpha2"), kserve_version: str = "v0.20.0",
                          inference_pools: bool = True) -> None:  # fmt: skip
    """Nodes, CRDs, the KServe controller and its config, a gateway class and storage classes, as a GPU
    cluster with KServe installed would show them (the KServe CRDs with their real schemas)."""
    for index, gpus in enumerate((*gpus_per_node, 0)):
        allocatable = {"cpu": "32", "memory": "256Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        # GPU nodes carry the labels NVIDIA's GPU feature discovery puts on them (values of a real H200 node).
        labels = {"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.memory": "143771",
                  "nvidia.com/cuda.driver-version.full": "580.159.04",
                  "nvidia.com/cuda.runtime-version.full": "13.0"} if gpus else {}  # fmt: skip
        kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{index}", "labels": labels},
                    "status": {"allocatable": allocatable}})  # fmt: skip
    for crd in copy.deepcopy(bundled_crds()):
        if crd:
            if crd["spec"]["names"]["kind"] == "LLMInferenceService":
                crd["spec"]["versions"] = [v for v in crd["spec"]["versions"] if v["name"] in llmisvc_versions]
                if not crd["spec"]["versions"]:
                    continue
            kube.apply(crd)
    extra = [("certificates.cert-manager.io", ["v1"], "Certificate"),
             ("gateways.gateway.networking.k8s.io", ["v1"], "Gateway"),
             ("httproutes.gateway.networking.k8s.io", ["v1"], "HTTPRoute")]  # fmt: skip
    if knative:
        extra.append(("services.serving.knative.dev", ["v1"], "Service"))
    if inference_pools:
        extra.append(("inferencepools.inference.networking.k8s.io", ["v1"], "InferencePool"))
    for name, versions, kind in extra:
        kube.apply(_crd(name, versions, kind))
    container = {"name": "manager", "image": f"kserve/kserve-controller:{kserve_version}",
                 "resources": {"requests": {"cpu": "100m", "memory": "300Mi"}}}  # fmt: skip
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "kserve-controller-manager", "namespace": "kserve"},
                "spec": {"selector": {"matchLabels": {"control-plane": "kserve-controller-manager"}},
                         "template": {"metadata": {"labels": {"control-plane": "kserve-controller-manager"}},
                                      "spec": {"containers": [container]}}},
                "status": {"readyReplicas": 1}})  # fmt: skip
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-controller-manager-0", "namespace": "kserve"},
                "spec": {"containers": [container]}})  # fmt: skip
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inferenceservice-config", "namespace": "kserve"},
                "data": {"deploy": '{"defaultDeploymentMode": "Knative"}'}})  # fmt: skip
    kube.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "istio"},
                "spec": {"controllerName": "istio.io/gateway-controller"}})  # fmt: skip
    kube.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "provisioner": "csi.example",
                "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}}})


def _selector(text: str | None) -> list[tuple[str, str, str]]:
    terms = []
    for part in filter(None, (text or "").split(",")):
        if "!=" in part:
            key, value = part.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        else:
            terms.append((part.strip(), "exists", ""))
    return terms


def selected(obj: dict[str, Any], text: str | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, value in _selector(text):
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with a JSON merge patch (RFC 7386) applied: dicts merge, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ClusterEmulator(kmock.KubernetesEmulator):
    _versions = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.logs: dict[tuple[str, str], str] = {}  # (pod, container) → log text, served at pods/<pod>/log
        self.dry_run_rejections: dict[str, str] = {}  # plural → message an admission webhook answers a dry run

    def _stamp(self, obj: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        old = (previous or {}).get("metadata", {})
        meta["uid"] = old.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old.get("creationTimestamp") or datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")  # fmt: skip
        generation = old.get("generation", 0)
        meta["generation"] = generation + 1 if previous is None or previous.get("spec") != obj.get("spec") else generation
        meta["resourceVersion"] = str(next(self._versions))
        return obj

    async def _handle(self, request):  # noqa: ANN001 - kmock's request type
        if request.subresource == "log" and request.method == enums.method.GET:
            text = self.logs.get((request.name, request.params.get("container", "")))
            if text is None:
                return aiohttp.web.json_response({"kind": "Status", "code": 400, "reason": "BadRequest"}, status=400)
            return aiohttp.web.Response(text=text, content_type="text/plain")
        content_type = (request.headers or {}).get("Content-Type", "")
        if request.resource is not None and request.method == enums.method.PATCH and "apply-patch" in content_type \
                and request.subresource is None:  # fmt: skip
            return await self._apply(request)
        if request.resource is not None and request.action == enums.action.CREATE:
            self._stamp(request.data, None)
        if request.resource is not None and request.action == enums.action.UPDATE and request.name \
                and request.subresource is None and isinstance(request.data, dict) and "spec" in request.data:  # fmt: skip
            await self._observe_spec_change(request)
        if request.action == enums.action.DELETE and request.name and (request.data or {}).get("propagationPolicy") == "Foreground":
            await self._hold_for_dependents(request)
        try:
            response = await super()._handle(request)
        except (KubernetesNotFoundError, KubernetesObjectConflictError) as exc:
            code, reason = (404, "NotFound") if isinstance(exc, KubernetesNotFoundError) else (409, "AlreadyExists")
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}, status=code
            )
        if request.action == enums.action.CREATE and response.status == 200:
            response.set_status(201)
        return response

    async def _observe_spec_change(self, request) -> None:  # noqa: ANN001
        """A patch that changes the spec bumps metadata.generation, as the API server does for any write
        (``kubectl scale`` and ``kubectl patch`` included), so controllers see a new generation to roll out."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return
            current = self._objects[key].raw
        if merge_patch(current.get("spec"), request.data["spec"]) != current.get("spec"):
            meta = request.data.setdefault("metadata", {})
            meta["generation"] = (current.get("metadata") or {}).get("generation", 0) + 1
            meta["resourceVersion"] = str(next(self._versions))

    async def _hold_for_dependents(self, request) -> None:  # noqa: ANN001
        """Foreground deletion: an object with dependents gets the foregroundDeletion finalizer, so it stays
        (with a deletionTimestamp) until the garbage collector (the test controller) removed them."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return
            uid = self._objects[key].raw.get("metadata", {}).get("uid")
            dependents = any(
                uid in {r.get("uid") for r in (obj.raw.get("metadata", {}).get("ownerReferences") or [])}
                for obj in self._objects.values() if not obj.deleted
            )
            if dependents:
                self._objects[key].patch({"metadata": {"finalizers": ["foregroundDeletion"]}})

    async def _apply(self, request) -> aiohttp.web.Response:  # noqa: ANN001
        applied = dict(request.data)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            exists = key in self._objects and not self._objects[key].deleted
            current = dict(self._objects[key].raw) if exists else None
            if request.params.get("dryRun"):
                message = self.dry_run_rejections.get(request.resource.plural)
                if message:
                    return aiohttp.web.json_response(
                        {"kind": "Status", "status": "Failure", "code": 422, "message": message}, status=422
                    )
                return aiohttp.web.json_response(applied, status=200)
            if current is None:
                state = self._stamp(applied, None)
                if key in self._objects:
                    self._objects[key].create(state)
                else:
                    self._objects[key] = state
                event = "ADDED"
            else:
                state = {**current, **{k: v for k, v in applied.items() if k != "metadata"}}
                meta = dict(current.get("metadata") or {})
                for field in ("labels", "annotations"):
                    if field in applied.get("metadata", {}):
                        meta[field] = applied["metadata"][field]
                state["metadata"] = meta
                state = self._stamp(state, current)
                self._objects[key].delete()
                self._objects[key].create(state)
                event = "MODIFIED"
            raw = self._objects[key].raw
            await self._buses[request.resource].put({"type": event, "object": raw})
        return aiohttp.web.json_response(raw, status=201 if event == "ADDED" else 200)

    async def _serve_list(self, request):  # noqa: ANN001
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        payload["items"] = [item for item in payload["items"] if selected(item, selector)]
        return payload

    async def _serve_watch(self, request):  # noqa: ANN001
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and not selected(event.get("object") or {}, selector):
                continue
            yield event


class EmulatedCluster:
    """The emulator on its own event loop in a thread; ``url`` while open."""

    def __init__(self) -> None:
        self.emulator = ClusterEmulator()
        for resource in RESOURCES:
            self.emulator.resources[resource] = {}
        self.url: str | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="kube-emulator", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._main = asyncio.current_task()
            self._stopped = asyncio.Event()
            async with kmock.Server(self.emulator):
                self.url = str(self.emulator.url).rstrip("/")
                self._ready.set()
                await self._stopped.wait()

        asyncio.run(main())

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        def shut_down() -> None:
            # Open watches never end on their own: cancel them, or the server waits for them.
            for task in asyncio.all_tasks():
                if task is not self._main:
                    task.cancel()
            self._stopped.set()

        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(shut_down)
        self._thread.join(10)

    def kubeconfig(self, path) -> str:  # noqa: ANN001
        """A kubeconfig file pointing at the emulator, as a user's would (no credentials needed)."""
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters:\n- name: emulator\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n"
            "users:\n- name: tester\n  user:\n    token: not-a-secret\n"
        )
        return str(path)
