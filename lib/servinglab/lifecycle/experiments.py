"""The operational experiments, one function each: what a layer does when it starts, changes, splits its
traffic, scales to zero and back, and how much its gateway adds.

Each experiment starts from the layer as the study specifies it, ready, and leaves it that way when it
succeeds; the runner (``lifecycle.run_lifecycle``) puts it back, or deletes it, when an experiment fails
or is interrupted. Each returns its measurements as a dict; a layer or platform that cannot take part says
why through :func:`unsupported_reason` before anything is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Callable

import numpy as np

from .. import results
from ..config import Study
from ..errors import PlatformError
from ..layers import Canary
from ..platforms import Platform
from ..workload import RequestSpec
from . import traffic
from .stats import paired_difference, split_estimate

REQUESTS_TABLE = "lifecycle_requests"
UPDATE_REVISION = "update"
CANARY_REVISION = "canary"
NEEDS_CLUSTER = "needs platform: kubernetes"
NEW_REVISION_WAIT_S = 120.0  # after the change is ready, how long the steady load may still reach the old revision


@dataclass
class Trial:
    """One experiment on one layer: where it runs and where its requests are recorded."""

    study: Study
    platform: Platform
    run_dir: Path
    layer: str
    experiment: str
    trial: int = 0

    @property
    def settings(self):  # noqa: ANN201 - the study's lifecycle workload
        return self.study.workloads.lifecycle

    @property
    def kind(self) -> str:
        return self.study.layers[self.layer].kind

    @property
    def on_cluster(self) -> bool:
        return self.platform.name == "kubernetes"

    def request(self) -> RequestSpec:
        return RequestSpec(self.settings.prompt, 0, self.settings.max_tokens)

    def sink(self, record: dict[str, Any]) -> None:
        results.append_records(self.run_dir, REQUESTS_TABLE, [record])

    def tags(self, **extra: Any) -> dict[str, Any]:
        return {"layer": self.layer, "experiment": self.experiment, "trial": self.trial, **extra}

    def served(self, revision: str | None = None) -> str:
        name = self.study.model.served_name
        return f"{name}:{revision}" if revision else name


# --- which layer can take part ---------------------------------------------------------------------


def layer_limit(kind: str, mode: str | None, experiment: str) -> str | None:
    """Why a layer of this kind (and KServe mode) cannot take part in an experiment on any platform, or
    None: what the layer is, as opposed to where it runs or how the study sets it."""
    if experiment == "canary":
        if kind == "raw-vllm":
            return ("raw vLLM has no traffic split: a canary means a second Deployment, a Service for each "
                    "revision and a weighted proxy or HTTPRoute, written and rolled back by hand")  # fmt: skip
        if kind == "llm-d":
            return ("LLMInferenceService has no canary field: a split needs a second LLMInferenceService and "
                    "weighted routes written by hand")  # fmt: skip
    if experiment == "scale_to_zero":
        if kind == "llm-d":
            return "LLMInferenceService keeps spec.replicas pods: it has no request-driven activation from zero"
        if kind == "kserve" and mode == "Standard":
            return "in Standard mode the HPA keeps at least one replica (minReplicas 0 is raised to 1)"
    if experiment == "gateway_hop" and kind == "raw-vllm":
        return "raw vLLM has no gateway: its Service is the only hop, so there is no overhead to measure"
    return None


def unsupported_reason(study: Study, platform: Platform, layer_name: str, experiment: str) -> str | None:
    """None when the experiment can run on this layer and platform, otherwise why not (the layer's own
    limit first, then the platform's, then the study's settings)."""
    layer = study.layers[layer_name]
    limit = layer_limit(layer.kind, getattr(layer, "mode", None), experiment)
    if limit:
        return limit
    cluster = platform.name == "kubernetes"
    if experiment == "canary":
        return _needs_gateway(platform) if cluster else NEEDS_CLUSTER
    if experiment == "scale_to_zero" and layer.kind == "kserve":
        if not cluster:
            return NEEDS_CLUSTER
        if layer.min_replicas > 0:
            return f"min_replicas is {layer.min_replicas}: set it to 0 for this Knative layer to scale to zero"
        return _needs_gateway(platform)
    if experiment == "gateway_hop" and not cluster:
        return NEEDS_CLUSTER
    return None


def _needs_gateway(platform: Platform) -> str | None:
    settings = platform.settings
    if settings.endpoint == "port-forward" and not settings.gateway_address:
        return ("the split and the activation happen in the gateway: set platform.endpoint: gateway (or "
                "platform.gateway_address) so requests go through it")  # fmt: skip
    return None


# --- helpers -----------------------------------------------------------------------------------------


def _latency(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and latency percentiles of a set of lifecycle requests."""
    ok = [r for r in records if r.get("ok")]
    out: dict[str, Any] = {"requests": len(records), "failed": len(records) - len(ok)}
    errors: dict[str, int] = {}
    for r in records:
        if not r.get("ok"):
            errors[r.get("error_kind") or "unknown"] = errors.get(r.get("error_kind") or "unknown", 0) + 1
    out["errors"] = dict(sorted(errors.items()))
    for metric in ("ttft_ms", "e2el_ms"):
        values = [r[metric] for r in ok if r.get(metric) is not None]
        out[f"p50_{metric}"] = round(float(np.percentile(values, 50)), 3) if values else None
        out[f"p99_{metric}"] = round(float(np.percentile(values, 99)), 3) if values else None
    return out


