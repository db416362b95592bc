"""The ``kubernetes`` platform: apply each layer's objects to a cluster, wait for them precisely, explain
failures, reach the endpoints, and delete everything the study created.

Readiness is followed through watches (the layer's top object, its pods, the namespace's events) and
every transition is stamped when servinglab sees it, on one clock: applied, pod scheduled, image
pulled, containers started, ready. A layer that cannot become ready fails at once with the reason
(image pull, crash loop with the last log lines, OOM kill, unschedulable with the scheduler's message,
KServe's reconcile failure) and its objects are deleted, so no GPU stays held by a broken pod.
"""

from __future__ import annotations

import copy
import json
import queue
import re
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kubernetes
from kubernetes.client.exceptions import ApiException

from .. import layers, progress
from ..config import KubernetesPlatform as KubernetesSettings
from ..config import Study
from ..errors import PlatformError, UnsupportedLayerError
from ..layers import NEEDS_GATEWAY, LayerKind, Refusal
from ..layers.common import ENGINE_PORT, HASH_LABEL, LAYER_LABEL, MANAGED_BY, STUDY_LABEL, Canary, selector_labels
from ..layers.common import foreign_owner, owner_marks
from ..layers.common import labels as owner_labels
from ..layers.render import render_layer
from ..layers.validate import schemas_from_crds, validate_objects
from .base import Deployment, Endpoint, Manifests, MetricsTarget, endpoint_options
from .gpus import node_gpu_facts
from .kube import (API_VERSIONS, Kube, WatchEvent, conditions, iter_containers, load_api_client, object_path,
                   parse_quantity)  # fmt: skip
from .portforward import Connector, PortForward, kubernetes_connector

IMAGE_FAILURES = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
RECONCILE_FAILURES = {"ReconcileFailed", "ReconcileError", "FailedCreate", "InvalidSpec"}
MARKS = ("applied", "scheduled", "image_pulled", "started", "ready")
PHASES = {"scheduled": "scheduling_s", "image_pulled": "image_pull_s", "started": "container_start_s",
          "ready": "engine_ready_s"}  # fmt: skip
# Kinds a controller may create from a layer, listed by "what you write vs what the platform creates".
OWNED_KINDS = ("Deployment", "ReplicaSet", "Service", "HorizontalPodAutoscaler", "HTTPRoute", "Pod")
# What the platform may create per layer, deleted by label at teardown, in this order: an in-cluster load
# Job (and its plan) first, since a client left running would load the next study; then the kinds' own
# resources (teardown_kinds()); then what any layer's objects may hold.
TEARDOWN_FIRST = ("Job", "ConfigMap")
TEARDOWN_LAST = ("Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy")  # the policy outlives the pods
GATEWAY_NEEDED = ("the split and the activation happen in the gateway: set platform.endpoint: gateway (or "
                  "platform.gateway_address) so requests go through it")  # fmt: skip


def teardown_kinds() -> list[str]:
    return [*TEARDOWN_FIRST, *(r.kind for r in layers.resource_types().values()), *TEARDOWN_LAST]


class LayerNotReadyError(PlatformError):
    """A layer's objects were applied but the layer could not become ready; they were deleted."""


