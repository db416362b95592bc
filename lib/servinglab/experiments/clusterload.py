"""The load generator as an indexed Kubernetes Job: one stage's schedule over N pods in the cluster.

For load one client machine cannot drive, or a client that must sit next to the server. The stage is
planned once, here, exactly as the single-client path plans it (same prompts, same seeded arrival
offsets); pod ``i`` of the Job sends its slice of those requests at their original offsets, from a start
time common to every pod. Per stage:

1. plan and slice (:func:`build_job_plan`), render a ConfigMap holding the plan and an indexed Job
   (:func:`render_load_job`), validated like every rendered object — pure functions, no cluster;
2. apply both (server-side apply) and follow the Job and its pods through watches until the Job ends, or
   fail with the reason (image pull, unschedulable, a failed pod, the deadline);
3. read every pod's whole log: each request's record is one prefixed JSON line, printed as the request
   ends (``servinglab loadgen-worker``), so a pod that dies keeps what it measured;
4. merge: the records go to ``data/latency_requests.jsonl`` with their ``client_pod``, and the stage's
   percentiles are computed over every pod's requests together (never averaged across pods);
5. delete the Job and the ConfigMap, whatever happened (also on Ctrl-C).

The API key never enters the plan: the pods read it from ``platform.api_key_secret``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from kubernetes.client.exceptions import ApiException

from .. import layers, records
from ..config import Study
from ..errors import ParamsError, PlatformError, RunDirError
from ..layers.common import (COMPONENT_LABEL, LOAD_COMPONENT, RUN_ANNOTATION, cluster_settings, container_security,
                             foreign_owner, labels, object_name, pod_security, without_api_token)  # fmt: skip
from ..layers.validate import validate_objects
from ..measure.loadgen import Target
from ..measure.server_metrics import ServerWindow
from ..measure.stage import (MergedStage, Slice, SliceResult, StagePlan, merge_slices, plan_from_dict, plan_to_dict,
                             run_slice, slices_of, target_from_dict, target_to_dict)  # fmt: skip
from ..platforms.kube import WatchEvent, conditions
from ..platforms.kubernetes import KubernetesPlatform, OwnershipError

PLAN_FORMAT = 2
RECORD_PREFIX = "servinglab-record "
OUTCOME_PREFIX = "servinglab-outcome "
COMPONENT = LOAD_COMPONENT  # the label each layer's NetworkPolicy admits
CONTAINER = "loadgen"
PLAN_DIR = "/etc/servinglab"
PLAN_KEY = "plan.json"
API_KEY_ENV = "OPENAI_API_KEY"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
STAGE_ANNOTATION = "servinglab.io/stage"
# The API server stores objects of at most 1 MiB; leave room for the ConfigMap's metadata.
PLAN_LIMIT_BYTES = 1_000_000
# Beyond the Job's own deadline: time for the Job controller to report it.
JOB_GRACE_S = 60.0
# The server's side of the stage is taken from this long before the common start: the scrape before
# the stage must not overlap its first requests.
WINDOW_LEAD_S = 1.0
# A finished Job lingers this long if servinglab could not delete it (a killed kernel).
JOB_TTL_S = 3600
DELETE_WAIT_S = 120.0


class LoadJobError(PlatformError):
    """The in-cluster load Job failed; the records its pods returned are kept, the Job is deleted."""


# --------------------------------------------------------------------------------------------- planning


def build_job_plan(layer: str, plan: StagePlan, target: Target, pods: int, start_at_unix_s: float) -> dict[str, Any]:
    """What every pod reads: the target, the whole stage's plan, each pod's slice, the common start.

    Parameters
    ----------
    layer : str
        What is measured, for the record.
    plan : StagePlan
        The stage, planned once as for a client on this machine (same prompts, same seeded offsets), so the
        union of the slices is that client's schedule.
    target : Target
        The layer as the pods reach it (its in-cluster Service URL). Its API key is left out: the pods
        read the key from the study's Secret.
    pods : int
        Pods of the Job.
    start_at_unix_s : float
        The common start: wall-clock time at which every pod's slice begins.
    """
    return {
        "format": PLAN_FORMAT,
        "layer": layer,
        "target": target_to_dict(target),
        "start_at_unix_s": start_at_unix_s,
        "plan": plan_to_dict(plan),
        "slices": [{"index": s.index, "requests": s.requests, "offsets_s": s.offsets_s,
                    "max_concurrency": s.max_concurrency, "warmups": s.warmups} for s in slices_of(plan, pods)],  # fmt: skip
    }


# -------------------------------------------------------------------------------------------- rendering


def job_name(study: Study, layer: str) -> str:
    """One Job name per layer: stages run one after the other, each Job deleted before the next."""
    return object_name(study, layer, "-load")


def load_labels(study: Study, layer: str) -> dict[str, str]:
    return {**labels(study, layer), COMPONENT_LABEL: COMPONENT}


def render_load_job(study: Study, layer: str, job_plan: dict[str, Any], run_id: str | None = None) -> list[dict[str, Any]]:
    """The ConfigMap holding ``job_plan`` and the indexed Job that runs it, in the order they are applied.

    Pure: no cluster. The Job has one pod per slice (completions = parallelism), no retries (a retried
    pod would send its slice twice), non-root pods with requests equal to limits, spread over nodes
    where the scheduler can, and the API key, when the study has one, from ``platform.api_key_secret``.

    Raises
    ------
    ParamsError
        When the plan is larger than a ConfigMap can hold.
    """
    settings = cluster_settings(study)
    client = study.workloads.latency.in_cluster
    name = job_name(study, layer)
    text = json.dumps(job_plan, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > PLAN_LIMIT_BYTES:
        raise ParamsError(
            f"{study.source_file}: workloads.latency: stage {job_plan['plan']['stage']} of layer {layer}: its plan "
            f"({len(text.encode()) / 1e6:.1f} MB) is larger than a ConfigMap holds (1 MB); send fewer or shorter prompts"
        )
    annotations = {STAGE_ANNOTATION: job_plan["plan"]["stage"]}
    if run_id:
        annotations[RUN_ANNOTATION] = run_id
    meta = {"name": name, "namespace": settings.namespace, "labels": load_labels(study, layer),
            "annotations": annotations}  # fmt: skip
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": dict(meta), "data": {PLAN_KEY: text}}
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}]
    if settings.api_key_secret:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": settings.api_key_secret, "key": "api-key"}}})
    amounts = {"cpu": client.cpu, "memory": client.memory}
    pods = len(job_plan["slices"])
    container = {
        "name": CONTAINER,
        "image": client.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["servinglab", "loadgen-worker", "--plan", f"{PLAN_DIR}/{PLAN_KEY}"],
        "env": env,
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],  # fmt: skip
        "securityContext": container_security(),
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": pods,
            "parallelism": pods,
            "backoffLimit": 0,
            "activeDeadlineSeconds": math.ceil(client.timeout_s),
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "template": {
                "metadata": {"labels": load_labels(study, layer)},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 5,  # nothing to flush: every record is out already
                    **without_api_token(),
                    "securityContext": pod_security(settings),
                    "containers": [container],
                    "volumes": [{"name": "plan", "configMap": {"name": name}}, {"name": "tmp", "emptyDir": {}}],
                    # Pods on separate nodes where possible: one node's NIC or CPU is what the Job is
                    # there to get past.
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": {JOB_NAME_LABEL: name}},
                    }],  # fmt: skip
                },
            },
        },
    }
    return [config_map, job]


# ------------------------------------------------------------------------------------------- the worker


def run_worker(plan: dict[str, Any], index: int, out: TextIO, api_key: str | None = None) -> dict[str, Any]:
    """Send slice ``index`` of a stage plan and print what happened, line by line, on ``out``.

    Each request's record is printed as one line, ``RECORD_PREFIX`` + JSON, the moment the request ends
    (its ``index`` is its index in the whole stage); the last line, ``OUTCOME_PREFIX`` + JSON, is the
    pod's outcome: counts, its own start as Unix time, how late that was against the common start, its
    duration, and its schedule and event-loop lag.

    Parameters
    ----------
    plan : dict
        A plan from :func:`build_job_plan`.
    index : int
        The slice to send (the pod's ``JOB_COMPLETION_INDEX``).
    out : text stream
        Where the lines go (standard output in a pod).
    api_key : str, optional
        The server's API key.

    Returns
    -------
    dict
        The outcome, as printed.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ParamsError(f"stage plan format {plan.get('format')!r}; this servinglab reads {PLAN_FORMAT}")
    if not 0 <= index < len(plan["slices"]):
        raise ParamsError(f"slice {index}: the plan has slices 0..{len(plan['slices']) - 1}")
    piece = Slice(**plan["slices"][index])
    target = target_from_dict(plan["target"], api_key)

    def emit(record: dict[str, Any]) -> None:
        out.write(f"{RECORD_PREFIX}{json.dumps(record, separators=(',', ':'))}\n")
        out.flush()

    report = asyncio.run(run_slice(target, plan_from_dict(plan["plan"]), piece, emit,
                                   start_at_unix_s=plan["start_at_unix_s"]))  # fmt: skip
    out.write(f"{OUTCOME_PREFIX}{json.dumps(report, separators=(',', ':'))}\n")
    out.flush()
    return report


def worker_main(plan_path: str, index: int | None = None) -> int:
    """``servinglab loadgen-worker``: one pod's slice, from the plan file and ``JOB_COMPLETION_INDEX``."""
    try:
        plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ParamsError(f"--plan {plan_path}: {exc}") from exc
    if index is None:
        if INDEX_ENV not in os.environ:
            raise ParamsError(f"no slice index: {INDEX_ENV} is not set (give --index outside an indexed Job)")
        index = int(os.environ[INDEX_ENV])
    report = run_worker(plan, index, sys.stdout, os.environ.get(API_KEY_ENV) or None)
    print(f"slice {index}: sent {report['sent']}, completed {report['completed']}, failed {report['failed']}, "
          f"started {report['late_s']:.3f} s after the common start", file=sys.stderr)  # fmt: skip
    return 0


# -------------------------------------------------------------------------------------------- merging


def parse_log(text: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """A worker's log → (records, outcome or None, other lines). A line cut off mid-write is left out."""
    rows, outcome, other = [], None, []
    for line in text.splitlines():
        try:
            if line.startswith(RECORD_PREFIX):
                rows.append(json.loads(line[len(RECORD_PREFIX) :]))
            elif line.startswith(OUTCOME_PREFIX):
                outcome = json.loads(line[len(OUTCOME_PREFIX) :])
            elif line.strip():
                other.append(line)
        except json.JSONDecodeError:
            other.append(line[:200])
    return rows, outcome, other


# ------------------------------------------------------------------------------------------- the driver


def _pod_index(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(INDEX_ANNOTATION)
    return int(value) if value is not None and str(value).isdigit() else None


def _refused(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def _delete(platform: KubernetesPlatform, name: str, marks: dict[str, str]) -> None:
    """Delete the Job (its pods with it) and the ConfigMap, and wait until the Job is gone.

    Only when both carry ``marks`` (this study's and layer's load labels): a Job or ConfigMap of the same
    name that someone else owns is refused with ``OwnershipError`` and left as it is.
    """
    kube, namespace = platform.kube, platform.namespace
    for api_version, kind in (("batch/v1", "Job"), ("v1", "ConfigMap")):
        owner = foreign_owner(kube.get(api_version, kind, namespace, name), marks)
        if owner is not None:
            raise OwnershipError(f"in-cluster load: {kind}/{name} in namespace {namespace} belongs to another owner "
                                 f"({owner}); neither deleted nor applied over")  # fmt: skip
    try:
        kube.delete("batch/v1", "Job", namespace, name)
        kube.delete("v1", "ConfigMap", namespace, name)
    except ApiException as exc:
        raise PlatformError(f"cannot delete the load Job {name} in namespace {namespace}: {_refused(exc)} "
                            "(in-cluster load needs the rights to create and delete Jobs and ConfigMaps)") from None  # fmt: skip
    deadline = time.monotonic() + DELETE_WAIT_S
    while kube.get("batch/v1", "Job", namespace, name) is not None:
        if time.monotonic() > deadline:
            raise PlatformError(f"Job {name} in namespace {namespace} is still there {DELETE_WAIT_S:g} s after its "
                                "deletion; delete it by hand before the next stage")  # fmt: skip
        time.sleep(0.2)


def _wait_for_job(
    platform: KubernetesPlatform,
    name: str,
    selector: dict[str, str],
    applied_unix_s: float,
    timeout_s: float,
    at: tuple[float, Callable[[], None]] | None = None,
) -> str | None:
    """Follow the Job and its pods until the Job ends: None when it completed, otherwise why it did not.

    ``at`` = (Unix time, callback): called once when that time comes during the wait.
    """
    kube, namespace = platform.kube, platform.namespace
    events: queue.Queue[WatchEvent] = queue.Queue()
    stop = threading.Event()
    kube.watch("batch/v1", "Job", namespace, selector, events, stop)
    kube.watch("v1", "Pod", namespace, {JOB_NAME_LABEL: name}, events, stop)
    pods: dict[str, dict[str, Any]] = {}
    unschedulable_since: dict[str, float] = {}
    deadline = applied_unix_s + timeout_s + JOB_GRACE_S
    try:
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return (f"it did not end within workloads.latency.in_cluster.timeout_s ({timeout_s:g} s) and "
                        f"{JOB_GRACE_S:g} s more")  # fmt: skip
            if at is not None and time.time() >= at[0]:
                at[1]()
                at = None
            for pod_name in list(unschedulable_since):  # a grace can run out between events
                if pod_name in pods and (failure := platform.pod_failure(pods[pod_name], unschedulable_since)):
                    return failure
            try:
                event = events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            obj = event.object
            if event.type in ("ERROR", "DELETED"):
                continue
            if event.kind == "Pod":
                pods[obj["metadata"]["name"]] = obj
                if failure := platform.pod_failure(obj, unschedulable_since, event.seen):
                    return failure
                continue
            if obj.get("metadata", {}).get("name") != name:
                continue
            found = conditions(obj)
            if found.get("Complete", {}).get("status") == "True":
                return None
            failed = found.get("Failed", {})
            if failed.get("status") == "True":
                return f"the Job failed ({failed.get('reason', '?')}: {failed.get('message', '')})"
    finally:
        stop.set()


def _collect(platform: KubernetesPlatform, name: str, job_plan: dict[str, Any]) -> list[SliceResult]:
    """Every slice's pod, log read in full and parsed (the last pod of a slice, if there were several)."""
    kube, namespace = platform.kube, platform.namespace
    found: dict[int, dict[str, Any]] = {}
    for pod in sorted(kube.list("v1", "Pod", namespace, {JOB_NAME_LABEL: name}),
                      key=lambda p: p["metadata"].get("creationTimestamp") or ""):  # fmt: skip
        index = _pod_index(pod)
        if index is not None:
            found[index] = pod
    out = []
    for piece in job_plan["slices"]:
        result = SliceResult(piece["index"], len(piece["requests"]), log_found=False)
        pod = found.get(piece["index"])
        if pod is not None:
            result.pod, result.node = pod["metadata"]["name"], (pod.get("spec") or {}).get("nodeName")
            text = kube.log(namespace, result.pod, CONTAINER)
            if text is not None:
                result.log_found = True
                result.records, result.outcome, result.other_lines = parse_log(text)
        out.append(result)
    return out


def _failed_pods(platform: KubernetesPlatform, name: str, collected: list[SliceResult]) -> str:
    """The pods that failed, with their exit and last log lines, for the error message."""
    lines = {p.pod: p.other_lines for p in collected}
    described = []
    for pod in platform.kube.list("v1", "Pod", platform.namespace, {JOB_NAME_LABEL: name}):
        pod_name = pod["metadata"]["name"]
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            ended = (status.get("state") or {}).get("terminated") or {}
            if ended and ended.get("exitCode", 0) != 0:
                tail = "\n    ".join((lines.get(pod_name) or [])[-10:]) or "(no log)"
                described.append(f"pod {pod_name} (slice {_pod_index(pod)}) exited with code {ended.get('exitCode')} "
                                 f"({ended.get('reason', '?')}); last log lines:\n    {tail}")  # fmt: skip
    return "; ".join(described)


def in_cluster_target(study: Study, platform: KubernetesPlatform, layer: str) -> Target:
    """The layer as pods in the cluster reach it: its Service, no key (the pods read it from the Secret)."""
    w = study.workloads.latency
    return Target(platform.in_cluster_url(layer), study.model.served_name, None, w.request_timeout_s, w.ignore_eos,
                  verify_tls=_verifies_tls(study, layer))  # fmt: skip


def run_in_cluster(
    study: Study,
    platform: KubernetesPlatform,
    layer: str,
    run_dir: str | os.PathLike,
    plan: StagePlan,
    window: ServerWindow,
    repeat: int = 0,
    stage_id: str | None = None,
) -> MergedStage:
    """Send one latency stage (one repeat of it) as an indexed Job in the cluster; its records go to the run.

    The records of every pod go to ``data/latency_requests.jsonl`` as the Job ends (with ``client_pod`` and
    ``repeat``); the merged stage, with each pod's outcome in ``clients``, is returned for the stage record.
    The Job and its ConfigMap are deleted at the end, also on failure and Ctrl-C.

    Parameters
    ----------
    study : Study
        A study on the kubernetes platform with ``workloads.latency.in_cluster.image`` set.
    platform : KubernetesPlatform
        The platform the layer runs on.
    layer : str
        The layer to load, reached at its in-cluster Service.
    run_dir : path
        The run directory.
    plan : StagePlan
        The stage's requests, warmups and schedule, planned as for a local client.
    window : ServerWindow
        The server's side of the stage, entered from just before the common start to the Job's end.
    repeat : int
        Which repeat of the stage this is.
    stage_id : str, optional
        The measurement of the stage its records belong to (the stage record's ``stage_id``).

    Raises
    ------
    LoadJobError
        When the Job fails (a pod's image cannot be pulled, a pod is unschedulable or fails, the deadline
        passes); the records its pods returned are written first.
    """
    client = study.workloads.latency.in_cluster
    name = job_name(study, layer)
    try:
        run_id = records.read_context(run_dir).get("run_id")
    except RunDirError:  # a directory that is not a run (a script's, a test's)
        run_id = None
    # A Job of the same name left by an interrupted run would take this stage's apply as an update.
    _delete(platform, name, load_labels(study, layer))
    job_plan = build_job_plan(layer, plan, in_cluster_target(study, platform, layer), client.pods, start_at_unix_s=0.0)
    validate_objects(render_load_job(study, layer, job_plan, run_id), cluster_settings(study).kubernetes_version)
    # The common start counts from the Job's creation, not from the validation before it.
    start_at = job_plan["start_at_unix_s"] = time.time() + client.start_delay_s
    objects = render_load_job(study, layer, job_plan, run_id)
    collected: list[SliceResult] = []
    try:
        # The server is watched from just before the common start, not through the pods' start-up.
        with contextlib.ExitStack() as stack:
            opened: list[bool] = []

            def open_window() -> None:
                if not opened:
                    stack.enter_context(window)
                    opened.append(True)

            applied = time.time()
            for obj in objects:
                try:
                    platform.kube.apply(obj)
                except ApiException as exc:
                    raise LoadJobError(f"layers.{layer}: stage {plan.name}: the cluster refused {obj['kind']}/{name}: "
                                       f"{_refused(exc)}") from None  # fmt: skip
            failure = _wait_for_job(platform, name, load_labels(study, layer), applied, client.timeout_s,
                                    (start_at - WINDOW_LEAD_S, open_window))  # fmt: skip
            open_window()
            collected = _collect(platform, name, job_plan)
        merged = merge_slices(collected, start_at, study.slos.goodput.limits() or None, plan.spec.request_rate,
                              what="pod", tag="client_pod")  # fmt: skip
        extra = {"layer": layer, "stage": plan.name, "repeat": repeat, "provenance": "measured"}
        if stage_id is not None:
            extra["stage_id"] = stage_id
        records.append(run_dir, records.LATENCY_REQUESTS, [extra | r for r in merged.records])
        if failure is not None:
            details = _failed_pods(platform, name, collected)
            raise LoadJobError(
                f"layers.{layer}: stage {plan.name}: in-cluster load Job {name}: {failure}"
                + (f"; {details}" if details else "")
                + f"; the {len(merged.records)} records its pods returned are in {records.LATENCY_REQUESTS.file}"
            )
    finally:
        _delete(platform, name, load_labels(study, layer))
    for pod in merged.clients:
        pod["client_start_at_unix"] = start_at
    return merged


def client_description(study: Study, layer: str) -> str:
    """How a stage's record names an in-cluster client."""
    tls = ", TLS not verified (insecure_skip_tls_verify)" if not _verifies_tls(study, layer) else ""
    return f"in-cluster Job {job_name(study, layer)}, {study.workloads.latency.in_cluster.pods} pods{tls}"


def _verifies_tls(study: Study, layer: str) -> bool:
    """Whether the load pods verify the layer's certificate. A workload that serves TLS with a certificate
    of its own (llm-d) gives no CA to a client in the cluster, so its check is skipped where, and only
    where, the study says so by name (the study check refuses the combination otherwise)."""
    return not (layers.of(study.layers[layer]).serves_tls and study.workloads.latency.in_cluster.insecure_skip_tls_verify)