def _longest_gap_s(records: list[dict[str, Any]], start: float, end: float) -> float:
    """The longest stretch of [start, end] in which no request succeeded: what a user sees as an outage."""
    ends = sorted(r["ended_at_unix"] for r in records if r.get("ok") and start <= r["ended_at_unix"] <= end)
    marks = [start, *ends, end]
    return round(max(b - a for a, b in zip(marks, marks[1:])), 3)


def _change_under_load(trial: Trial, change: Callable[[], Any], new_model: str | None, endpoint) -> dict[str, Any]:  # noqa: ANN001
    """Keep the steady load up, make the change, and measure what the requests saw before, during and after.

    ``new_model`` is the name the changed layer answers as; the change counts as served when a request
    sent after it is answered under that name.
    """
    s = trial.settings
    with traffic.SteadyLoad(endpoint, trial.request(), s.steady_rate, s.request_timeout_s, trial.sink,
                            trial.tags(), seed=s.seed + trial.trial) as load:  # fmt: skip
        time.sleep(s.baseline_s)
        load.mark("during")
        t_change = time.time()
        change()
        t_ready = time.time()
        load.mark("after")
        served_at = None
        deadline = t_ready + NEW_REVISION_WAIT_S
        while new_model and served_at is None and time.time() < deadline:
            answered = [r for r in load.records if r.get("ok") and r.get("model") == new_model
                        and r["sent_at_unix"] >= t_change]  # fmt: skip
            if answered:
                served_at = min(r["ended_at_unix"] for r in answered)
                break
            time.sleep(0.1)
        time.sleep(min(s.baseline_s, 5.0))
        t_end = time.time()
    records = load.records
    before = [r for r in records if r["phase"] == "before"]
    during = [r for r in records if r["phase"] == "during"]
    after = [r for r in records if r["phase"] == "after"]
    baseline = _latency(before)
    slowed = None
    if baseline["p99_e2el_ms"] is not None:
        slowed = sum(1 for r in during + after if r.get("ok") and r["e2el_ms"] > baseline["p99_e2el_ms"])
    return {
        "change_to_ready_s": round(t_ready - t_change, 3),
        "change_to_served_s": None if served_at is None else round(served_at - t_change, 3),
        "longest_gap_s": _longest_gap_s(records, t_change, t_end),
        "before": baseline,
        "during": _latency(during),
        "after": _latency(after),
        "slowed_beyond_baseline_p99": slowed,
        "answered_as_after": sorted({r.get("model") for r in after if r.get("ok")} - {None}),
        "steady_rate": s.steady_rate,
        "via": endpoint.via,
    }