class OwnershipError(PlatformError):
    """An object of the name servinglab would write belongs to someone else; nothing was applied or deleted."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubernetesPlatform:
    name = "kubernetes"

    def __init__(self, study: Study, kube: Kube | None = None) -> None:
        if not isinstance(study.platform, KubernetesSettings):
            raise PlatformError(f"{study.source_file}: platform.kind is {study.platform.kind}, not kubernetes")
        self.study = study
        self.settings: KubernetesSettings = study.platform
        self._kube = kube
        self._crds: dict | None = None
        self._crd_docs: list[dict[str, Any]] | None = None
        self._forwards: dict[str, PortForward] = {}
        self._pod_forwards: dict[tuple[str, int], PortForward] = {}  # (pod, port): metrics of every pod
        self._checks: dict[str, Any] | None = None

    def with_study(self, study: Study) -> KubernetesPlatform:
        """The same cluster and connection for a changed study (a model update, a canary's revision)."""
        sibling = KubernetesPlatform(study, self.kube)
        sibling._crds, sibling._crd_docs, sibling._checks = self._crds, self._crd_docs, self._checks
        sibling._forwards = self._forwards  # one port-forward per layer, whichever revision answers
        sibling._pod_forwards = self._pod_forwards
        return sibling

    def kind_of(self, layer_name: str) -> LayerKind:
        return layers.of(self.study.layers[layer_name])

    # --- the cluster --------------------------------------------------------------------------------

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(load_api_client(self.settings.kubeconfig, self.settings.context))
        return self._kube

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def facts(self) -> dict[str, Any]:
        checks = self.cluster_checks()
        return {
            "platform": self.name,
            "accelerator": f"{checks['gpus']['total']} × {self.settings.gpu_resource} allocatable"
            if checks["gpus"]["total"] else "no GPU allocatable",
            "hardware": {"nodes": checks["nodes"], "gpu_nodes": len(checks["gpus"]["by_node"]),
                         "allocatable_gpus": checks["gpus"]["total"]}
            | ({"gpu": checks["gpus"]["labels"]} if checks["gpus"].get("labels") else {}),  # fmt: skip
            "engine": {"name": "vllm", "image": self.settings.image},
            "cluster": checks,
        }

    def cluster_checks(self) -> dict[str, Any]:
        """What the cluster runs and offers, read once per platform object: the preflight's findings."""
        if self._checks is not None:
            return self._checks
        kube = _Lenient(self.kube)  # a list the user may not read (403) counts as unknown, not as a crash
        checks: dict[str, Any] = {"kubernetes_version": kube.version().get("gitVersion"), "namespace": self.namespace}
        nodes = kube.list("v1", "Node", None)
        by_node = {}
        for node in nodes:
            count = (node.get("status") or {}).get("allocatable", {}).get(self.settings.gpu_resource)
            if count and parse_quantity(count) > 0:
                by_node[node["metadata"]["name"]] = int(parse_quantity(count))
        checks["nodes"] = len(nodes)
        checks["gpus"] = {"resource": self.settings.gpu_resource, "by_node": by_node, "total": sum(by_node.values())}
        if labelled := node_gpu_facts(nodes, by_node):  # GPU feature discovery runs on the GPU nodes
            checks["gpus"]["labels"] = labelled
        try:
            crds = {c["metadata"]["name"]: c for c in self._crd_documents()}
        except ApiException as exc:
            crds, checks["crds_unreadable"] = {}, f"HTTP {exc.status}"
        known = prerequisite_crds()
        checks["crds"] = {
            name: sorted(v["name"] for v in crds[name]["spec"]["versions"] if v.get("served", True))
            for name in known if name in crds
        }
        checks["missing_crds"] = [label for name, label in known.items() if name not in crds]
        wanted = {name for kind in layers.kinds() for name in kind.controllers}
        controllers = [d for d in kube.list("apps/v1", "Deployment", None) if d["metadata"]["name"] in wanted]
        checks["controllers"] = [
            {"name": d["metadata"]["name"], "namespace": d["metadata"]["namespace"],
             "image": d["spec"]["template"]["spec"]["containers"][0].get("image"),
             "version": (d["spec"]["template"]["spec"]["containers"][0].get("image") or "").rpartition(":")[2] or None,
             "ready": (d.get("status") or {}).get("readyReplicas", 0)}  # fmt: skip
            for d in controllers
        ]
        checks["kind_facts"] = {kind.name: facts for kind in layers.kinds() if (facts := kind.cluster_facts(kube, checks))}
        checks["gateway_classes"] = (
            [g["metadata"]["name"] for g in kube.list("gateway.networking.k8s.io/v1", "GatewayClass", None)]
            if "gateways.gateway.networking.k8s.io" in crds else []
        )
        classes = kube.list("storage.k8s.io/v1", "StorageClass", None)
        checks["storage_classes"] = [
            c["metadata"]["name"] + (" (default)" if (c["metadata"].get("annotations") or {}).get(
                "storageclass.kubernetes.io/is-default-class") == "true" else "")  # fmt: skip
            for c in classes
        ]
        checks["control_plane"] = {}
        for namespace in control_plane_namespaces(checks):
            pods = kube.list("v1", "Pod", namespace)
            if pods:
                checks["control_plane"][namespace] = {"pods": len(pods), **_sum_requests(pods)}
        if kube.forbidden:
            checks["unreadable"] = sorted(kube.forbidden)
        self._checks = checks
        return checks

    def adapt_to_cluster(self) -> None:
        """Settle what the study's layers leave to the cluster (an API version it serves), by each kind's rule."""
        checks = self.cluster_checks()
        for layer in self.study.layers.values():
            layers.of(layer).adapt_to_cluster(layer, checks)

    def missing_prerequisites(self, layer_name: str) -> list[str]:
        """What the cluster lacks for this layer (empty when it has everything, or cannot tell)."""
        checks = self.cluster_checks()
        if checks.get("crds_unreadable"):
            return []  # no permission to read CRDs: the apply itself will say what is missing
        self.adapt_to_cluster()
        layer = self.study.layers[layer_name]
        missing = []
        need = self.settings.gpus
        if need and not any(count >= need for count in checks["gpus"]["by_node"].values()):
            missing.append(f"a node with {need} allocatable {self.settings.gpu_resource}")
        return missing + layers.of(layer).missing_prerequisites(layer, checks)

    def engine_version(self) -> str | None:
        """vLLM's version as the pinned image tag states it (``v0.32.0`` → ``0.32.0``); None for a digest."""
        tag = self.settings.image.partition("@")[0].rsplit("/", 1)[-1].partition(":")[2]
        match = re.match(r"^v?(\d+\.\d+(\.\d+)?)", tag)
        return match.group(1) if match else None

    def unsupported_reason(self, layer_name: str) -> str | None:
        missing = self.missing_prerequisites(layer_name)
        return f"the cluster lacks {'; '.join(missing)}" if missing else None

    def refusal(self, needs: frozenset[str]) -> Refusal | None:
        if NEEDS_GATEWAY in needs and self.settings.endpoint == "port-forward" and not self.settings.gateway_address:
            return Refusal(GATEWAY_NEEDED, "settings")
        return None

    def model_dir(self) -> tuple[Any, list[str]]:
        raise UnsupportedLayerError("the kubernetes platform reads the weights where the cluster does "
                                    "(model.source.uri); there is no model directory on this machine")  # fmt: skip

    def manifests(self, layer_name: str, study: Study | None = None, run_id: str | None = None) -> Manifests:
        """The layer's objects exactly as ``ensure`` applies them (validated first)."""
        study = study or self.study
        if self.kind_of(layer_name).resources:  # a custom resource: applied in a version the cluster serves
            self.adapt_to_cluster()
        return Manifests(render_layer(study, layer_name, run_id=run_id), None)

    def _crd_documents(self) -> list[dict[str, Any]]:
        """The cluster's CRDs, read once (they are large): the preflight and the validation share them."""
        if self._crd_docs is None:
            self._crd_docs = self.kube.list("apiextensions.k8s.io/v1", "CustomResourceDefinition", None)
        return self._crd_docs

    def crd_schemas(self) -> dict:
        """The KServe CRDs installed on the cluster; the bundled copies when they cannot be read."""
        if self._crds is None:
            try:
                crds = self._crd_documents()
                self._crds = schemas_from_crds(c for c in crds if c["spec"]["group"] == "serving.kserve.io")
            except ApiException:
                self._crds = {}
            if not self._crds:
                from ..layers.validate import bundled_crd_schemas

                self._crds = bundled_crd_schemas()
        return self._crds

    # --- deploy -------------------------------------------------------------------------------------

    def ensure(self, layer_name: str, run_dir: str, run_id: str | None = None, canary: Canary | None = None,
               keep_on_failure: bool = False) -> Deployment:  # fmt: skip
        """Apply the layer (validated, then dry-run on the server) and wait until it is ready.

        A layer already running with the same spec hash is reused. A failure or Ctrl-C during the wait
        deletes the layer's objects before the error goes on, unless ``keep_on_failure`` (a change to a
        running layer, which the caller rolls back).

        Parameters
        ----------
        canary : Canary, optional
            Apply the layer with a second revision that takes part of the traffic (KServe only).
        """
        layer = self.study.layers[layer_name]
        kind = layers.of(layer)
        if kind.resources:  # a custom resource: the cluster decides which of its versions are served
            self.adapt_to_cluster()
        objects = render_layer(self.study, layer_name, run_id=run_id, canary=canary)
        validate_objects(objects, self.settings.kubernetes_version, self.crd_schemas())
        top_kind = self.top_ref(layer_name)[1]
        top = next(o for o in objects if o["kind"] == top_kind)
        spec_hash = top["metadata"]["labels"][HASH_LABEL]
        self.refuse_foreign(objects, f"layers.{layer_name}")
        current = self.kube.get(top["apiVersion"], top["kind"], self.namespace, top["metadata"]["name"])
        if current and (current["metadata"].get("labels") or {}).get(HASH_LABEL) == spec_hash \
                and self._ready(current):  # fmt: skip
            return Deployment(layer_name, layer.kind, self.name, "ready", reused=True, spec_hash=spec_hash,
                              base_url=self.in_cluster_url(layer_name), url=_status_url(current))  # fmt: skip
        self._ensure_namespace()
        try:
            for obj in objects:
                self.kube.apply(obj, dry_run=True)
        except ApiException as exc:
            raise PlatformError(f"layers.{layer_name}: the cluster rejected {obj['kind']}/{obj['metadata']['name']} "
                                f"in a dry run: {_api_message(exc)}") from None  # fmt: skip
        applied = time.time()
        try:
            for obj in objects:
                self.kube.apply(obj)
            marks = self._wait_ready(layer_name, top, applied)
        except ApiException as exc:
            if not keep_on_failure:
                self.teardown([layer_name])
            raise PlatformError(f"layers.{layer_name}: the cluster refused an object: {_api_message(exc)}") from None
        except BaseException:  # not ready, Ctrl-C, a lost connection: leave nothing that holds a GPU
            if not keep_on_failure:
                self.teardown([layer_name])
            raise
        phases = {}
        previous = marks["applied"]
        for mark in MARKS[1:]:
            if mark in marks:
                phases[PHASES[mark]] = round(marks[mark] - previous, 3)
                previous = marks[mark]
        return Deployment(
            layer_name, layer.kind, self.name, "ready", spec_hash=spec_hash, base_url=self.in_cluster_url(layer_name),
            time_to_ready_s=round(marks["ready"] - applied, 3), phases_s=phases,
            started_at=_iso(applied), ready_at=_iso(marks["ready"]),
            applied=[f"{o['kind']}/{o['metadata']['name']}" for o in objects], created=self.created_objects(layer_name),
            url=_status_url(self.kube.get(*self.top_ref(layer_name))),
        )  # fmt: skip

    def refuse_foreign(self, objects: list[dict[str, Any]], where: str) -> None:
        """Refuse to write over an object of the same name that another study, layer or user owns.

        Each rendered object's owner labels (``owner_marks``) must be on the object of its name in the
        cluster, if there is one; a server-side apply would otherwise take it over and relabel it, and a
        later teardown would delete it.

        Parameters
        ----------
        objects : list of dict
            Rendered objects, about to be applied.
        where : str
            What the objects are for, leading the message (``layers.raw``).

        Raises
        ------
        OwnershipError
            Naming the object, its owner labels and the owner wanted, before anything is applied.
        """
        for obj in objects:
            meta = obj["metadata"]
            existing = self.kube.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
            marks = owner_marks(obj)
            owner = foreign_owner(existing, marks)
            if owner is not None:
                raise OwnershipError(
                    f"{where}: {obj['kind']}/{meta['name']} in namespace {meta.get('namespace')} belongs to another "
                    f"owner ({owner}), not to study {marks.get(STUDY_LABEL)} layer {marks.get(LAYER_LABEL)}; nothing "
                    "was applied. Names join study and layer with '-' (study 'a' with layer 'b-c' and study 'a-b' "
                    "with layer 'c' name the same objects): rename the study or the layer, or tear the other down"
                )

    def created_objects(self, layer_name: str) -> list[str]:
        """Kind/name of every object the cluster's controllers created from the layer (owner references,
        followed transitively from the layer's top object): what the user did not have to write."""
        top = self.kube.get(*self.top_ref(layer_name))
        if not top:
            return []
        candidates = []
        for kind in OWNED_KINDS:
            try:
                candidates += [(kind, o) for o in self.kube.list(API_VERSIONS[kind], kind, self.namespace)]
            except ApiException as exc:
                if exc.status != 404:  # 404: the kind is not installed on this cluster
                    raise
        owners, found = {top["metadata"]["uid"]}, []
        grew = True
        while grew:
            grew = False
            for kind, obj in candidates:
                uid = obj["metadata"].get("uid")
                refs = {r.get("uid") for r in obj["metadata"].get("ownerReferences") or []}
                if uid not in owners and refs & owners:
                    owners.add(uid)
                    found.append(f"{kind}/{obj['metadata']['name']}")
                    grew = True
        return sorted(found)

    def _ensure_namespace(self) -> None:
        if self.kube.get("v1", "Namespace", None, self.namespace) is not None:
            return
        if not self.settings.create_namespace:
            raise PlatformError(f"namespace {self.namespace!r} does not exist (set platform.create_namespace: true)")
        # Not labelled with the study: teardown by label must never delete the namespace.
        self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})

    def pod_selector(self, layer_name: str) -> dict[str, str]:
        """The labels of the pods that serve a layer (ours, or its controller's), as its kind names them."""
        return self.kind_of(layer_name).pod_selector(self.study, layer_name)

    def _ready(self, top: dict[str, Any]) -> bool:
        """Ready for the current spec: a condition left over from the previous generation does not count."""
        status = top.get("status") or {}
        if top["metadata"].get("deletionTimestamp"):
            return False
        if top["kind"] == "Deployment":
            available = conditions(top).get("Available", {}).get("status") == "True"
            fresh = status.get("observedGeneration", 0) >= top["metadata"].get("generation", 0)
            want = top["spec"].get("replicas", 1)
            # kubectl's rollout rule: every replica updated and available, no old one left.
            rolled = (status.get("updatedReplicas", want) >= want and status.get("replicas", want) <= want
                      and (status.get("availableReplicas") or status.get("readyReplicas") or 0) >= want)  # fmt: skip
            return available and fresh and rolled and (status.get("readyReplicas") or 0) >= want
        fresh = status.get("observedGeneration", top["metadata"].get("generation", 0)) >= top["metadata"].get("generation", 0)
        return fresh and conditions(top).get("Ready", {}).get("status") == "True"

    def _top_failure(self, top: dict[str, Any]) -> str | None:
        for kind, condition in conditions(top).items():
            if condition.get("reason") in RECONCILE_FAILURES or condition.get("reason") == "ProgressDeadlineExceeded":
                return f"{top['kind']} condition {kind}: {condition.get('reason')}: {condition.get('message', '')}"
        model = (top.get("status") or {}).get("modelStatus") or {}
        failure = model.get("lastFailureInfo")
        # KServe keeps lastFailureInfo after a recovery: only a model blocked by it is a failure now.
        if failure and model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
            return f"{top['kind']} model: {failure.get('reason')}: {failure.get('message', '')}"
        return None

    @staticmethod
    def _current_pod(pod: dict[str, Any], applied: float) -> bool:
        """Created by this apply (not before it, second resolution) and not being deleted."""
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            return False
        created = meta.get("creationTimestamp")
        if not created:
            return True
        at = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        return at >= int(applied) - 1

    def pod_failure(self, pod: dict[str, Any], unschedulable_since: dict[str, float] | None = None,
                    now: float | None = None) -> str | None:  # fmt: skip
        """Why a pod cannot serve (image pull, crash loop with its last log lines, OOM kill, unschedulable after
        ``platform.unschedulable_grace_s``), or None while it may still come up."""
        name = pod["metadata"]["name"]
        scheduled = conditions(pod).get("PodScheduled", {})
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            # A cluster autoscaler may be adding a node: wait platform.unschedulable_grace_s first.
            now = time.time() if now is None else now
            since = now if unschedulable_since is None else unschedulable_since.setdefault(name, now)
            if now - since >= self.settings.unschedulable_grace_s:
                return f"pod {name} is unschedulable: {scheduled.get('message', '')}"
            return None
        limits = {c["name"]: (c.get("resources") or {}).get("limits", {}) for c in (pod.get("spec") or {}).get("containers", [])}
        for status in iter_containers(pod):
            state, last = status.get("state") or {}, status.get("lastState") or {}
            waiting = state.get("waiting") or {}
            reason = waiting.get("reason")
            if reason in IMAGE_FAILURES or reason in CONFIG_FAILURES:
                return f"pod {name} container {status['name']}: {reason}: {waiting.get('message', '')}"
            terminated = state.get("terminated") or last.get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                limit = limits.get(status["name"], {}).get("memory", "no limit")
                return f"pod {name} container {status['name']} was OOMKilled (memory limit {limit})"
            if reason == "CrashLoopBackOff":
                logs = self.kube.log_tail(self.namespace, name, status["name"])
                lines = "\n    ".join(logs.strip().splitlines()[-20:]) or "(no log)"
                return (f"pod {name} container {status['name']}: CrashLoopBackOff after {status.get('restartCount', 0)} "
                        f"restarts; last log lines:\n    {lines}")  # fmt: skip
        return None

    def _wait_ready(self, layer_name: str, top: dict[str, Any], applied: float) -> dict[str, float]:
        """Follow the layer through watches until ready; the marks seen (time.time()) by name."""
        events: queue.Queue[WatchEvent] = queue.Queue()
        stop = threading.Event()
        name = top["metadata"]["name"]
        top_selector = selector_labels(self.study, layer_name)
        self.kube.watch(top["apiVersion"], top["kind"], self.namespace, top_selector, events, stop)
        self.kube.watch("v1", "Pod", self.namespace, self.pod_selector(layer_name), events, stop)
        self.kube.watch("v1", "Event", self.namespace, None, events, stop)
        marks = {"applied": applied}
        pods: dict[str, dict[str, Any]] = {}
        pulled: dict[str, float] = {}
        unschedulable_since: dict[str, float] = {}
        deadline = applied + self.settings.ready_timeout_s
        last_state = "nothing seen yet"
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise LayerNotReadyError(
                        f"layers.{layer_name}: not ready within platform.ready_timeout_s "
                        f"({self.settings.ready_timeout_s:g} s); last seen: {last_state}"
                    )
                for pod_name in list(unschedulable_since):  # a grace can run out between events
                    if pod_name in pods and (failure := self.pod_failure(pods[pod_name], unschedulable_since)):
                        raise LayerNotReadyError(f"layers.{layer_name}: {failure}")
                try:
                    event = events.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                obj, kind = event.object, event.kind
                if event.type == "ERROR" or event.type == "DELETED":
                    continue
                if kind == "Event":
                    # Events and pods come through separate watches: keep every pull, match pods at the end.
                    involved = obj.get("involvedObject") or {}
                    if involved.get("kind") == "Pod" and obj.get("reason") == "Pulled" and involved.get("name"):
                        if involved["name"] in pods and not pulled.keys() & pods.keys():
                            progress.say(f"{layer_name}: engine start: image pulled after "
                                         f"{progress.elapsed(event.seen - applied)}")  # fmt: skip
                        pulled.setdefault(involved["name"], event.seen)
                    continue
                if kind == "Pod":
                    if not self._current_pod(obj, applied):
                        continue  # a pod of the previous spec, or one going away: not this rollout's
                    pods[obj["metadata"]["name"]] = obj
                    if conditions(obj).get("PodScheduled", {}).get("status") == "True":
                        _mark_once(marks, "scheduled", event.seen, layer_name)
                    statuses = (obj.get("status") or {}).get("containerStatuses") or []
                    if statuses and all("running" in (s.get("state") or {}) for s in statuses):
                        _mark_once(marks, "started", event.seen, layer_name)
                    failure = self.pod_failure(obj, unschedulable_since, event.seen)
                    last_state = f"pod {obj['metadata']['name']} phase {(obj.get('status') or {}).get('phase', '?')}"
                    if failure:
                        raise LayerNotReadyError(f"layers.{layer_name}: {failure}")
                    continue
                if obj.get("metadata", {}).get("name") == name:
                    failure = self._top_failure(obj)
                    if failure:
                        raise LayerNotReadyError(f"layers.{layer_name}: {failure}")
                    last_state = f"{top['kind']} conditions {json.dumps({k: v.get('status') for k, v in conditions(obj).items()})}"
                    if self._ready(obj):
                        marks["ready"] = event.seen
                        progress.say(f"{layer_name}: engine start: Ready after {progress.elapsed(event.seen - applied)}")
                        ours = [t for pod, t in pulled.items() if pod in pods]
                        if ours:
                            marks["image_pulled"] = min(ours)
                        return marks
        finally:
            stop.set()

    # --- reach --------------------------------------------------------------------------------------

    def in_cluster_url(self, layer_name: str) -> str:
        """The layer's OpenAI base URL from inside the cluster (its Service), as its kind names it."""
        return self.kind_of(layer_name).in_cluster_url(self.study, layer_name)

    def ready_pods(self, layer_name: str) -> list[dict[str, Any]]:
        """The layer's ready pods that are not being deleted, by name."""
        pods = self.kube.list("v1", "Pod", self.namespace, self.pod_selector(layer_name))
        ready = [p for p in pods if conditions(p).get("Ready", {}).get("status") == "True"
                 and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        return sorted(ready, key=lambda p: p["metadata"]["name"])

    def engine_port(self, layer_name: str, pod: dict[str, Any]) -> int:
        """The port of a pod's engine container (the kind names the containers and their default ports)."""
        containers = self.kind_of(layer_name).engine_containers
        for container in pod["spec"]["containers"]:
            if container["name"] in containers:
                ports = [p["containerPort"] for p in container.get("ports") or []]
                return ports[0] if ports else containers[container["name"]]
        raise PlatformError(f"layers.{layer_name}: pod {pod['metadata']['name']} has no engine container "
                            f"({', '.join(containers)})")  # fmt: skip

    def port_forward_target(self, layer_name: str) -> tuple[str, int]:
        """The ready pod and container port a port-forward to this layer connects to."""
        ready = self.ready_pods(layer_name)
        if not ready:
            raise PlatformError(f"layers.{layer_name}: no ready pod to forward to (selector {self.pod_selector(layer_name)})")
        return ready[0]["metadata"]["name"], self.engine_port(layer_name, ready[0])

    def client_cpus(self, layer_name: str) -> tuple[int, ...] | None:
        return None  # the engine runs on the cluster's nodes, not beside the client

    def metrics_targets(self, layer_name: str) -> list[MetricsTarget]:
        """Every ready pod of the layer: at its IP from inside the cluster, else through a port-forward of its own."""
        key, tls = self.study.api_key(), self.kind_of(layer_name).serves_tls
        scheme = "https" if tls else "http"
        targets = []
        for pod in self.ready_pods(layer_name):
            name, port = pod["metadata"]["name"], self.engine_port(layer_name, pod)
            ip = (pod.get("status") or {}).get("podIP")
            if self.settings.endpoint == "in-cluster" and ip:
                root = f"{scheme}://{ip}:{port}"
            else:
                forward = self._pod_forwards.get((name, port))
                if forward is None:
                    forward = PortForward(self.pod_connector(name, port), f"pod {name}:{port}")
                    self._pod_forwards[(name, port)] = forward
                root = forward.url.replace("http://", f"{scheme}://", 1)
            # A pod's own certificate names no IP or tunnel: checked as the study says for the layer.
            options = endpoint_options(self.study, layer_name)
            targets.append(MetricsTarget(name, root, key, verify_tls=options["verify_tls"] if tls else True,
                                         plain_http_key_allowed=options["plain_http_key_allowed"]))  # fmt: skip
        return targets

    def pod_connector(self, pod: str, port: int) -> Connector:
        """Opens one stream to ``pod:port`` through the API server (the websocket port-forward)."""
        own_client = kubernetes.client.ApiClient(copy.deepcopy(self.kube.api.configuration))  # portforward patches it
        return kubernetes_connector(own_client, self.namespace, pod, port)

    def gateway_endpoint(self, layer_name: str) -> tuple[str, dict[str, str]]:
        """``status.url`` of a layer with a gateway, and the Host header to send when the address is an IP."""
        kind = self.kind_of(layer_name)
        if not kind.has_gateway:
            raise PlatformError(f"layers.{layer_name}: {kind.title} has no gateway; use a port-forward or in-cluster")
        ref = self.top_ref(layer_name)
        obj = self.kube.get(*ref) or {}
        url = (obj.get("status") or {}).get("url")
        if not url:
            raise PlatformError(f"layers.{layer_name}: {ref[1]} has no status.url yet")
        if self.settings.gateway_address:
            parsed = urlsplit(url)
            routed = urlunsplit((parsed.scheme, self.settings.gateway_address, parsed.path, "", ""))
            return routed.rstrip("/") + "/v1", {"Host": parsed.netloc}
        return url.rstrip("/") + "/v1", {}

    def endpoint(self, layer_name: str, via: str | None = None) -> Endpoint:
        """Where a ready layer answers, by the path ``via`` (default ``platform.endpoint``) names; the path
        taken is recorded in the endpoint's ``via``.

        A layer without a gateway is reached through a port-forward under ``endpoint: gateway``.
        """
        kind = self.kind_of(layer_name)
        current = self.kube.get(*self.top_ref(layer_name))
        if not current or not self._ready(current):
            raise PlatformError(f"layers.{layer_name} is not deployed and ready in namespace {self.namespace}")
        served, key = self.study.model.served_name, self.study.api_key()
        mode, options = via or self.settings.endpoint, endpoint_options(self.study, layer_name)
        if mode == "in-cluster":
            return Endpoint(layer_name, self.in_cluster_url(layer_name), served, key, via="in-cluster", **options)
        if mode == "gateway" and kind.has_gateway:
            url, headers = self.gateway_endpoint(layer_name)
            return Endpoint(layer_name, url, served, key, headers=headers, via=f"gateway {url}", **options)
        forward = self._forwards.get(layer_name)
        if forward is None:
            try:
                pod, port = self.port_forward_target(layer_name)
                first = f"first {pod}:{port}"
            except PlatformError:  # ready with no pod: scaled to zero; a request finds the pod woken later
                first = "none ready now"

            def connect() -> socket.socket:
                # Each connection goes to a ready pod found now, as a Service would send it: the forward
                # outlives a rollout or a scale to zero and back.
                target = self.port_forward_target(layer_name)
                return self.pod_connector(*target)()

            _, top_kind, _, name = self.top_ref(layer_name)
            forward = PortForward(connect, f"a ready pod of {top_kind}/{name} ({first})")
            self._forwards[layer_name] = forward
        if kind.serves_tls:
            # The workload serves TLS with a certificate of its own, which names no 127.0.0.1: a study that
            # reaches it through the tunnel turns the check off for the layer (client.tls_verify).
            url = forward.url.replace("http://", "https://", 1)
            return Endpoint(layer_name, f"{url}/v1", served, key, **options,
                            via=f"port-forward to {forward.description} (TLS, the workload's own certificate)")  # fmt: skip
        return Endpoint(layer_name, f"{forward.url}/v1", served, key, via=f"port-forward to {forward.description}",
                        **options)  # fmt: skip

    def paths(self, layer_name: str) -> dict[str, Endpoint]:
        """The ways to reach a ready layer side by side: through its gateway (when it has one) and directly
        to its engine (the predictor's Service in-cluster, else a port-forward to a ready pod)."""
        out = {}
        if self.kind_of(layer_name).has_gateway:
            out["gateway"] = self.endpoint(layer_name, via="gateway")
        out["direct"] = self.endpoint(layer_name, via="in-cluster" if self.settings.endpoint == "in-cluster" else "port-forward")
        return out

    # --- change, scale, watch (the lifecycle experiments) -------------------------------------------

    def pods(self, layer_name: str) -> list[dict[str, Any]]:
        """The layer's pods that are not being deleted."""
        return [p for p in self.kube.list("v1", "Pod", self.namespace, self.pod_selector(layer_name))
                if not p["metadata"].get("deletionTimestamp")]  # fmt: skip

    def wait_for_pods(self, layer_name: str, count: int, timeout_s: float) -> float:
        """Seconds until the layer has exactly ``count`` pods (ready ones, when ``count`` > 0)."""
        t0 = time.time()
        while True:
            pods = self.pods(layer_name)
            if count == 0:
                if not self.kube.list("v1", "Pod", self.namespace, self.pod_selector(layer_name)):
                    return round(time.time() - t0, 3)
            elif len([p for p in pods if conditions(p).get("Ready", {}).get("status") == "True"]) == count:
                return round(time.time() - t0, 3)
            if time.time() - t0 > timeout_s:
                raise PlatformError(f"layers.{layer_name}: still {len(pods)} pod(s), not {count}, after {timeout_s:g} s")
            time.sleep(0.1)

    def replicas(self, layer_name: str) -> int | None:
        """The top object's spec.replicas, for a layer a person scales by hand (None otherwise, or when absent)."""
        if not self.kind_of(layer_name).scales_by_hand:
            return None
        top = self.kube.get(*self.top_ref(layer_name))
        return None if top is None else int((top.get("spec") or {}).get("replicas") or 0)

    def scale(self, layer_name: str, replicas: int) -> None:
        """Set the replicas of a layer scaled by hand, as ``kubectl scale`` does (the only scaling it has)."""
        kind = self.kind_of(layer_name)
        if not kind.scales_by_hand:
            raise PlatformError(f"layers.{layer_name}: a {kind.title} is not scaled by hand")
        api_version, top_kind, namespace, name = self.top_ref(layer_name)
        owner = foreign_owner(self.kube.get(api_version, top_kind, namespace, name), owner_labels(self.study, layer_name))
        if owner is not None:
            raise OwnershipError(f"layers.{layer_name}: {top_kind}/{name} in namespace {namespace} belongs to "
                                 f"another owner ({owner}); not scaled")  # fmt: skip
        self.kube.json("PATCH", object_path(api_version, top_kind, namespace, name), body={"spec": {"replicas": replicas}},
                       content_type="application/merge-patch+json")  # fmt: skip

    def wait_ready(self, layer_name: str, since: float) -> dict[str, float]:
        """Wait until the layer is ready again after a change made at ``since`` (time.time()); the marks seen."""
        top = self.kube.get(*self.top_ref(layer_name))
        if top is None:
            raise PlatformError(f"layers.{layer_name} is not deployed in namespace {self.namespace}")
        return self._wait_ready(layer_name, top, since)

    def traffic(self, layer_name: str) -> list[dict[str, Any]]:
        """What the controller reports of the traffic split: ``status.components.predictor.traffic``."""
        top = self.kube.get(*self.top_ref(layer_name)) or {}
        predictor = (((top.get("status") or {}).get("components") or {}).get("predictor") or {})
        return list(predictor.get("traffic") or [])

    def pod_timeline(self, layer_name: str) -> PodTimeline:
        """Stamps, from now on, when the layer's new pods are created, scheduled, pulled, started and ready."""
        return PodTimeline(self.kube, self.namespace, self.pod_selector(layer_name))

    def top_ref(self, layer_name: str) -> tuple[str, str, str, str]:
        """(apiVersion, kind, namespace, name) of the object whose readiness is the layer's."""
        ref = self.kind_of(layer_name).top_ref(self.study, layer_name)
        return ref.api_version, ref.kind, self.namespace, ref.name

    def status(self) -> list[dict[str, Any]]:
        """The study's layers present on the cluster: top object, readiness, spec hash, objects created."""
        rows = []
        for layer_name in self.study.layers:
            ref = self.top_ref(layer_name)
            try:
                top = self.kube.get(*ref)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            # An object of the layer's name that another study or layer owns is not this layer's.
            if top and foreign_owner(top, owner_labels(self.study, layer_name)) is None:
                rows.append({"layer": layer_name, "state": "ready" if self._ready(top) else "not ready",
                             "where": f"{ref[1]}/{ref[3]} in {self.namespace}",
                             "detail": f"spec {(top['metadata'].get('labels') or {}).get(HASH_LABEL)}, "
                                       f"{len(self.created_objects(layer_name))} objects created by the platform"})  # fmt: skip
        return rows

    # --- stop ---------------------------------------------------------------------------------------

    def teardown(self, layer_names: list[str] | None = None, wait_s: float = 300.0) -> list[str]:
        """Delete every object labelled with the study (and layer), then wait until they are gone."""
        selectors = (
            [{MANAGED_BY: "servinglab", STUDY_LABEL: self.study.study, LAYER_LABEL: n} for n in layer_names]
            if layer_names
            else [{MANAGED_BY: "servinglab", STUDY_LABEL: self.study.study}]
        )
        for name in list(self._forwards) if not layer_names else [n for n in layer_names if n in self._forwards]:
            self._forwards.pop(name).close()
        for key in list(self._pod_forwards):
            self._pod_forwards.pop(key).close()
        deleted: list[tuple[str, str, str]] = []
        for selector in selectors:
            for kind in teardown_kinds():
                for api_version in self._versions_of(kind):
                    try:
                        found = self.kube.list(api_version, kind, self.namespace, selector)
                    except ApiException as exc:
                        if exc.status == 404:  # the kind is not installed on this cluster
                            continue
                        if exc.status == 403 and kind in ("Job", "ConfigMap"):
                            break  # rights only an in-cluster load needs: without them it made nothing
                        raise
                    for obj in found:
                        if self.kube.delete(api_version, kind, self.namespace, obj["metadata"]["name"]):
                            deleted.append((api_version, kind, obj["metadata"]["name"]))
                    break  # a kind's served versions list the same objects
        deadline = time.time() + wait_s
        pending = list(deleted)
        while pending and time.time() < deadline:
            pending = [ref for ref in pending if self.kube.get(ref[0], ref[1], self.namespace, ref[2]) is not None]
            if pending:
                time.sleep(0.2)
        if pending:
            raise PlatformError("still there after teardown: " + ", ".join(f"{k}/{n}" for _, k, n in pending))
        return [f"{kind}/{name}" for _, kind, name in deleted]

    def _versions_of(self, kind: str) -> list[str]:
        custom = layers.resource_types().get(kind)  # every served version lists the same objects; 404 when not served
        return list(custom.api_versions) if custom else [API_VERSIONS[kind]]


class PodTimeline:
    """Watches a layer's pods and the namespace's events, keeping the first time each pod reached each mark
    (created, scheduled, image pulled, started, ready), on the same clock as everything else (time.time())."""

    MARKS = ("created", "scheduled", "image_pulled", "started", "ready")

    def __init__(self, kube: Kube, namespace: str, selector: dict[str, str]) -> None:
        self.kube, self.namespace, self.selector = kube, namespace, selector
        self.marks: dict[str, dict[str, float]] = {}
        self._events: queue.Queue[WatchEvent] = queue.Queue()
        self._stop = threading.Event()
        self._known: set[str] = set()

    def __enter__(self) -> PodTimeline:
        self._known = {p["metadata"]["name"] for p in self.kube.list("v1", "Pod", self.namespace, self.selector)}
        self.kube.watch("v1", "Pod", self.namespace, self.selector, self._events, self._stop)
        self.kube.watch("v1", "Event", self.namespace, None, self._events, self._stop)
        self._thread = threading.Thread(target=self._run, name="servinglab-pod-timeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            obj = event.object
            if event.type == "ERROR" or not obj.get("metadata"):
                continue
            if event.kind == "Event":
                involved = obj.get("involvedObject") or {}
                if involved.get("kind") == "Pod" and obj.get("reason") == "Pulled" and involved.get("name") in self.marks:
                    self.marks[involved["name"]].setdefault("image_pulled", event.seen)
                continue
            name = obj["metadata"]["name"]
            if name in self._known or event.type == "DELETED":
                continue  # a pod that was there before: not part of what is being timed
            marks = self.marks.setdefault(name, {"created": event.seen})
            if conditions(obj).get("PodScheduled", {}).get("status") == "True":
                marks.setdefault("scheduled", event.seen)
            statuses = (obj.get("status") or {}).get("containerStatuses") or []
            if statuses and all("running" in (c.get("state") or {}) for c in statuses):
                marks.setdefault("started", event.seen)
            if conditions(obj).get("Ready", {}).get("status") == "True":
                marks.setdefault("ready", event.seen)

    def wait_for(self, mark: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``mark``: the watch may deliver a pod's Ready after its first answer."""
        deadline = time.monotonic() + timeout_s
        while mark not in self.first():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def first(self) -> dict[str, float]:
        """The earliest time each mark was reached by any new pod."""
        out: dict[str, float] = {}
        for marks in self.marks.values():
            for mark, at in marks.items():
                out[mark] = min(out.get(mark, at), at)
        return {mark: out[mark] for mark in self.MARKS if mark in out}


def _mark_once(marks: dict[str, float], mark: str, seen: float, layer_name: str) -> None:
    """Keep the first time a layer's start reached ``mark``, and tell the batch then."""
    if mark not in marks:
        marks[mark] = seen
        progress.say(f"{layer_name}: engine start: pod {mark} after {progress.elapsed(seen - marks['applied'])}")


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        return str(exc.reason)


def prerequisite_crds() -> dict[str, str]:
    """The CRDs the preflight looks for: what any registered kind may rely on, name → label."""
    return layers.known_crds()


def control_plane_namespaces(checks: dict[str, Any]) -> list[str]:
    """Namespaces whose pods serve some registered kind: their controllers' and their control planes'."""
    found = [c["namespace"] for c in checks.get("controllers", [])]
    return list(dict.fromkeys([*found, *(ns for kind in layers.kinds() for ns in kind.control_plane)]))


class _Lenient:
    """Reads for the preflight: a list or get the user's role forbids gives nothing and is noted."""

    def __init__(self, kube: Kube) -> None:
        self.kube, self.forbidden = kube, set[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kube, name)

    def list(self, api_version: str, kind: str, namespace: str | None, *args: Any) -> list[dict[str, Any]]:
        try:
            return self.kube.list(api_version, kind, namespace, *args)
        except ApiException as exc:
            if exc.status in (401, 403) and kind != "CustomResourceDefinition":
                self.forbidden.add(f"{kind} ({'all namespaces' if namespace is None else namespace})")
                return []
            raise

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.kube.get(api_version, kind, namespace, name)
        except ApiException as exc:
            if exc.status in (401, 403):
                self.forbidden.add(f"{kind} {name}")
                return None
            raise


def _status_url(top: dict[str, Any] | None) -> str | None:
    """The URL a KServe kind's controller published (``status.url``); a Deployment has none."""
    return ((top or {}).get("status") or {}).get("url")


def _sum_requests(pods: list[dict[str, Any]]) -> dict[str, float]:
    total = {"cpu_cores": 0.0, "memory_gib": 0.0}
    for pod in pods:
        for container in (pod.get("spec") or {}).get("containers") or []:
            requests = (container.get("resources") or {}).get("requests") or {}
            total["cpu_cores"] += parse_quantity(requests.get("cpu", "0"))
            total["memory_gib"] += parse_quantity(requests.get("memory", "0")) / 2**30
    return {k: round(v, 3) for k, v in total.items()}
