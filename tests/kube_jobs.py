"""A test-side Job controller and kubelet for servinglab's in-cluster load Jobs, against the emulator.

When an indexed Job appears it creates one pod per completion index (labelled and annotated as the real
Job controller does, owned by the Job), schedules and starts them, and "runs" each pod by calling the
load generator's worker in a thread with the plan read from the Job's ConfigMap. The plan's target is
replaced by ``target_url`` (a local endpoint standing for the layer's Service). What the worker prints
becomes the pod's log; the pod then succeeds, and the Job completes when every pod has.

Scenarios: ``ok``; ``pod_fails`` (pod ``fail_index`` dies after two records, its log ends in a traceback,
and the Job fails as backoffLimit 0 makes it); ``image_pull`` (every pod stays in ImagePullBackOff).
Deleting the Job deletes its pods, as the garbage collector does.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from servinglab.experiments.clusterload import CONTAINER, INDEX_ANNOTATION, JOB_NAME_LABEL, PLAN_KEY, RECORD_PREFIX, run_worker
from servinglab.platforms.kube import Kube, object_path

SCENARIOS = ("ok", "pod_fails", "image_pull")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobController:
    def __init__(self, kube: Kube, namespace: str, emulator: Any, target_url: str, scenario: str = "ok",
                 fail_index: int = 1, step_s: float = 0.02) -> None:  # fmt: skip
        assert scenario in SCENARIOS
        self.kube, self.namespace, self.emulator = kube, namespace, emulator
        self.target_url, self.scenario, self.fail_index, self.step_s = target_url, scenario, fail_index, step_s
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.jobs: list[str] = []  # the Jobs seen, in order
        self.plans: list[dict[str, Any]] = []  # each Job's plan, as read from its ConfigMap
        self.deleted: list[str] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="test-job-controller", daemon=True)

    def __enter__(self) -> JobController:
        self.kube.watch("batch/v1", "Job", self.namespace, {"app.kubernetes.io/managed-by": "servinglab"},
                        self.events, self.stop)  # fmt: skip
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(5)

    def _patch_status(self, api_version: str, kind: str, name: str, status: dict[str, Any]) -> None:
        self.kube.json("PATCH", object_path(api_version, kind, self.namespace, name, "status"),
                       body={"status": status}, content_type="application/merge-patch+json")  # fmt: skip

    def _pods_of(self, job_name: str) -> list[dict[str, Any]]:
        return self.kube.list("v1", "Pod", self.namespace, {JOB_NAME_LABEL: job_name})

    def _start(self, job: dict[str, Any]) -> None:
        try:
            self._bring_up(job)
        except BaseException as exc:  # noqa: BLE001 - shown by the test, not lost in a thread
            self.errors.append(exc)

    def _bring_up(self, job: dict[str, Any]) -> None:
        name, spec = job["metadata"]["name"], job["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
        template = spec["template"]
        config_map = next(v["configMap"]["name"] for v in template["spec"]["volumes"] if "configMap" in v)
        plan = json.loads(self.kube.get("v1", "ConfigMap", self.namespace, config_map)["data"][PLAN_KEY])
        self.plans.append(plan)
        plan = {**plan, "target": {**plan["target"], "base_url": f"{self.target_url}/v1"}}
        owner = [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
                  "controller": True}]  # fmt: skip
        pods = []
        for index in range(spec["completions"]):
            pod_name = f"{name}-{index}-x{index}q"
            container = {k: v for k, v in template["spec"]["containers"][0].items() if k in ("name", "image", "resources")}
            self.kube.json("POST", f"/api/v1/namespaces/{self.namespace}/pods", body={
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": self.namespace, "ownerReferences": owner,
                             "labels": {**template["metadata"]["labels"], JOB_NAME_LABEL: name,
                                        INDEX_ANNOTATION: str(index)},
                             "annotations": {INDEX_ANNOTATION: str(index)}},
                "spec": {"containers": [container], "nodeName": f"node-{index % 2}"},
                "status": {"phase": "Pending"},
            })  # fmt: skip
            pods.append(pod_name)
        self._patch_status("batch/v1", "Job", name, {"active": len(pods), "startTime": _now()})
        if self.stop.wait(self.step_s):
            return
        for pod_name in pods:
            scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
            if self.scenario == "image_pull":
                image = template["spec"]["containers"][0]["image"]
                waiting = {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}
                self._patch_status("v1", "Pod", pod_name, {"conditions": [scheduled], "containerStatuses": [
                    {"name": CONTAINER, "ready": False, "restartCount": 0, "state": {"waiting": waiting}}]})
                continue
            self._patch_status("v1", "Pod", pod_name, {"phase": "Running", "conditions": [scheduled], "containerStatuses": [
                {"name": CONTAINER, "ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}}]})
        if self.scenario == "image_pull":
            return
        outputs: dict[int, str] = {}

        def run(index: int) -> None:
            out = io.StringIO()
            run_worker(plan, index, out)  # the pod's JOB_COMPLETION_INDEX
            outputs[index] = out.getvalue()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(pods))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failed = 0
        for index, pod_name in enumerate(pods):
            text = outputs.get(index, "")
            code, reason = 0, "Completed"
            if self.scenario == "pod_fails" and index == self.fail_index:
                kept = [line for line in text.splitlines() if line.startswith(RECORD_PREFIX)][:2]
                text = "\n".join(kept) + "\nTraceback (most recent call last):\nRuntimeError: planted failure\n"
                code, reason = 1, "Error"
                failed += 1
            self.emulator.logs[(pod_name, CONTAINER)] = text
            self._patch_status("v1", "Pod", pod_name, {
                "phase": "Failed" if code else "Succeeded",
                "containerStatuses": [{"name": CONTAINER, "ready": False, "restartCount": 0,
                                       "state": {"terminated": {"exitCode": code, "reason": reason}}}]})  # fmt: skip
        if failed:
            self._patch_status("batch/v1", "Job", name, {"failed": failed, "succeeded": len(pods) - failed, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit", "lastTransitionTime": _now()}]})  # fmt: skip
        else:
            self._patch_status("batch/v1", "Job", name, {"succeeded": len(pods), "completionTime": _now(), "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]})

    def _collect_garbage(self, name: str) -> None:
        for pod in self._pods_of(name):
            self.kube.delete("v1", "Pod", self.namespace, pod["metadata"]["name"])

    def _run(self) -> None:
        seen: set[str] = set()
        while not self.stop.is_set():
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            job = event.object
            if event.type == "ERROR" or not job.get("metadata"):
                continue
            meta = job["metadata"]
            if event.type == "DELETED":
                self._collect_garbage(meta["name"])
                self.deleted.append(meta["name"])
                seen.discard(meta["uid"])
                continue
            if meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
                self._collect_garbage(meta["name"])  # then release the Job, as the garbage collector does
                try:
                    self.kube.json("PATCH", object_path("batch/v1", "Job", self.namespace, meta["name"]),
                                   body={"metadata": {"finalizers": []}}, content_type="application/merge-patch+json")  # fmt: skip
                except ApiException as exc:
                    if exc.status != 404:  # gone already: an event that arrived after the deletion
                        raise
                continue
            if meta["uid"] in seen or "spec" not in job:
                continue
            seen.add(meta["uid"])
            self.jobs.append(meta["name"])
            threading.Thread(target=self._start, args=(job,), daemon=True).start()