# --- the experiments ---------------------------------------------------------------------------------


def time_to_ready(trial: Trial) -> dict[str, Any]:
    """Delete the layer and deploy it again from nothing; the time and its phases."""
    t0 = time.time()
    stopped = trial.platform.teardown([trial.layer])
    gone_s = time.time() - t0
    deployment = trial.platform.ensure(trial.layer, str(trial.run_dir))
    if deployment.reused:
        raise PlatformError(f"layers.{trial.layer}: still running after teardown, so nothing was timed")
    return {"time_to_ready_s": deployment.time_to_ready_s, "phases_s": deployment.phases_s,
            "teardown_s": round(gone_s, 3), "stopped": stopped, "how": "teardown, then deploy from nothing",
            "url": deployment.url}  # fmt: skip


def model_update(trial: Trial) -> dict[str, Any]:
    """Change an engine argument under a steady load; time until the new revision serves, and what failed."""
    s = trial.settings
    revised = trial.platform.with_study(trial.study.revised(s.update_engine_args, UPDATE_REVISION))
    endpoint = trial.platform.endpoint(trial.layer)

    def change() -> None:
        revised.ensure(trial.layer, str(trial.run_dir), **({"keep_on_failure": True} if trial.on_cluster else {}))

    out = _change_under_load(trial, change, trial.served(UPDATE_REVISION), endpoint)
    how = {"raw-vllm": "restart with the new arguments" if not trial.on_cluster else "Deployment rollout (Recreate)",
           "kserve": "new InferenceService revision", "llm-d": "LLMInferenceService rollout"}[trial.kind]  # fmt: skip
    t0 = time.time()
    trial.platform.ensure(trial.layer, str(trial.run_dir))  # back to the study's spec
    return out | {"changed_args": dict(s.update_engine_args), "how": how, "restore_s": round(time.time() - t0, 3)}


def canary(trial: Trial) -> dict[str, Any]:
    """Send part of the traffic to a new revision; count who answers; promote it, then roll back."""
    s = trial.settings
    platform = trial.platform
    layer = trial.study.layers[trial.layer]
    new_model = trial.served(CANARY_REVISION)
    split = Canary(s.canary_percent, dict(s.update_engine_args), CANARY_REVISION)
    t0 = time.time()
    platform.ensure(trial.layer, str(trial.run_dir), canary=split, keep_on_failure=True)
    canary_ready_s = round(time.time() - t0, 3)
    status_traffic = platform.traffic(trial.layer)
    gateway = platform.endpoint(trial.layer, via="gateway")
    sent = traffic.send_batch(gateway, trial.request(), s.canary_requests, 4, s.request_timeout_s, trial.sink,
                              trial.tags(phase="split"))  # fmt: skip
    answered_by = [r.get("model") if r.get("ok") else None for r in sent]
    estimate = split_estimate(answered_by, new_model, s.canary_percent, s.confidence)
    revised = platform.with_study(trial.study.revised(s.update_engine_args, CANARY_REVISION))

    def promote() -> None:
        revised.ensure(trial.layer, str(trial.run_dir), keep_on_failure=True)

    def roll_back() -> None:
        platform.ensure(trial.layer, str(trial.run_dir), keep_on_failure=True)

    promoted = _change_under_load(trial, promote, new_model, gateway)
    rolled_back = _change_under_load(trial, roll_back, trial.served(), gateway)
    how = ("predictor.canaryTrafficPercent (Knative)" if layer.mode == "Knative"
           else "spec.canary with trafficPercent (Standard, weights in the HTTPRoute)")  # fmt: skip
    return {
        "how": how, "canary_ready_s": canary_ready_s, "split": estimate, "status_traffic": status_traffic,
        "split_latency": _latency(sent), "answered_as": sorted({a for a in answered_by if a}),
        "promote": promoted, "rollback": rolled_back, "via": gateway.via,
    }  # fmt: skip


