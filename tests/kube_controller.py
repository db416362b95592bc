"""A test-side controller: plays the Deployment, KServe and kubelet controllers' part against the emulator.

It watches the namespace's Deployments, InferenceServices and LLMInferenceServices through the HTTP API
and, step by step, creates a pod for each (labelled as the real controllers label them), schedules it,
emits the image's Pulled event, starts its containers and reports readiness on the pod and on the top
object; or, per scenario, stops at the failure the real cluster would show. Deleting a top object
deletes its pods, as the garbage collector does.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from servinglab.platforms.kube import Kube

TOP_KINDS = [
    ("apps/v1", "Deployment"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("serving.kserve.io/v1alpha1", "LLMInferenceService"),
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"),
]
SCENARIOS = ("ok", "image_pull", "crashloop", "oom", "unschedulable", "reconcile_failed", "stall")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _condition(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


class Controller:
    def __init__(self, kube: Kube, namespace: str, scenario: str = "ok", step_s: float = 0.05,
                 emulator: Any = None) -> None:  # fmt: skip
        assert scenario in SCENARIOS
        self.kube, self.namespace, self.scenario, self.step_s = kube, namespace, scenario, step_s
        self.emulator = emulator
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.shown: list[str] = []  # what the controller made the cluster show, in order
        self._seen: set[tuple[str, str, int]] = set()
        self._thread = threading.Thread(target=self._run, name="test-controller", daemon=True)

    def __enter__(self) -> Controller:
        for api_version, kind in TOP_KINDS:
            self.kube.watch(api_version, kind, self.namespace, {"app.kubernetes.io/managed-by": "servinglab"},
                            self.events, self.stop)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(5)

    # --- the pods the real controllers would create ------------------------------------------------

    def _pod_for(self, top: dict[str, Any]) -> dict[str, Any]:
        name = top["metadata"]["name"]
        kind = top["kind"]
        if kind == "Deployment":
            template = top["spec"]["template"]
            labels, containers = dict(template["metadata"]["labels"]), template["spec"]["containers"]
        elif kind == "InferenceService":
            predictor = top["spec"]["predictor"]
            labels = {**top["metadata"].get("labels", {}), "serving.kserve.io/inferenceservice": name}
            containers = predictor.get("containers") or [
                {"name": "kserve-container", "image": "runtime", "ports": [{"containerPort": 8080}]}
            ]
        else:
            labels = {"app.kubernetes.io/name": name, "kserve.io/component": "workload"}
            containers = [{**top["spec"]["template"]["containers"][0], "ports": [{"containerPort": 8000}]}]
        generation = top["metadata"].get("generation", 1)
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-{generation}-pod", "namespace": self.namespace, "labels": labels},
            "spec": {"containers": [{k: v for k, v in c.items() if k in ("name", "image", "ports", "resources")}
                                    for c in containers]},  # fmt: skip
            "status": {"phase": "Pending", "conditions": []},
        }

    def _owned(self, top: dict[str, Any]) -> dict[str, Any]:
        """The objects the real controller creates from ``top`` (owner references set); returns the pod's owner."""
        name, kind, ns = top["metadata"]["name"], top["kind"], self.namespace

        def ref(obj: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
                     "uid": obj["metadata"]["uid"], "controller": True}]  # fmt: skip

        def make(api_version: str, obj_kind: str, obj_name: str, owner: dict[str, Any], spec: dict) -> dict[str, Any]:
            body = {"apiVersion": api_version, "kind": obj_kind,
                    "metadata": {"name": obj_name, "namespace": ns, "ownerReferences": ref(owner)}, "spec": spec}  # fmt: skip
            return self.kube.apply(body)

        if kind == "Deployment":
            return make("apps/v1", "ReplicaSet", f"{name}-5d8f7c9b6", top, {"replicas": 1})
        if kind == "InferenceService":
            deployment = make("apps/v1", "Deployment", f"{name}-predictor", top, {"replicas": 1})
            make("v1", "Service", f"{name}-predictor", top, {"ports": [{"port": 80}]})
            make("autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-predictor", top,
                 {"minReplicas": 1, "maxReplicas": 1, "scaleTargetRef": {"kind": "Deployment", "name": f"{name}-predictor"}})
            make("gateway.networking.k8s.io/v1", "HTTPRoute", name, top, {"parentRefs": [{"name": "kserve-gateway"}]})
            return make("apps/v1", "ReplicaSet", f"{name}-predictor-7c6d5", deployment, {"replicas": 1})
        deployment = make("apps/v1", "Deployment", f"{name}-kserve", top, {"replicas": 1})
        make("v1", "Service", f"{name}-workload-svc", top, {"ports": [{"port": 8000}]})
        make("gateway.networking.k8s.io/v1", "HTTPRoute", f"{name}-kserve-route", top, {"parentRefs": [{"name": "gw"}]})
        return make("apps/v1", "ReplicaSet", f"{name}-kserve-6b9c8", deployment, {"replicas": 1})

    def _patch_status(self, api_version: str, kind: str, name: str, status: dict[str, Any]) -> None:
        from servinglab.platforms.kube import object_path

        self.kube.json("PATCH", object_path(api_version, kind, self.namespace, name, "status"),
                       body={"status": status}, content_type="application/merge-patch+json")  # fmt: skip
        self.shown.append(f"{kind}/{name} {sorted(status)}")

    def _step(self) -> bool:
        return not self.stop.wait(self.step_s)

    def _bring_up(self, top: dict[str, Any]) -> None:
        api_version, kind, name = top["apiVersion"], top["kind"], top["metadata"]["name"]
        if self.scenario == "reconcile_failed" and kind != "Deployment":
            self._step()
            self._patch_status(api_version, kind, name, {"conditions": [
                _condition("Ready", "False", "ReconcileFailed", "fails to reconcile predictor: no runtime found")]})
            return
        pod = self._pod_for(top)
        owner = self._owned(top)
        pod["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": True,
                                               "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]  # fmt: skip
        pod_name = pod["metadata"]["name"]
        containers = [c["name"] for c in pod["spec"]["containers"]]
        self.kube.json("POST", f"/api/v1/namespaces/{self.namespace}/pods", body=pod)
        if not self._step():
            return
        if self.scenario == "unschedulable":
            self._patch_status("v1", "Pod", pod_name, {"conditions": [_condition(
                "PodScheduled", "False", "Unschedulable",
                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available")]})
            return
        self._patch_status("v1", "Pod", pod_name, {"conditions": [_condition("PodScheduled", "True")]})
        if not self._step():
            return
        if self.scenario == "image_pull":
            waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "vllm/vllm-openai:v0.32.0"'}
            self._patch_status("v1", "Pod", pod_name, {"containerStatuses": [
                {"name": c, "ready": False, "restartCount": 0, "state": {"waiting": waiting}} for c in containers]})
            return
        self.kube.json("POST", f"/api/v1/namespaces/{self.namespace}/events", body={
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{pod_name}.pulled", "namespace": self.namespace},
            "involvedObject": {"kind": "Pod", "name": pod_name, "namespace": self.namespace},
            "reason": "Pulled", "message": "Successfully pulled image", "type": "Normal"})  # fmt: skip
        self.shown.append(f"Event/{pod_name} Pulled")
        if not self._step():
            return
        if self.scenario in ("crashloop", "oom"):
            last = {"terminated": {"reason": "OOMKilled" if self.scenario == "oom" else "Error", "exitCode": 137 if
                                   self.scenario == "oom" else 1}}  # fmt: skip
            if self.emulator is not None:
                for c in containers:
                    self.emulator.logs[(pod_name, c)] = "INFO loading weights\nValueError: max-model-len 8192 exceeds the KV cache\n"
            self._patch_status("v1", "Pod", pod_name, {"containerStatuses": [
                {"name": c, "ready": False, "restartCount": 3, "lastState": last,
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}}
                for c in containers]})  # fmt: skip
            return
        running = {"running": {"startedAt": _now()}}
        self._patch_status("v1", "Pod", pod_name, {"phase": "Running", "containerStatuses": [
            {"name": c, "ready": False, "restartCount": 0, "state": running} for c in containers]})
        if self.scenario == "stall" or not self._step():
            return
        self._patch_status("v1", "Pod", pod_name, {"conditions": [_condition("PodScheduled", "True"),
                                                                  _condition("Ready", "True")],
                                                   "containerStatuses": [{"name": c, "ready": True, "restartCount": 0,
                                                                          "state": running} for c in containers]})  # fmt: skip
        if kind == "Deployment":
            self._patch_status(api_version, kind, name, {
                "observedGeneration": top["metadata"].get("generation", 1), "replicas": 1, "readyReplicas": 1,
                "availableReplicas": 1, "conditions": [_condition("Available", "True", "MinimumReplicasAvailable")]})
        else:
            host = f"{name}.{self.namespace}.example.com"
            self._patch_status(api_version, kind, name, {"url": f"http://{host}", "conditions": [
                _condition("PredictorReady", "True"), _condition("IngressReady", "True"), _condition("Ready", "True")]})

    def _collect_garbage(self, top: dict[str, Any]) -> None:
        """Delete what ``top`` owned, transitively, as Kubernetes' garbage collector does."""
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
                        self.kube.delete(api_version, kind, self.namespace, obj["metadata"]["name"])
                        grew = True

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            top = event.object
            if event.type == "ERROR" or not top.get("metadata"):
                continue
            top.setdefault("kind", event.kind)
            key = (top["kind"], top["metadata"]["name"], top["metadata"].get("generation", 1))
            meta = top["metadata"]
            if event.type == "MODIFIED" and meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
                self._collect_garbage(top)  # then release the owner, as the garbage collector does
                from servinglab.platforms.kube import object_path

                self.kube.json("PATCH", object_path(top["apiVersion"], top["kind"], self.namespace, meta["name"]),
                               body={"metadata": {"finalizers": []}}, content_type="application/merge-patch+json")  # fmt: skip
                continue
            if event.type == "DELETED":
                self._collect_garbage(top)
                self._seen = {s for s in self._seen if s[:2] != key[:2]}
                continue
            if key in self._seen or "spec" not in top:
                continue
            self._seen.add(key)
            threading.Thread(target=self._bring_up, args=(top,), daemon=True).start()
