"""Scale to zero and the cold start: reach zero replicas, then time the first request from zero against warm
ones, with the phases of the wake-up. A layer whose kind scales on demand is woken by the request itself
(Knative's activator); one that a person scales is stopped and started by hand, as its user would."""

from __future__ import annotations

import time
from statistics import median
from typing import Any

from ... import layers
from ...errors import PlatformError
from ...platforms import Endpoint
from . import traffic
from .trial import Trial

# How long the pod watch gets, after the first token from zero, to deliver the pod's Ready: the event can
# arrive after the answer it made possible.
READY_MARK_WAIT_S = 3.0
PHASE_NAMES = {"created": "pod_created_s", "scheduled": "scheduling_s", "image_pulled": "image_pull_s",
               "started": "container_start_s", "ready": "engine_ready_s"}  # fmt: skip


def run(trial: Trial) -> dict[str, Any]:
    """Reach zero replicas, then time the first request from zero against warm ones, with its phases."""
    if trial.mechanism.mode == "on-demand":
        return _on_demand(trial)
    return _by_hand(trial)


def _warm(trial: Trial, endpoint: Endpoint) -> list[dict[str, Any]]:
    s = trial.settings
    return traffic.send_batch(endpoint, trial.request(), s.warm_requests, 1, s.request_timeout_s, trial.sink,
                              trial.tags(phase="warm"))  # fmt: skip


def _cold(trial: Trial, endpoint: Endpoint) -> dict[str, Any]:
    return traffic.send_batch(endpoint, trial.request(), 1, 1, trial.settings.request_timeout_s, trial.sink,
                              trial.tags(phase="cold"))[0]  # fmt: skip


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


def phases(marks: dict[str, float], start: float, end: float) -> dict[str, float]:
    """Consecutive phase lengths from ``start`` through the marks seen to ``end`` (the first token)."""
    out, previous = {}, start
    for mark, name in PHASE_NAMES.items():
        if mark in marks:
            at = min(marks[mark], end)  # a mark seen after the first token was reached by then
            out[name] = round(max(0.0, at - previous), 3)
            previous = max(previous, at)
    out["first_token_s"] = round(max(0.0, end - previous), 3)
    return out


def _by_hand(trial: Trial) -> dict[str, Any]:
    """What the layer's user does by hand: stop it (scale to 0) and start it (scale back), then send."""
    platform, layer = trial.platform, trial.layer
    endpoint = platform.endpoint(layer)
    warm = _warm(trial, endpoint)
    t0 = time.time()
    platform.scale(layer, 0)
    platform.wait_for_pods(layer, 0, trial.settings.scale_to_zero_timeout_s)
    to_zero_s = round(time.time() - t0, 3)
    t_start = time.time()
    started_phases: dict[str, float] = {}
    with platform.pod_timeline(layer) as timeline:
        if platform.replicas(layer) is None:  # a server that is started, not scaled: its start has the phases
            started_phases = platform.ensure(layer, str(trial.run_dir)).phases_s
        else:
            spec = trial.study.layers[layer]
            platform.scale(layer, layers.of(spec).serving_replicas(spec))
            platform.wait_ready(layer, t_start)
        endpoint = platform.endpoint(layer)
        cold = _cold(trial, endpoint)
    summary = _cold_summary(cold, warm, t_start)
    if started_phases:
        cold_phases = {**started_phases, "first_token_s": round(cold["ttft_ms"] / 1000, 3)}
    else:
        cold_phases = phases(timeline.first(), t_start, cold["sent_at_unix"] + cold["ttft_ms"] / 1000)
    return {"how": trial.mechanism.how, "time_to_zero_s": to_zero_s, "cold_phases_s": cold_phases, **summary,
            "via": endpoint.via}  # fmt: skip


def _on_demand(trial: Trial) -> dict[str, Any]:
    """A layer that scales itself to zero (Knative with minReplicas 0): wait for zero pods, then let a
    request through its gateway wake it."""
    platform, layer = trial.platform, trial.layer
    gateway = platform.endpoint(layer, via="gateway")
    warm = _warm(trial, gateway)
    last_end = max((r["ended_at_unix"] or r["sent_at_unix"]) for r in warm)
    waited = platform.wait_for_pods(layer, 0, trial.settings.scale_to_zero_timeout_s)
    to_zero_s = round(time.time() - last_end, 3)
    with platform.pod_timeline(layer) as timeline:
        t_start = time.time()
        cold = _cold(trial, gateway)
        timeline.wait_for("ready", READY_MARK_WAIT_S)
    summary = _cold_summary(cold, warm, t_start)
    cold_phases = phases(timeline.first(), t_start, cold["sent_at_unix"] + (cold["ttft_ms"] or 0) / 1000)
    return {"how": trial.mechanism.how, "time_to_zero_s": to_zero_s, "waited_for_zero_s": waited,
            "cold_phases_s": cold_phases, **summary, "via": gateway.via}  # fmt: skip