def scale_to_zero(trial: Trial) -> dict[str, Any]:
    """Reach zero replicas, then time the first request from zero against warm ones, with its phases."""
    if trial.kind == "raw-vllm":
        return _scale_by_hand(trial)
    return _knative_scale_to_zero(trial)


def _warm(trial: Trial, endpoint) -> list[dict[str, Any]]:  # noqa: ANN001
    s = trial.settings
    return traffic.send_batch(endpoint, trial.request(), s.warm_requests, 1, s.request_timeout_s, trial.sink,
                              trial.tags(phase="warm"))  # fmt: skip


def _cold_summary(cold: dict[str, Any], warm: list[dict[str, Any]], t_start: float) -> dict[str, Any]:
    if not cold.get("ok"):
        raise PlatformError(f"the first request from zero failed: {cold.get('error_kind')}: {cold.get('error')}")
    warm_ok = [r for r in warm if r.get("ok")]
    warm_ttft = median(r["ttft_ms"] for r in warm_ok) if warm_ok else None
    first_token = cold["sent_at_unix"] + cold["ttft_ms"] / 1000
    return {
        "cold_start_s": round(first_token - t_start, 3),  # from the moment work from zero began to the first token
        "cold_request_ttft_ms": cold["ttft_ms"], "cold_request_e2el_ms": cold["e2el_ms"],
        "warm_ttft_ms_p50": None if warm_ttft is None else round(warm_ttft, 3),
        "warm_e2el_ms_p50": round(median(r["e2el_ms"] for r in warm_ok), 3) if warm_ok else None,
        "warm_requests": len(warm),
    }  # fmt: skip


def _phases(marks: dict[str, float], start: float, end: float) -> dict[str, float]:
    """Consecutive phase lengths from ``start`` through the marks seen to ``end`` (the first token)."""
    names = {"created": "pod_created_s", "scheduled": "scheduling_s", "image_pulled": "image_pull_s",
             "started": "container_start_s", "ready": "engine_ready_s"}  # fmt: skip
    out, previous = {}, start
    for mark in ("created", "scheduled", "image_pulled", "started", "ready"):
        if mark in marks:
            out[names[mark]] = round(max(0.0, marks[mark] - previous), 3)
            previous = max(previous, marks[mark])
    out["first_token_s"] = round(max(0.0, end - previous), 3)
    return out


def _scale_by_hand(trial: Trial) -> dict[str, Any]:
    """raw vLLM: what its user does by hand, stop (scale to 0) and start (scale to 1) then send."""
    platform, layer = trial.platform, trial.layer
    endpoint = platform.endpoint(layer)
    warm = _warm(trial, endpoint)
    t0 = time.time()
    if trial.on_cluster:
        platform.scale(layer, 0)
        platform.wait_for_pods(layer, 0, trial.settings.scale_to_zero_timeout_s)
    else:
        platform.teardown([layer])
    to_zero_s = round(time.time() - t0, 3)
    t_start = time.time()
    if trial.on_cluster:
        with platform.pod_timeline(layer) as timeline:
            platform.scale(layer, trial.study.layers[layer].replicas)
            platform.wait_ready(layer, t_start)
            endpoint = platform.endpoint(layer)
            cold = traffic.send_batch(endpoint, trial.request(), 1, 1, trial.settings.request_timeout_s, trial.sink,
                                      trial.tags(phase="cold"))[0]  # fmt: skip
        marks = timeline.first()
        how = "by hand: kubectl scale to 0, then to 1, then the request once the pod is ready"
    else:
        deployment = platform.ensure(layer, str(trial.run_dir))
        endpoint = platform.endpoint(layer)
        cold = traffic.send_batch(endpoint, trial.request(), 1, 1, trial.settings.request_timeout_s, trial.sink,
                                  trial.tags(phase="cold"))[0]  # fmt: skip
        marks = {}
        how = "by hand: stop the server, start it again, send the request once it is ready"
    summary = _cold_summary(cold, warm, t_start)
    phases = _phases(marks, t_start, cold["sent_at_unix"] + cold["ttft_ms"] / 1000)
    if not trial.on_cluster:
        phases = {**deployment.phases_s, "first_token_s": round(cold["ttft_ms"] / 1000, 3)}
    return {"how": how, "time_to_zero_s": to_zero_s, "cold_phases_s": phases, **summary, "via": endpoint.via}


