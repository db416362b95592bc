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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
from kubernetes.client.exceptions import ApiException

from . import results
from .bench import REQUESTS_TABLE, STAGES_TABLE
from .config import Study
from .errors import ParamsError, PlatformError, RunDirError
from .latency import ServerWindow, stage_record
from .layers.common import RUN_ANNOTATION, cluster_settings, container_security, labels, object_name, pod_security
from .layers.validate import validate_objects
from .loadgen import StageSpec, Target, run_stage_async
from .metrics import summarize
from .platforms.base import Endpoint
from .platforms.kube import WatchEvent, conditions
from .schedule import arrival_offsets_s
from .workload import RequestSpec

PLAN_FORMAT = 1
RECORD_PREFIX = "servinglab-record "
OUTCOME_PREFIX = "servinglab-outcome "
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "loadgen"
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
# A pod that starts its slice this much after the common start leaves the others running short-handed.
LATE_START_WARN_S = 1.0
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


@dataclass(frozen=True)
class Slice:
    """What one pod of the Job sends: indices into the stage's requests and warmups, at their offsets."""

    index: int
    requests: list[int]
    offsets_s: list[float]
    max_concurrency: int | None  # None: no cap; 0: the pod has nothing to send
    warmups: list[int] = field(default_factory=list)


def split_concurrency(max_concurrency: int | None, pods: int) -> list[int | None]:
    """A concurrency cap shared as evenly as possible: pod i gets C//N, plus one for the first C%N pods."""
    if max_concurrency is None:
        return [None] * pods
    return [max_concurrency // pods + (i < max_concurrency % pods) for i in range(pods)]


def slice_stage(
    offsets_s: Sequence[float], pods: int, max_concurrency: int | None, request_rate: float, num_warmups: int = 0
) -> list[Slice]:
    """Split one stage's schedule into ``pods`` slices; every request lands in exactly one.

    Parameters
    ----------
    offsets_s : sequence of float
        Every request's send offset from the stage start, as the single-client path computes them.
    pods : int
        Pods of the Job.
    max_concurrency : int or None
        The stage's concurrency (closed loop) or cap (open loop); shared by :func:`split_concurrency`.
    request_rate : float
        Requests/s; inf is a closed loop.
    num_warmups : int
        Warmup requests, dealt round-robin over the pods that send.

    Returns
    -------
    list of Slice
        Open loop: pod i takes requests i, i+N, ... (its share of the arrival times). Closed loop:
        request k goes to concurrency slot k mod C, slot j to pod j mod N, so each pod's share of the
        requests follows its share of the concurrency (requests i::N when N divides C); a pod with no
        concurrency gets nothing.
    """
    if pods < 1:
        raise ParamsError(f"in-cluster pods {pods}: must be at least 1")
    caps = split_concurrency(max_concurrency, pods)
    active = [i for i, cap in enumerate(caps) if cap != 0]
    if math.isinf(request_rate) and max_concurrency:
        owner = [(k % max_concurrency) % pods for k in range(len(offsets_s))]
    else:
        owner = [active[k % len(active)] for k in range(len(offsets_s))]
    warm_owner = [active[k % len(active)] for k in range(num_warmups)]
    return [
        Slice(
            index=i,
            requests=[k for k, o in enumerate(owner) if o == i],
            offsets_s=[float(offsets_s[k]) for k, o in enumerate(owner) if o == i],
            max_concurrency=caps[i],
            warmups=[k for k, o in enumerate(warm_owner) if o == i],
        )
        for i in range(pods)
    ]


def build_job_plan(
    layer: str,
    stage_name: str,
    target: Target,
    requests: list[RequestSpec],
    warmups: list[RequestSpec],
    stage: StageSpec,
    pods: int,
    start_at_unix_s: float,
) -> dict[str, Any]:
    """The stage plan every pod reads: the target, the whole stage's requests, each pod's slice, the start.

    Parameters
    ----------
    layer, stage_name : str
        What is measured, for the record.
    target : Target
        The layer as the pods reach it (its in-cluster Service URL). Its API key is left out: the pods
        read the key from the study's Secret.
    requests, warmups : list of RequestSpec
        The stage's requests, built once (the seed of the single-client path).
    stage : StageSpec
        Rate, burstiness, seed, concurrency and duration of the stage; the arrival offsets are drawn from
        them once, here, so the union of the slices is the single-client schedule.
    pods : int
        Pods of the Job.
    start_at_unix_s : float
        The common start: wall-clock time at which every pod's slice begins.
    """
    offsets = arrival_offsets_s(len(requests), stage.request_rate, stage.burstiness, stage.seed)
    slices = slice_stage(offsets, pods, stage.max_concurrency, stage.request_rate, len(warmups))
    return {
        "format": PLAN_FORMAT,
        "layer": layer,
        "stage": stage_name,
        "target": {
            "base_url": target.base_url,
            "model": target.model,
            "request_timeout_s": target.request_timeout_s,
            "ignore_eos": target.ignore_eos,
            "continuous_usage": target.continuous_usage,
            "headers": [list(h) for h in target.headers],
            "verify_tls": target.verify_tls,
        },
        "start_at_unix_s": start_at_unix_s,
        "request_rate": None if math.isinf(stage.request_rate) else stage.request_rate,
        "burstiness": stage.burstiness,
        "seed": stage.seed,
        "duration_s": stage.duration_s,
        "requests": [asdict(r) for r in requests],
        "warmups": [asdict(r) for r in warmups],
        "slices": [asdict(s) for s in slices],
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
            f"{study.source_file}: workloads.latency: stage {job_plan['stage']} of layer {layer}: its plan "
            f"({len(text.encode()) / 1e6:.1f} MB) is larger than a ConfigMap holds (1 MB); send fewer or shorter prompts"
        )
    annotations = {STAGE_ANNOTATION: job_plan["stage"]}
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
        "securityContext": {**container_security(), "readOnlyRootFilesystem": True},
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
    piece = plan["slices"][index]
    t = plan["target"]
    target = Target(t["base_url"], t["model"], api_key, t["request_timeout_s"], t["ignore_eos"], t["continuous_usage"],
                    headers=tuple(tuple(h) for h in t["headers"]), verify_tls=t["verify_tls"])  # fmt: skip
    requests = [RequestSpec(**plan["requests"][k]) for k in piece["requests"]]
    warmups = [RequestSpec(**plan["warmups"][k]) for k in piece["warmups"]]
    rate = math.inf if plan["request_rate"] is None else plan["request_rate"]
    stage = StageSpec(request_rate=rate, burstiness=plan["burstiness"], seed=plan["seed"],
                      max_concurrency=piece["max_concurrency"] or None, duration_s=plan["duration_s"])  # fmt: skip

    def emit(record: dict[str, Any]) -> None:
        positions = piece["warmups"] if record.get("warmup") else piece["requests"]
        line = json.dumps(record | {"index": positions[record["index"]]}, separators=(",", ":"))
        out.write(f"{RECORD_PREFIX}{line}\n")
        out.flush()

    outcome = asyncio.run(run_stage_async(target, requests, stage, emit, warmups, offsets_s=piece["offsets_s"],
                                          start_at_unix_s=plan["start_at_unix_s"]))  # fmt: skip
    lags = outcome.schedule_lag_ms
    report = {
        "slice": index,
        "planned": len(requests),
        "sent": outcome.sent,
        "completed": outcome.completed,
        "failed": outcome.failed,
        "cancelled": outcome.cancelled,
        "t0_unix_s": outcome.started_unix_s,
        "late_s": round(outcome.started_unix_s - plan["start_at_unix_s"], 4),
        "duration_s": outcome.duration_s,
        "send_window_s": outcome.send_window_s,
        "interrupted": outcome.interrupted,
        "schedule_lag_ms": {
            "count": len(lags),
            "p50": float(np.percentile(lags, 50)) if lags else None,
            "p99": float(np.percentile(lags, 99)) if lags else None,
            "max": max(lags) if lags else None,
        },
        # The whole series, so the stage's loop-lag percentile is taken over every pod's samples.
        "loop_lag_ms": [round(v, 3) for v in outcome.loop_lag_ms],
    }
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


@dataclass
class PodResult:
    """What came back from one slice's pod."""

    index: int
    planned: int  # requests in its slice
    pod: str | None = None
    node: str | None = None
    log_found: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None
    other_lines: list[str] = field(default_factory=list)  # the log's lines that are neither (stderr, tracebacks)


def parse_log(text: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """A worker's log → (records, outcome or None, other lines). A line cut off mid-write is left out."""
    records, outcome, other = [], None, []
    for line in text.splitlines():
        try:
            if line.startswith(RECORD_PREFIX):
                records.append(json.loads(line[len(RECORD_PREFIX) :]))
            elif line.startswith(OUTCOME_PREFIX):
                outcome = json.loads(line[len(OUTCOME_PREFIX) :])
            elif line.strip():
                other.append(line)
        except json.JSONDecodeError:
            other.append(line[:200])
    return records, outcome, other


@dataclass
class MergedStage:
    records: list[dict[str, Any]]  # every pod's, each with its client_pod
    summary: dict[str, Any]  # metrics.summarize over all of them, plus the warnings of the merge
    start_unix_s: float  # the earliest pod start
    duration_s: float


def merge_pods(
    pods: list[PodResult],
    start_at_unix_s: float,
    slos: dict[str, float] | None = None,
    requested_rate: float | None = None,
) -> MergedStage:
    """One stage's summary from its pods: percentiles over the union of their requests, never averaged.

    Each pod times its requests from its own start (``t0``); its outcome gives that start as Unix time,
    which places its requests on the stage's common time line. The stage's duration runs from the
    earliest pod start (the common start, when the pods were on time: before it no load was sent) to the
    end of the last request of any pod. A pod that returned no outcome (it died) is placed at the common
    start. Warnings name missing records and late pods.

    Parameters
    ----------
    pods : list of PodResult
        Every slice's pod, with the records and outcome parsed from its log.
    start_at_unix_s : float
        The common start of the plan.
    slos : dict, optional
        Per-request objectives for goodput (as :func:`servinglab.metrics.summarize`).
    requested_rate : float, optional
        The stage's requested rate (inf for a closed loop).
    """
    t0 = {p.index: (p.outcome or {}).get("t0_unix_s") or start_at_unix_s for p in pods}
    records = [r | {"client_pod": p.index} for p in pods for r in p.records]
    starts = [t0[p.index] for p in pods if p.planned]
    start = min(starts) if starts else start_at_unix_s
    ends, sends, schedule_lag, loop_lag = [], [], [], []
    for p in pods:
        if p.outcome:
            ends.append(t0[p.index] + p.outcome["duration_s"])
            loop_lag += p.outcome.get("loop_lag_ms") or []
        for r in p.records:
            if r.get("warmup"):
                continue
            if r.get("sent_s") is not None:
                sends.append(t0[p.index] + r["sent_s"])
                ends.append(t0[p.index] + r["sent_s"] + (r.get("e2el_ms") or 0.0) / 1000)
            if r.get("error_kind") != "cancelled" and r.get("schedule_lag_ms") is not None:
                schedule_lag.append(r["schedule_lag_ms"])
    duration = max(ends) - start if ends else 0.0
    window = max(sends) - min(sends) if sends else 0.0
    summary = summarize(records, duration, slos or None, requested_rate, window, schedule_lag, loop_lag)
    warnings = summary["warnings"]
    for p in pods:
        measured = [r for r in p.records if not r.get("warmup")]
        if not p.log_found:
            warnings.append(f"slice {p.index} ({p.planned} requests): no log came back from its pod "
                            f"{p.pod or '(none found)'}; its requests are missing from the stage")  # fmt: skip
        elif p.outcome is None:
            warnings.append(f"slice {p.index}: pod {p.pod} ended before its slice did; its {len(measured)} of "
                            f"{p.planned} records are kept, placed from the common start")  # fmt: skip
        else:
            expected = p.outcome["completed"] + p.outcome["failed"] + p.outcome["cancelled"]
            if len(measured) < expected:
                warnings.append(f"slice {p.index}: {len(measured)} of the {expected} records pod {p.pod} "
                                "wrote reached servinglab")  # fmt: skip
            late = p.outcome.get("late_s") or 0.0
            if p.planned and late > LATE_START_WARN_S:
                warnings.append(f"slice {p.index} started {late:.1f} s after the common start (pod {p.pod}): the "
                                "slices did not fully overlap, so the load was lower than planned for that long")  # fmt: skip
    return MergedStage(records, summary, start, duration)


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


def _delete(platform, name: str) -> None:  # noqa: ANN001 - a KubernetesPlatform
    """Delete the Job (its pods with it) and the ConfigMap, and wait until the Job is gone."""
    kube, namespace = platform.kube, platform.namespace
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
    platform,  # noqa: ANN001 - a KubernetesPlatform
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
                if pod_name in pods and (failure := platform._pod_failure(pods[pod_name], unschedulable_since)):
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
                if failure := platform._pod_failure(obj, unschedulable_since, event.seen):
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


def _collect(platform, name: str, job_plan: dict[str, Any]) -> list[PodResult]:  # noqa: ANN001
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
        result = PodResult(piece["index"], len(piece["requests"]))
        pod = found.get(piece["index"])
        if pod is not None:
            result.pod, result.node = pod["metadata"]["name"], (pod.get("spec") or {}).get("nodeName")
            text = kube.log(namespace, result.pod, CONTAINER)
            if text is not None:
                result.log_found = True
                result.records, result.outcome, result.other_lines = parse_log(text)
        out.append(result)
    return out


def _failed_pods(platform, name: str, collected: list[PodResult]) -> str:  # noqa: ANN001
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


def in_cluster_target(study: Study, platform, layer: str) -> Target:  # noqa: ANN001
    """The layer as pods in the cluster reach it: its Service, no key (the pods read it from the Secret)."""
    w = study.workloads.latency
    # llm-d's workload serves TLS with a certificate of its own, which no client in the cluster is given.
    verify = study.layers[layer].kind != "llm-d"
    return Target(platform._in_cluster_url(layer), study.model.served_name, None, w.request_timeout_s, w.ignore_eos,
                  verify_tls=verify)  # fmt: skip


def run_in_cluster_stage(
    study: Study,
    platform,  # noqa: ANN001 - a KubernetesPlatform
    layer: str,
    plan: dict[str, Any],
    run_dir: str | os.PathLike,
    requests: list[RequestSpec],
    warmups: list[RequestSpec],
    stage: StageSpec,
    endpoint: Endpoint | None = None,
) -> dict[str, Any]:
    """Run one latency stage as an indexed Job in the cluster and record it in the run directory.

    The records of every pod go to ``data/latency_requests.jsonl`` (with ``client_pod``), the stage to
    ``data/latency_stages.jsonl`` with its ``client`` ("in-cluster Job <name>, N pods"), each pod's
    outcome under ``client_pods``, and the merge's warnings in its summary. The Job and its ConfigMap are
    deleted at the end, also on failure and Ctrl-C.

    Parameters
    ----------
    study : Study
        A study on the kubernetes platform with ``workloads.latency.in_cluster.image`` set.
    platform : KubernetesPlatform
        The platform the layer runs on.
    layer : str
        The layer to load, reached at its in-cluster Service.
    plan : dict
        The stage as :func:`servinglab.latency.planned_stages` lists it.
    run_dir : path
        The run directory.
    requests, warmups : list of RequestSpec
        The stage's requests and warmups, built as for a local client.
    stage : StageSpec
        The stage's rate, burstiness, seed, concurrency and duration.
    endpoint : Endpoint, optional
        The layer as this machine reaches it, to record the server's side of the stage (``/metrics``,
        health); without it the stage records no server metrics.

    Returns
    -------
    dict
        The stage record, as written.

    Raises
    ------
    LoadJobError
        When the Job fails (a pod's image cannot be pulled, a pod is unschedulable or fails, the deadline
        passes); the records its pods returned are written first.
    """
    client = study.workloads.latency.in_cluster
    name = job_name(study, layer)
    try:
        run_id = results.read_context(run_dir).get("run_id")
    except RunDirError:  # a directory that is not a run (a script's, a test's)
        run_id = None
    # A Job of the same name left by an interrupted run would take this stage's apply as an update.
    _delete(platform, name)
    job_plan = build_job_plan(layer, plan["stage"], in_cluster_target(study, platform, layer), requests, warmups,
                              stage, client.pods, start_at_unix_s=0.0)  # fmt: skip
    validate_objects(render_load_job(study, layer, job_plan, run_id), cluster_settings(study).kubernetes_version)
    # The common start counts from the Job's creation, not from the validation before it.
    start_at = job_plan["start_at_unix_s"] = time.time() + client.start_delay_s
    objects = render_load_job(study, layer, job_plan, run_id)
    description = f"in-cluster Job {name}, {client.pods} pods"
    window = ServerWindow(study, endpoint)
    try:
        # The server is watched from just before the common start, not through the pods' start-up.
        with contextlib.ExitStack() as stack:

            def open_window() -> None:
                if "started_at_unix" not in window.fields:
                    stack.enter_context(window)

            applied = time.time()
            for obj in objects:
                try:
                    platform.kube.apply(obj)
                except ApiException as exc:
                    raise LoadJobError(f"layers.{layer}: stage {plan['stage']}: the cluster refused {obj['kind']}/{name}: "
                                       f"{_refused(exc)}") from None  # fmt: skip
            failure = _wait_for_job(platform, name, load_labels(study, layer), applied, client.timeout_s,
                                    (start_at - WINDOW_LEAD_S, open_window))  # fmt: skip
            open_window()
            collected = _collect(platform, name, job_plan)
        merged = merge_pods(collected, start_at, study.slos.goodput.limits() or None, stage.request_rate)
        extra = {"layer": layer, "stage": plan["stage"]}
        results.append_records(run_dir, REQUESTS_TABLE, [extra | r for r in merged.records])
        if failure is not None:
            details = _failed_pods(platform, name, collected)
            raise LoadJobError(
                f"layers.{layer}: stage {plan['stage']}: in-cluster load Job {name}: {failure}"
                + (f"; {details}" if details else "")
                + f"; the {len(merged.records)} records its pods returned are in data/{REQUESTS_TABLE}.jsonl"
            )
    finally:
        _delete(platform, name)
    record = stage_record(plan, layer, stage.seed, description,
                          any((p.outcome or {}).get("interrupted") for p in collected), merged.summary, window)  # fmt: skip
    record["client_start_at_unix"] = start_at
    record["client_pods"] = [
        {"slice": p.index, "pod": p.pod, "node": p.node, "planned": p.planned,
         "records": sum(1 for r in p.records if not r.get("warmup")),
         **{k: (p.outcome or {}).get(k) for k in ("sent", "completed", "failed", "late_s", "duration_s")},
         "p99_schedule_lag_ms": ((p.outcome or {}).get("schedule_lag_ms") or {}).get("p99")}
        for p in collected
    ]  # fmt: skip
    results.append_records(run_dir, STAGES_TABLE, [record])
    return record
