"""A test-side controller: plays the Deployment, ReplicaSet, KServe, Knative and kubelet controllers' part
against the emulator.

It watches the namespace's Deployments, InferenceServices and LLMInferenceServices through the HTTP API
and, step by step, creates the pods the real controllers would create from them (labelled and named as
they label and name them), schedules them, emits the image's Pulled event, starts their containers and
reports readiness on the pods and on the top object; or, per scenario, stops at the failure the real
cluster would show. Deleting a top object deletes what it owned, as the garbage collector does.

What the real controllers do that it imitates:

- Rollouts. A new generation whose pod template changed gets a new ReplicaSet (a new revision in
  Knative mode). A raw Deployment with strategy Recreate deletes the old pods first, then brings the new
  one up (a gap with nothing serving); RollingUpdate (KServe Standard, llm-d) brings the new pod up first,
  then deletes the old one. A change of replicas alone scales the current ReplicaSet. The top object's
  status says the new generation is ready only once the old pods are gone.
- KServe Knative mode: each new predictor template is a revision ``<name>-predictor-00001``, ...; with
  ``canaryTrafficPercent`` the new revision takes that share and the last revision rolled out to 100 %
  keeps the rest; without it the new revision takes 100 % once ready and the revisions left without
  traffic lose their pods. ``status.components.predictor`` carries ``traffic``, ``latestCreatedRevision``,
  ``latestReadyRevision``, ``latestRolledoutRevision`` and ``previousRolledoutRevision``, kept as KServe's
  ``PropagateStatus`` keeps them. With ``minReplicas: 0`` a revision without a request for ``idle_s``
  loses its pods (the status stays Ready); a request for it brings a pod back (``activate``, the
  activator's part, called by the test network's gateway).
- KServe Standard mode ``spec.canary``: a second Deployment per canary predictor, its share of the
  traffic in the HTTPRoute's weights, both listed in ``status.components.predictor.traffic`` and the
  canary's readiness in ``status.canaryStatuses``.

A network (tests/kube_network.py) may be attached: the controller tells it when a pod becomes ready
(before the pod says so, as a readiness probe passes only once the server listens) and when a pod goes,
and the network reports requests back for Knative's autoscaling.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from servinglab.platforms.kube import Kube, WatchEvent, object_path

# How often owners held for their dependents are looked up again: each lookup lists every top kind,
# which costs the in-process emulator enough to slow the serving it also runs.
RESYNC_S = 5.0
TOP_KINDS = [
    ("apps/v1", "Deployment"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("serving.kserve.io/v1alpha1", "LLMInferenceService"),
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"),
]
SCENARIOS = ("ok", "image_pull", "crashloop", "oom", "unschedulable", "reconcile_failed", "stall",
             "canary_never_ready", "scale_up_stall")  # fmt: skip
EVERY_POD_FAILS = ("image_pull", "crashloop", "oom", "unschedulable", "stall")
# The first ReplicaSet's pod-template-hash per workload kind, stable so tests can name the objects.
FIRST_HASH = {"Deployment": "5d8f7c9b6", "Standard": "7c6d5", "llm-d": "6b9c8"}
CRASH_LOG = "INFO loading weights\nValueError: max-model-len 8192 exceeds the KV cache\n"
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"
ISVC_LABEL = "serving.kserve.io/inferenceservice"
REVISION_LABEL = "serving.knative.dev/revision"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _condition(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class _Gone(Exception):
    """The top object was deleted: its controller stops creating anything for it."""


class PodNetwork(Protocol):
    """What the controller tells a network about pods (tests/kube_network.py implements it)."""

    def pod_ready(self, pod: dict[str, Any], revision: str, service: str) -> None: ...

    def pod_gone(self, pod_name: str) -> None: ...


@dataclass(eq=False)
class Revision:
    """One version of a workload's pod template and its pods: a ReplicaSet, or a Knative revision."""

    name: str  # the ReplicaSet's name, or the Knative revision's
    service: str  # the Service its pods are behind: what a route sends traffic to
    template: dict[str, Any]  # {"labels": ..., "containers": [...]}
    template_hash: str
    owner: dict[str, Any]  # the object its pods are owned by
    first: bool  # the workload's first template of this service, or a rollback to it (a canary never is)
    canary: bool = False
    min_replicas: int = 1  # Knative: 0 lets the revision scale to zero
    pods: dict[str, bool] = field(default_factory=dict)  # pod name → ready
    ran_at_zero: bool = False  # scaled to zero since it last ran: bringing pods up is a scale-up
    activating: bool = False
    in_flight: int = 0
    last_request: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> int:
        return sum(self.pods.values())


@dataclass(eq=False)
class Workload:
    """What the controllers keep of one top object between its events."""

    api_version: str
    kind: str
    name: str
    uid: str
    mode: str  # "Deployment" (raw), "Standard", "Knative" or "llm-d"
    lock: threading.RLock = field(default_factory=threading.RLock)
    revisions: list[Revision] = field(default_factory=list)
    generation: int = 0
    deleted: bool = False
    pending: dict[str, Any] | None = None  # the newest spec not reconciled yet
    worker: threading.Thread | None = None
    made: dict[str, dict[str, Any]] = field(default_factory=dict)  # objects created once, by kind/name
    routed: bool = False  # the gateway has a route for it (status.url set)
    knative_revisions: int = 0
    latest_created: str = ""
    latest_ready: str = ""
    latest_rolledout: str = ""
    previous_rolledout: str = ""
    canary_percent: int | None = None
    traffic: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None  # why the newest revision cannot become ready

    def of(self, service: str) -> list[Revision]:
        return [r for r in self.revisions if r.service == service]