def _knative_scale_to_zero(trial: Trial) -> dict[str, Any]:
    """KServe in Knative mode with minReplicas 0: wait for zero pods, then let the activator wake it."""
    platform, layer = trial.platform, trial.layer
    gateway = platform.endpoint(layer, via="gateway")
    warm = _warm(trial, gateway)
    last_end = max((r["ended_at_unix"] or r["sent_at_unix"]) for r in warm)
    waited = platform.wait_for_pods(layer, 0, trial.settings.scale_to_zero_timeout_s)
    to_zero_s = round(time.time() - last_end, 3)
    with platform.pod_timeline(layer) as timeline:
        t_start = time.time()
        cold = traffic.send_batch(gateway, trial.request(), 1, 1, trial.settings.request_timeout_s, trial.sink,
                                  trial.tags(phase="cold"))[0]  # fmt: skip
    summary = _cold_summary(cold, warm, t_start)
    phases = _phases(timeline.first(), t_start, cold["sent_at_unix"] + (cold["ttft_ms"] or 0) / 1000)
    return {"how": "Knative scale to zero (minReplicas 0), woken by the activator", "time_to_zero_s": to_zero_s,
            "waited_for_zero_s": waited, "cold_phases_s": phases, **summary, "via": gateway.via}  # fmt: skip


def gateway_hop(trial: Trial) -> dict[str, Any]:
    """The same requests through the gateway and straight to the engine, interleaved, as pairs."""
    s = trial.settings
    # Through the gateway first: a layer scaled to zero is woken, so the direct path has a pod to reach.
    gateway = trial.platform.endpoint(trial.layer, via="gateway")
    traffic.send_batch(gateway, trial.request(), 1, 1, s.request_timeout_s, trial.sink, trial.tags(phase="wake"))
    paths = trial.platform.paths(trial.layer)
    records = traffic.send_interleaved({"gateway": paths["gateway"], "direct": paths["direct"]}, trial.request(),
                                       s.hop_requests, s.request_timeout_s, trial.sink, trial.tags())  # fmt: skip
    out: dict[str, Any] = {"gateway_via": paths["gateway"].via, "direct_via": paths["direct"].via}
    pairs = [(g, d) for g, d in zip(records["gateway"], records["direct"]) if g.get("ok") and d.get("ok")]
    out["failed"] = {name: sum(1 for r in rs if not r.get("ok")) for name, rs in records.items()}
    if len(pairs) < 2:
        raise PlatformError(f"only {len(pairs)} request pairs succeeded on both paths; failures: {out['failed']}")
    for metric in ("ttft_ms", "e2el_ms"):
        out[f"overhead_{metric}"] = paired_difference([g[metric] for g, _ in pairs], [d[metric] for _, d in pairs],
                                                      s.confidence, seed=s.seed)  # fmt: skip
    if "port-forward" in paths["direct"].via:
        out["note"] = ("the direct path runs through the API server's port-forward tunnel, which adds its own "
                       "hop; run from inside the cluster (platform.endpoint: in-cluster) for the gateway alone")
    return out


EXPERIMENTS: dict[str, Callable[[Trial], dict[str, Any]]] = {
    "time_to_ready": time_to_ready,
    "model_update": model_update,
    "canary": canary,
    "scale_to_zero": scale_to_zero,
    "gateway_hop": gateway_hop,
}