class Controller:
    """Runs the controllers against ``namespace`` from a thread while open (a context manager).

    Parameters
    ----------
    kube: the emulator's API.
    namespace: the namespace watched.
    scenario: ``ok``, or the failure every pod shows (``image_pull``, ``crashloop``, ``oom``,
        ``unschedulable``, ``stall`` — running but never ready), ``reconcile_failed`` (KServe kinds get
        no pod), ``canary_never_ready`` (pods of any revision after the first, and of ``spec.canary``,
        crash-loop) or ``scale_up_stall`` (pods for a scale-up from zero stay unschedulable).
    step_s: the time between two steps of a pod's bring-up.
    emulator: the emulator itself, to serve a crashed container's log.
    idle_s: how long a Knative revision with ``minReplicas: 0`` keeps its pods without a request.
    network: told when pods become ready and go (see ``PodNetwork``).
    """

    def __init__(self, kube: Kube, namespace: str, scenario: str = "ok", step_s: float = 0.05,
                 emulator: Any = None, idle_s: float = 0.5, network: PodNetwork | None = None) -> None:  # fmt: skip
        assert scenario in SCENARIOS, scenario
        self.kube, self.namespace, self.scenario, self.step_s = kube, namespace, scenario, step_s
        self.emulator, self.idle_s, self.network = emulator, idle_s, network
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.shown: list[str] = []  # what the controller made the cluster show, in order
        self.errors: list[str] = []  # exceptions in the controller's threads (a test may assert none)
        self.workloads: dict[tuple[str, str], Workload] = {}
        self._routes: dict[str, list[tuple[str, int]]] = {}  # host → [(service, percent)]
        self._state = threading.Lock()  # guards workloads, routes, request counts and pod names
        self._pod_names: set[str] = set()
        self._written: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) → the status last written
        self._thread = threading.Thread(target=self._run, name="test-controller", daemon=True)

    def __enter__(self) -> Controller:
        for api_version, kind in TOP_KINDS:
            self.kube.watch(api_version, kind, self.namespace, {"app.kubernetes.io/managed-by": "servinglab"},
                            self.events, self.stop)
        self.kube.watch("v1", "Pod", self.namespace, None, self.events, self.stop)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(5)

    # --- what the network asks ---------------------------------------------------------------------

    def route(self, host: str) -> list[tuple[str, int]] | None:
        """The services a gateway splits ``host``'s requests over, with their percentages (None: no route)."""
        with self._state:
            return self._routes.get(host.lower())

    def _revision(self, name: str) -> tuple[Workload, Revision] | None:
        for workload in list(self.workloads.values()):
            for revision in workload.revisions:
                if revision.name == name:
                    return workload, revision
        return None

    def request_started(self, revision: str) -> None:
        """A request reached a pod of ``revision`` (Knative's queue-proxy reports it to the autoscaler)."""
        with self._state:
            found = self._revision(revision)
            if found:
                found[1].in_flight += 1
                found[1].last_request = time.monotonic()

    def request_ended(self, revision: str) -> None:
        with self._state:
            found = self._revision(revision)
            if found:
                found[1].in_flight = max(0, found[1].in_flight - 1)
                found[1].last_request = time.monotonic()

    def activate(self, service: str) -> bool:
        """A request is held for ``service``, which has no ready pod: if it is a Knative revision scaled to
        zero, bring a pod up (the activator asks the autoscaler for one). False: nothing will come."""
        with self._state:
            found = self._revision(service)
            if not found or found[0].mode != "Knative" or found[0].deleted:
                return False
            workload, revision = found
            revision.last_request = time.monotonic()
            if revision.activating or revision.pods:
                return True  # on its way up already
            revision.activating = True
        threading.Thread(target=self._activate, args=(workload, revision), daemon=True).start()
        return True

    def _activate(self, workload: Workload, revision: Revision) -> None:
        try:
            with workload.lock:
                self.shown.append(f"Revision/{revision.name} scale from zero")
                self._scale(workload, revision, max(1, revision.min_replicas), lambda: None)
        except _Gone:
            pass
        except Exception:  # noqa: BLE001 - reported through self.errors
            self.errors.append(traceback.format_exc())
        finally:
            with self._state:
                revision.activating = False
                revision.last_request = time.monotonic()

    # --- objects and pods --------------------------------------------------------------------------

    def _patch_status(self, api_version: str, kind: str, name: str, status: dict[str, Any]) -> None:
        """Merge ``status`` in, unless nothing changes (a real controller writes no unchanged status); a
        condition keeps its lastTransitionTime while its status stays."""
        key = (kind, name)
        before = self._written.get(key, {})
        if "conditions" in status:
            previous = {c["type"]: c for c in before.get("conditions") or []}
            status["conditions"] = [
                {**c, "lastTransitionTime": previous[c["type"]]["lastTransitionTime"]}
                if c["type"] in previous and previous[c["type"]]["status"] == c["status"] else c
                for c in status["conditions"]
            ]
        if all(before.get(k) == v for k, v in status.items()):
            return
        self._written[key] = {**before, **status}
        try:
            self.kube.json("PATCH", object_path(api_version, kind, self.namespace, name, "status"),
                           body={"status": status}, content_type="application/merge-patch+json")  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: nothing to report on
                raise
            return
        self.shown.append(f"{kind}/{name} {sorted(status)}")

    def _make(self, workload: Workload, api_version: str, kind: str, name: str, owner: dict[str, Any],
              spec: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """An object the controller creates once, owned by ``owner`` (garbage-collected with it)."""
        key = f"{kind}/{name}"
        if workload.deleted:
            raise _Gone(key)
        if key not in workload.made:
            ref = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"], "controller": True}]  # fmt: skip
            workload.made[key] = self.kube.apply({"apiVersion": api_version, "kind": kind, "spec": spec, "metadata": {
                "name": name, "namespace": self.namespace, "ownerReferences": ref}})  # fmt: skip
        return workload.made[key]

    def _failure(self, revision: Revision, scale_up: bool) -> str | None:
        """Where, per scenario, this revision's new pods stop."""
        if self.scenario in EVERY_POD_FAILS:
            return self.scenario
        if self.scenario == "canary_never_ready" and (not revision.first or revision.canary):
            return "crashloop"
        if self.scenario == "scale_up_stall" and scale_up:
            return "unschedulable"
        return None

    def _pod_name(self, workload: Workload, revision: Revision) -> str:
        if workload.mode == "Knative":
            base = f"{revision.owner['metadata']['name']}-{_digest([revision.name, len(self._pod_names)])[:5]}"
        else:
            base = f"{workload.name}{'-canary' if revision.canary else ''}-{workload.generation}-pod"
        name, n = base, 1
        with self._state:
            while name in self._pod_names:
                name, n = f"{base}-{n}", n + 1
            self._pod_names.add(name)
        return name

    def _create_pod(self, workload: Workload, revision: Revision) -> str:
        if workload.deleted:
            raise _Gone(revision.name)
        name = self._pod_name(workload, revision)
        owner = revision.owner
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": dict(revision.template["labels"]),
                         "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "controller": True,
                                              "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]},
            "spec": {"containers": json.loads(json.dumps(revision.template["containers"]))},
            "status": {"phase": "Pending", "conditions": []},
        }  # fmt: skip
        revision.pods[name] = False
        self.kube.json("POST", f"/api/v1/namespaces/{self.namespace}/pods", body=pod)
        return name

    def _step(self, workload: Workload | None = None) -> bool:
        return not self.stop.wait(self.step_s) and not (workload and workload.deleted)

    def _advance_pod(self, workload: Workload, revision: Revision, pod_name: str, failure: str | None) -> bool:
        """Take a created pod through scheduling, image pull, start and readiness (the scheduler's and the
        kubelet's part), or stop at ``failure``; True when the pod is ready."""
        pod = self.kube.get("v1", "Pod", self.namespace, pod_name)
        if pod is None:
            return False
        containers = [c["name"] for c in pod["spec"]["containers"]]
        if not self._step(workload):
            return False
        if failure == "unschedulable":
            self._patch_status("v1", "Pod", pod_name, {"conditions": [
                _condition("PodScheduled", "False", "Unschedulable", UNSCHEDULABLE)]})  # fmt: skip
            return False
        self._patch_status("v1", "Pod", pod_name, {"conditions": [_condition("PodScheduled", "True")]})
        if not self._step(workload):
            return False
        if failure == "image_pull":
            waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "vllm/vllm-openai:v0.32.0"'}
            self._patch_status("v1", "Pod", pod_name, {"containerStatuses": [
                {"name": c, "ready": False, "restartCount": 0, "state": {"waiting": waiting}} for c in containers]})
            return False
        self.kube.json("POST", f"/api/v1/namespaces/{self.namespace}/events", body={
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{pod_name}.pulled", "namespace": self.namespace},
            "involvedObject": {"kind": "Pod", "name": pod_name, "namespace": self.namespace},
            "reason": "Pulled", "message": "Successfully pulled image", "type": "Normal"})  # fmt: skip
        self.shown.append(f"Event/{pod_name} Pulled")
        if not self._step(workload):
            return False
        if failure in ("crashloop", "oom"):
            last = {"terminated": {"reason": "OOMKilled", "exitCode": 137} if failure == "oom" else
                    {"reason": "Error", "exitCode": 1}}  # fmt: skip
            if self.emulator is not None:
                for c in containers:
                    self.emulator.logs[(pod_name, c)] = CRASH_LOG
            self._patch_status("v1", "Pod", pod_name, {"containerStatuses": [
                {"name": c, "ready": False, "restartCount": 3, "lastState": last,
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}}
                for c in containers]})  # fmt: skip
            return False
        running = {"running": {"startedAt": _now()}}
        self._patch_status("v1", "Pod", pod_name, {"phase": "Running", "containerStatuses": [
            {"name": c, "ready": False, "restartCount": 0, "state": running} for c in containers]})
        if failure == "stall" or not self._step(workload):
            return False
        if self.network is not None:
            self.network.pod_ready(pod, revision.name, revision.service)
        self._patch_status("v1", "Pod", pod_name, {"conditions": [_condition("PodScheduled", "True"),
                                                                  _condition("Ready", "True")],
                                                   "containerStatuses": [{"name": c, "ready": True, "restartCount": 0,
                                                                          "state": running} for c in containers]})  # fmt: skip
        with self._state:
            if pod_name in revision.pods:
                revision.pods[pod_name] = True
                revision.last_request = time.monotonic()  # Knative's idle clock starts when the pod serves
        return True

    def _delete_pod(self, revision: Revision, pod_name: str) -> None:
        """The pod leaves its Service's endpoints, its server stops, then it is deleted."""
        with self._state:
            revision.pods.pop(pod_name, None)
        if self.network is not None:
            self.network.pod_gone(pod_name)
        self.kube.delete("v1", "Pod", self.namespace, pod_name)

    def _scale(self, workload: Workload, revision: Revision, replicas: int, on_change: Any) -> bool:
        """Delete pods above ``replicas`` or bring the missing ones up (concurrently); True when all are ready."""
        for pod_name in list(revision.pods)[replicas:]:
            self._delete_pod(revision, pod_name)
        if replicas == 0:
            revision.ran_at_zero = True
            on_change()
            return True
        failure = self._failure(revision, scale_up=revision.ran_at_zero)
        created = [self._create_pod(workload, revision) for _ in range(replicas - len(revision.pods))]
        on_change()
        results: list[bool] = []

        def advance(pod_name: str) -> None:
            try:
                results.append(self._advance_pod(workload, revision, pod_name, failure))
            except Exception:  # noqa: BLE001 - a test reads self.errors
                self.errors.append(traceback.format_exc())

        threads = [threading.Thread(target=advance, args=(p,), daemon=True) for p in created]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if workload.deleted:
            for pod_name in created:
                if self.kube.get("v1", "Pod", self.namespace, pod_name) is not None:
                    self._delete_pod(revision, pod_name)
            return False
        ok = all(results) and revision.ready >= replicas
        if ok:
            revision.ran_at_zero = False
        return ok

    def _new_revision(self, workload: Workload, service: str, template: dict[str, Any], parent: dict[str, Any],
                      canary: bool = False) -> Revision:  # fmt: skip
        """A ReplicaSet of ``parent`` (a Deployment) for ``template``; pods labelled with its pod-template-hash."""
        template_hash = _digest(template)
        first = not workload.of(service) and not canary
        suffix = FIRST_HASH[workload.mode] if first else template_hash[:9]
        name = f"{parent['metadata']['name']}-{suffix}"
        owner = self._make(workload, "apps/v1", "ReplicaSet", name, parent, {"replicas": 1})
        labels = {**template["labels"], "pod-template-hash": suffix}
        revision = Revision(name, service, {**template, "labels": labels}, template_hash, owner, first, canary)
        with self._state:
            workload.revisions.append(revision)
        return revision

    def _rollout(self, workload: Workload, service: str, template: dict[str, Any], replicas: int, parent: dict[str, Any],
                 on_change: Any, recreate: bool = False, canary: bool = False) -> bool:  # fmt: skip
        """Bring ``service`` to ``template`` × ``replicas``: scale the current ReplicaSet when the template is
        the same; otherwise a new ReplicaSet, the old pods deleted first (Recreate) or once the new ones are
        ready (RollingUpdate; a new ReplicaSet that never gets ready leaves the old pods serving)."""
        current = workload.of(service)[-1] if workload.of(service) else None
        if current is not None and current.template_hash == _digest(template):
            ok = self._scale(workload, current, replicas, on_change)
            on_change()
            return ok
        old = workload.of(service)
        again = next((r for r in old if r.template_hash == _digest(template)), None)
        if again is not None:  # back to an earlier template (a rollback): its ReplicaSet scales up again
            old.remove(again)
            with self._state:
                workload.revisions.remove(again)
                workload.revisions.append(again)
        revision = again or self._new_revision(workload, service, template, parent, canary)
        if recreate:
            for previous in old:
                self._scale(workload, previous, 0, lambda: None)
            on_change()
        ok = self._scale(workload, revision, replicas, on_change)
        if ok:
            for previous in old:
                self._scale(workload, previous, 0, lambda: None)
                with self._state:
                    workload.revisions.remove(previous)
        on_change()
        return ok

    # --- the pod templates the controllers derive ----------------------------------------------------

    def _predictor_template(self, top: dict[str, Any], predictor: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
        """The predictor's pod: its own containers, or the ServingRuntime's container with the model's args
        appended (KServe merges them so)."""
        containers = predictor.get("containers")
        if not containers:
            model = predictor.get("model") or {}
            runtime = self.kube.get("serving.kserve.io/v1alpha1", "ServingRuntime", self.namespace,
                                    model["runtime"]) if model.get("runtime") else None  # fmt: skip
            if runtime:
                container = dict(runtime["spec"]["containers"][0])
                container["args"] = [*(container.get("args") or []), *(model.get("args") or [])]
                if model.get("resources"):
                    container["resources"] = model["resources"]
                containers = [container]
            else:
                containers = [{"name": "kserve-container", "image": "runtime", "ports": [{"containerPort": 8080}]}]
        return {"labels": labels, "containers": containers}

    def _llmd_template(self, top: dict[str, Any]) -> dict[str, Any]:
        """KServe's well-known LLMInferenceService config: ``vllm serve`` of the mounted model under
        ``spec.model.name``, TLS with the workload's own certificate, the template's container merged in."""
        main = dict(top["spec"]["template"]["containers"][0])
        head = ["--served-model-name", top["spec"]["model"].get("name") or top["metadata"]["name"], "--port", "8000",
                "--ssl-certfile", "/var/run/kserve/tls/tls.crt", "--ssl-keyfile", "/var/run/kserve/tls/tls.key"]  # fmt: skip
        main.update(command=main.get("command") or ["vllm", "serve", "/mnt/models"], args=[*head, *(main.get("args") or [])],
                    ports=[{"containerPort": 8000, "name": "https", "protocol": "TCP"}])  # fmt: skip
        labels = {"app.kubernetes.io/name": top["metadata"]["name"], "kserve.io/component": "workload"}
        return {"labels": labels, "containers": [main]}

    # --- reconcile, per kind -------------------------------------------------------------------------

    def _reconcile(self, workload: Workload, top: dict[str, Any]) -> None:
        workload.generation = top["metadata"].get("generation", 1)
        if self.scenario == "reconcile_failed" and workload.kind != "Deployment":
            self._step()
            self._patch_status(workload.api_version, workload.kind, workload.name, {"conditions": [
                _condition("Ready", "False", "ReconcileFailed", "fails to reconcile predictor: no runtime found")]})
            return
        {"Deployment": self._reconcile_deployment, "Standard": self._reconcile_standard,
         "Knative": self._reconcile_knative, "llm-d": self._reconcile_llmd}[workload.mode](workload, top)  # fmt: skip

    def _reconcile_deployment(self, workload: Workload, top: dict[str, Any]) -> None:
        spec = top["spec"]
        template = {"labels": dict(spec["template"]["metadata"].get("labels") or {}),
                    "containers": spec["template"]["spec"]["containers"]}  # fmt: skip
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        self._rollout(workload, workload.name, template, spec.get("replicas", 1), top,
                      lambda: self._deployment_status(workload, top), recreate=recreate)  # fmt: skip

    def _deployment_status(self, workload: Workload, top: dict[str, Any]) -> None:
        """What the Deployment controller reports: counts over all its ReplicaSets' pods (zero counts
        omitted, as the API server omits them), Available against the wanted replicas less what the
        strategy may take down, Progressing done once only the new ReplicaSet's ready pods are left."""
        spec = top["spec"]
        want = spec.get("replicas", 1)
        revisions = workload.of(workload.name)
        current = revisions[-1]
        total, updated = sum(len(r.pods) for r in revisions), len(current.pods)
        ready = sum(r.ready for r in revisions)
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        available = ready >= want - (0 if recreate else want // 4)
        done = updated == want and total == want and current.ready >= want
        self._patch_status(workload.api_version, workload.kind, workload.name, {
            "observedGeneration": workload.generation, "replicas": total or None, "updatedReplicas": updated or None,
            "readyReplicas": ready or None, "availableReplicas": ready or None,
            "unavailableReplicas": max(want, total) - ready or None,
            "conditions": [
                _condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
                if available else
                _condition("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability."),
                _condition("Progressing", "True", "NewReplicaSetAvailable", f'ReplicaSet "{current.name}" has successfully progressed.')
                if done else
                _condition("Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{current.name}" is progressing.'),
            ]})  # fmt: skip

    def _host(self, workload: Workload, prefix: str = "") -> str:
        return f"{prefix}{workload.name}.{self.namespace}.example.com"

    def _set_routes(self, routes: dict[str, list[tuple[str, int]]]) -> None:
        with self._state:
            self._routes.update({host.lower(): route for host, route in routes.items()})

    def _isvc_labels(self, top: dict[str, Any]) -> dict[str, str]:
        return {**(top["metadata"].get("labels") or {}), ISVC_LABEL: top["metadata"]["name"], "component": "predictor"}

    def _reconcile_standard(self, workload: Workload, top: dict[str, Any]) -> None:
        name = workload.name
        predictor = top["spec"]["predictor"]

        def status() -> None:
            self._standard_status(workload, top)

        deployment = self._make(workload, "apps/v1", "Deployment", f"{name}-predictor", top, {"replicas": 1})
        self._make(workload, "v1", "Service", f"{name}-predictor", top, {"ports": [{"port": 80}]})
        self._make(workload, "autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-predictor", top,
                   {"minReplicas": 1, "maxReplicas": 1, "scaleTargetRef": {"kind": "Deployment", "name": f"{name}-predictor"}})
        self._make(workload, "gateway.networking.k8s.io/v1", "HTTPRoute", name, top, {"parentRefs": [{"name": "kserve-gateway"}]})
        # Standard mode has no scale to zero: the HPA keeps at least one replica.
        replicas = max(1, predictor.get("minReplicas", 1) or 1)
        labels = self._isvc_labels(top)
        self._rollout(workload, f"{name}-predictor", self._predictor_template(top, predictor, labels), replicas,
                      deployment, status)  # fmt: skip
        wanted = set()
        for index, canary in enumerate(top["spec"].get("canary") or []):
            service = f"{name}-predictor-canary" + (f"-{index}" if index else "")
            wanted.add(service)
            parent = self._make(workload, "apps/v1", "Deployment", service, top, {"replicas": 1})
            self._make(workload, "v1", "Service", service, top, {"ports": [{"port": 80}]})
            template = self._predictor_template(top, canary["predictor"], labels)
            self._rollout(workload, service, template, max(1, canary["predictor"].get("minReplicas", 1) or 1), parent,
                          status, canary=True)  # fmt: skip
        for revision in [r for r in workload.revisions if r.canary and r.service not in wanted]:
            self._scale(workload, revision, 0, lambda: None)
            with self._state:
                workload.revisions.remove(revision)
        status()

    def _standard_status(self, workload: Workload, top: dict[str, Any]) -> None:
        """KServe's PropagateRawStatus: PredictorReady follows the predictor Deployments — True once their
        rollout is done, Unknown while a new ReplicaSet progresses, False while nothing is available."""
        name = workload.name
        percents = {}
        for index, canary in enumerate(top["spec"].get("canary") or []):
            percents[f"{name}-predictor-canary" + (f"-{index}" if index else "")] = int(canary.get("trafficPercent", 0))
        services = [f"{name}-predictor", *percents]

        def done(service: str) -> bool:
            revisions = workload.of(service)
            return bool(revisions) and len(revisions) == 1 and revisions[0].pods != {} and all(revisions[0].pods.values())

        main_available = any(r.ready for r in workload.of(f"{name}-predictor"))
        if all(done(s) for s in services):
            predictor = _condition("PredictorReady", "True", "NewReplicaSetAvailable")
        elif main_available:
            predictor = _condition("PredictorReady", "Unknown", "ReplicaSetUpdated",
                                   f'ReplicaSet "{workload.of(services[0])[-1].name}" is progressing.')  # fmt: skip
        else:
            predictor = _condition("PredictorReady", "False", "MinimumReplicasUnavailable",
                                   "Deployment does not have minimum availability.")  # fmt: skip
        workload.routed = workload.routed or main_available
        status: dict[str, Any] = {"observedGeneration": workload.generation, "deploymentMode": "Standard"}
        conditions = [predictor]
        if workload.routed:
            route = [(f"{name}-predictor", 100 - sum(percents.values()))] + list(percents.items())
            self._set_routes({self._host(workload): route})
            conditions.append(_condition("IngressReady", "True"))
            status["url"] = f"http://{self._host(workload)}"
            status["address"] = {"url": f"http://{name}-predictor.{self.namespace}.svc.cluster.local"}
            component: dict[str, Any] = {"url": f"http://{name}-predictor.{self.namespace}.svc.cluster.local"}
            if percents:  # Standard mode has no revisions: the entries name the predictors' Deployments
                component["traffic"] = [{"revisionName": s, "percent": p, "latestRevision": s != f"{name}-predictor",
                                         "tag": "canary" if s != f"{name}-predictor" else "default"} for s, p in route]  # fmt: skip
            else:
                component["traffic"] = None
            status["components"] = {"predictor": component}
            status["canaryStatuses"] = [{"name": s, "trafficPercent": p, "ready": done(s)} for s, p in percents.items()] or None
        else:
            conditions.append(_condition("IngressReady", "Unknown", "PredictorNotReady"))
        ready = {c["status"] for c in conditions}
        overall = "True" if ready == {"True"} else "False" if "False" in ready else "Unknown"
        status["conditions"] = conditions + [_condition("Ready", overall, "" if overall == "True" else predictor["reason"])]
        self._patch_status(workload.api_version, workload.kind, name, status)

    def _reconcile_llmd(self, workload: Workload, top: dict[str, Any]) -> None:
        name = workload.name
        deployment = self._make(workload, "apps/v1", "Deployment", f"{name}-kserve", top, {"replicas": 1})
        self._make(workload, "v1", "Service", f"{name}-kserve-workload-svc", top, {"ports": [{"port": 8000}]})
        self._make(workload, "gateway.networking.k8s.io/v1", "HTTPRoute", f"{name}-kserve-route", top,
                   {"parentRefs": [{"name": "gw"}]})  # fmt: skip
        self._rollout(workload, f"{name}-kserve-workload-svc", self._llmd_template(top), top["spec"].get("replicas", 1),
                      deployment, lambda: self._llmd_status(workload))  # fmt: skip

    def _llmd_status(self, workload: Workload) -> None:
        """The LLMInferenceService controller: Ready = WorkloadsReady ∧ RouterReady."""
        revisions = workload.of(f"{workload.name}-kserve-workload-svc")
        done = len(revisions) == 1 and bool(revisions[0].pods) and all(revisions[0].pods.values())
        available = any(r.ready for r in revisions)
        workload.routed = workload.routed or available
        if done:
            workloads = _condition("WorkloadsReady", "True")
        else:
            workloads = _condition("WorkloadsReady", "Unknown" if available else "False", "ReplicaSetUpdated" if
                                   available else "MinimumReplicasUnavailable", "the workload's rollout is not done")  # fmt: skip
        router = _condition("RouterReady", "True") if workload.routed else _condition("RouterReady", "Unknown", "WorkloadsNotReady")
        overall = "True" if done and workload.routed else workloads["status"]
        status: dict[str, Any] = {"observedGeneration": workload.generation, "conditions": [
            workloads, router, _condition("Ready", overall, "" if overall == "True" else workloads["reason"])]}
        if workload.routed:
            self._set_routes({self._host(workload): [(f"{workload.name}-kserve-workload-svc", 100)]})
            status["url"] = f"http://{self._host(workload)}"
            status["address"] = {"url": f"https://{workload.name}-kserve-workload-svc.{self.namespace}.svc.cluster.local:8000"}
        self._patch_status(workload.api_version, workload.kind, workload.name, status)

    def _reconcile_knative(self, workload: Workload, top: dict[str, Any]) -> None:
        """A new revision when the predictor's template changed (not for canaryTrafficPercent alone), brought
        up with its initial scale; then the traffic as KServe sets it on the Knative Service."""
        name = workload.name
        predictor = top["spec"]["predictor"]
        body = {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}
        self._make(workload, "v1", "Service", f"{name}-predictor", top,
                   {"type": "ExternalName", "externalName": "knative-local-gateway.istio-system.svc.cluster.local"})
        latest = next((r for r in reversed(workload.revisions) if r.name == workload.latest_created), None)
        if latest is None or latest.template_hash != _digest(body):
            workload.knative_revisions += 1
            revision_name = f"{name}-predictor-{workload.knative_revisions:05d}"
            labels = {**self._isvc_labels(top), REVISION_LABEL: revision_name,
                      "serving.knative.dev/service": f"{name}-predictor",
                      "serving.knative.dev/configuration": f"{name}-predictor"}  # fmt: skip
            template = self._predictor_template(top, body, labels)
            deployment = self._make(workload, "apps/v1", "Deployment", f"{revision_name}-deployment", top, {"replicas": 1})
            owner = self._make(workload, "apps/v1", "ReplicaSet", f"{revision_name}-deployment-{_digest(template)[:10]}",
                               deployment, {"replicas": 1})  # fmt: skip
            # A rollback to the first template is a new Knative revision, but of the first (working) spec.
            first = latest is None or any(r.first and r.template_hash == _digest(body) for r in workload.revisions)
            revision = Revision(revision_name, revision_name, template, _digest(body), owner, first=first,
                                min_replicas=int(body.get("minReplicas", 1)))  # fmt: skip
            with self._state:
                workload.revisions.append(revision)
            workload.latest_created, workload.failure = revision_name, None
            self._knative_status(workload)
            if self._scale(workload, revision, max(1, revision.min_replicas), lambda: None):
                workload.latest_ready = revision_name
            elif workload.deleted or self.stop.is_set():
                return
            elif self._failure(revision, False) in ("crashloop", "oom"):
                workload.failure = (f'Revision "{revision_name}" failed with message: Container failed with: '
                                    f"{CRASH_LOG.strip().splitlines()[-1]}")  # fmt: skip
            else:
                self._knative_status(workload)  # stays Unknown until the progress deadline
                return
        workload.canary_percent = predictor.get("canaryTrafficPercent")
        if workload.latest_ready:
            self._knative_traffic(workload)
        self._knative_status(workload)

    def _knative_traffic(self, workload: Workload) -> None:
        """KServe's traffic on the Knative Service — ``latest`` (resolved to the latest ready revision) gets
        canaryTrafficPercent, the last revision rolled out to 100 % the rest, tagged ``prev`` — and the
        rolled-out bookkeeping of KServe's PropagateStatus. Revisions left without traffic lose their pods."""
        ready, percent = workload.latest_ready, workload.canary_percent
        predictor_host = f"{workload.name}-predictor.{self.namespace}.example.com"
        if percent is not None and workload.latest_rolledout:
            traffic = [
                {"tag": "latest", "revisionName": ready, "percent": percent, "latestRevision": True,
                 "url": f"http://latest-{predictor_host}"},
                {"tag": "prev", "revisionName": workload.latest_rolledout, "percent": 100 - percent,
                 "latestRevision": False, "url": f"http://prev-{predictor_host}"},
            ]  # fmt: skip
        else:
            traffic = [{"revisionName": ready, "percent": 100, "latestRevision": True}]
        for target in traffic:
            if target["revisionName"] == ready and target["latestRevision"] and target["percent"] == 100 \
                    and workload.latest_rolledout != ready:  # fmt: skip
                workload.previous_rolledout, workload.latest_rolledout = workload.latest_rolledout, ready
        workload.traffic = traffic
        split: dict[str, int] = {}
        for target in traffic:
            split[target["revisionName"]] = split.get(target["revisionName"], 0) + target["percent"]
        route = list(split.items())
        routes = {self._host(workload): route, predictor_host: route}
        routes.update({target["url"].removeprefix("http://"): [(target["revisionName"], 100)] for target in traffic if "url" in target})
        self._set_routes(routes)
        workload.routed = True
        for revision in workload.revisions:
            if revision.name not in split and revision.pods:
                self._scale(workload, revision, 0, lambda: None)

    def _knative_status(self, workload: Workload) -> None:
        """KServe's PropagateStatus of the Knative Service: PredictorReady is the Service's Ready — Unknown
        while the latest created revision is not ready yet, False when it failed."""
        name = workload.name
        if workload.failure:
            configuration = _condition("PredictorConfigurationReady", "False", "RevisionFailed", workload.failure)
        elif workload.latest_ready != workload.latest_created:
            configuration = _condition("PredictorConfigurationReady", "Unknown", "RevisionMissing",
                                       f'Configuration "{name}-predictor" is waiting for a Revision to become ready.')  # fmt: skip
        else:
            configuration = _condition("PredictorConfigurationReady", "True")
        route = _condition("PredictorRouteReady", "True") if workload.routed else \
            _condition("PredictorRouteReady", "Unknown", "RevisionMissing")  # fmt: skip
        statuses = {configuration["status"], route["status"]}
        overall = "True" if statuses == {"True"} else "False" if "False" in statuses else "Unknown"
        reason = "" if overall == "True" else configuration["reason"] or route["reason"]
        predictor = _condition("PredictorReady", overall, reason, configuration["message"])
        ingress = _condition("IngressReady", "True") if workload.routed else _condition("IngressReady", "Unknown", "PredictorNotReady")
        ready = "True" if overall == "True" and workload.routed else overall
        component: dict[str, Any] = {"latestCreatedRevision": workload.latest_created}
        for key, value in (("latestReadyRevision", workload.latest_ready), ("latestRolledoutRevision", workload.latest_rolledout),
                           ("previousRolledoutRevision", workload.previous_rolledout)):  # fmt: skip
            if value:
                component[key] = value
        status: dict[str, Any] = {"observedGeneration": workload.generation, "deploymentMode": "Knative",
                                  "components": {"predictor": component}}  # fmt: skip
        if workload.routed:
            component.update(traffic=workload.traffic, url=f"http://{name}-predictor.{self.namespace}.example.com",
                             address={"url": f"http://{name}-predictor.{self.namespace}.svc.cluster.local"})  # fmt: skip
            status["url"] = f"http://{self._host(workload)}"
            status["address"] = {"url": f"http://{name}-predictor.{self.namespace}.svc.cluster.local"}
        status["conditions"] = [predictor, ingress, configuration, route, _condition("Ready", ready, reason, configuration["message"])]
        self._patch_status(workload.api_version, workload.kind, name, status)

    # --- the autoscaler ------------------------------------------------------------------------------

    def _scale_idle_to_zero(self) -> None:
        """Knative's autoscaler: a revision allowed to scale to zero and idle for ``idle_s`` loses its pods."""
        now = time.monotonic()
        with self._state:
            workloads = list(self.workloads.values())
        for workload in workloads:
            if workload.mode != "Knative" or workload.deleted or not workload.lock.acquire(blocking=False):
                continue
            try:
                for revision in list(workload.revisions):
                    with self._state:
                        idle = (revision.min_replicas == 0 and revision.pods and all(revision.pods.values())
                                and not revision.activating and revision.in_flight == 0
                                and now - revision.last_request >= self.idle_s)  # fmt: skip
                    if idle:
                        self.shown.append(f"Revision/{revision.name} scale to zero")
                        self._scale(workload, revision, 0, lambda: None)
            finally:
                workload.lock.release()

    # --- events --------------------------------------------------------------------------------------

    def _work(self, workload: Workload) -> None:
        """One worker per top object: reconciles the newest spec seen, in order, until none is pending."""
        while not self.stop.is_set():
            with self._state:
                top, workload.pending = workload.pending, None
                if top is None:
                    workload.worker = None
                    return
            try:
                with workload.lock:
                    if not workload.deleted:
                        self._reconcile(workload, top)
            except _Gone:
                return
            except Exception:  # noqa: BLE001 - a test reads self.errors
                self.errors.append(traceback.format_exc())

    def _mode(self, top: dict[str, Any]) -> str:
        if top["kind"] == "Deployment":
            return "Deployment"
        if top["kind"] == "LLMInferenceService":
            return "llm-d"
        mode = (top["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode", "Knative")
        return "Standard" if mode in ("Standard", "RawDeployment") else "Knative"

    def _forget(self, top: dict[str, Any]) -> None:
        workload = self.workloads.get((top["kind"], top["metadata"]["name"]))
        if workload is None or workload.uid != top["metadata"].get("uid"):
            return
        workload.deleted = True
        with self._state:
            del self.workloads[(top["kind"], top["metadata"]["name"])]
            hosts = [h for h, route in self._routes.items() if any(s in {r.service for r in workload.revisions}
                                                                     for s, _ in route)]  # fmt: skip
            for host in hosts:
                del self._routes[host]

    def _collect_garbage(self, top: dict[str, Any]) -> None:
        """Delete what ``top`` owned, transitively, as Kubernetes' garbage collector does."""
        self._forget(top)
        owners = {top["metadata"].get("uid")}
        kinds = [("v1", "Pod"), ("apps/v1", "ReplicaSet"), ("apps/v1", "Deployment"), ("v1", "Service"),
                 ("autoscaling/v2", "HorizontalPodAutoscaler"), ("gateway.networking.k8s.io/v1", "HTTPRoute")]  # fmt: skip
        grew = True
        while grew:
            grew = False
            for api_version, kind in kinds:
                for obj in self.kube.list(api_version, kind, self.namespace):
                    refs = {r.get("uid") for r in obj["metadata"].get("ownerReferences") or []}
                    if refs & owners and obj["metadata"]["uid"] not in owners:
                        owners.add(obj["metadata"]["uid"])
                        if kind == "Pod" and self.network is not None:
                            self.network.pod_gone(obj["metadata"]["name"])
                        self._delete_dependent(api_version, kind, obj["metadata"]["name"])
                        grew = True

    def _delete_dependent(self, api_version: str, kind: str, name: str) -> None:
        """Deleted at once, not held by a foregroundDeletion finalizer nobody would release: the collector
        itself removes the dependents' own dependents."""
        try:
            self.kube.request("DELETE", object_path(api_version, kind, self.namespace, name),
                              body={"propagationPolicy": "Background"}).read()  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _pod_event(self, event: Any) -> None:
        """A pod deleted by someone else: its containers stop (the kubelet's part)."""
        if event.type != "DELETED":
            return
        name = event.object.get("metadata", {}).get("name")
        with self._state:
            for workload in self.workloads.values():
                for revision in workload.revisions:
                    revision.pods.pop(name, None)
        if self.network is not None:
            self.network.pod_gone(name)

    def _release_held(self) -> None:
        """Resync, as a real controller does: an owner held for its dependents whose MODIFIED event fell
        between two watches (each watch reopens without a resourceVersion) is collected all the same."""
        for api_version, kind in TOP_KINDS:
            try:
                found = self.kube.list(api_version, kind, self.namespace, {"app.kubernetes.io/managed-by": "servinglab"})
            except ApiException:
                continue
            for obj in found:
                meta = obj["metadata"]
                if meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
                    obj.setdefault("kind", kind)
                    obj.setdefault("apiVersion", api_version)
                    self.events.put(WatchEvent("MODIFIED", kind, obj, time.time()))

    def _run(self) -> None:
        last_tick = last_resync = 0.0
        while not self.stop.is_set():
            if time.monotonic() - last_resync >= RESYNC_S:
                last_resync = time.monotonic()
                try:
                    self._release_held()
                except Exception:  # noqa: BLE001
                    self.errors.append(traceback.format_exc())
            if time.monotonic() - last_tick >= min(0.05, self.idle_s / 4):
                last_tick = time.monotonic()
                try:
                    self._scale_idle_to_zero()
                except Exception:  # noqa: BLE001
                    self.errors.append(traceback.format_exc())
            try:
                event = self.events.get(timeout=0.02)
            except queue.Empty:
                continue
            try:
                self._handle(event)
            except Exception:  # noqa: BLE001
                self.errors.append(traceback.format_exc())

    def _handle(self, event: Any) -> None:
        top = event.object
        if event.type == "ERROR" or not top.get("metadata"):
            return
        if event.kind == "Pod":
            self._pod_event(event)
            return
        top.setdefault("kind", event.kind)
        meta = top["metadata"]
        if event.type == "MODIFIED" and meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
            self._collect_garbage(top)  # then release the owner, as the garbage collector does
            try:
                self.kube.json("PATCH", object_path(top["apiVersion"], top["kind"], self.namespace, meta["name"]),
                               body={"metadata": {"finalizers": []}}, content_type="application/merge-patch+json")  # fmt: skip
            except ApiException as exc:
                if exc.status != 404:  # gone already: released by an earlier event of the same deletion
                    raise
            return
        if event.type == "DELETED":
            self._collect_garbage(top)
            return
        if "spec" not in top or meta.get("deletionTimestamp"):
            return
        key = (top["kind"], meta["name"])
        with self._state:
            workload = self.workloads.get(key)
            if workload is None or workload.uid != meta.get("uid"):
                workload = Workload(top["apiVersion"], top["kind"], meta["name"], meta.get("uid", ""), self._mode(top))
                self.workloads[key] = workload
            generation = meta.get("generation", 1)
            if generation <= workload.generation or (workload.pending and
                                                     generation <= workload.pending["metadata"].get("generation", 1)):  # fmt: skip
                return
            workload.pending = top
            if workload.worker is None:
                workload.worker = threading.Thread(target=self._work, args=(workload,), daemon=True)
                workload.worker.start()
