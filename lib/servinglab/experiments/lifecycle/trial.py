"""What every lifecycle experiment shares: the trial it runs as, who may refuse it, and the measurements
of requests sent while a layer changes."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ... import layers, records
from ...config import LifecycleWorkload, Study
from ...errors import ServinglabError
from ...layers import Mechanism, Refusal
from ...measure.workload import RequestSpec
from ...platforms import Endpoint, Platform
from . import traffic

NEW_REVISION_WAIT_S = 120.0  # after the change is ready, how long the steady load may still reach the old revision


@dataclass
class Trial:
    """One experiment on one layer: where it runs, how the layer's kind does it, where requests are recorded.

    Its requests are recorded while :meth:`recording` is open, by a writer off the measuring event loop.
    """

    study: Study
    platform: Platform
    run_dir: Path
    layer: str
    experiment: str
    trial: int = 0
    _requests: records.Writer | None = field(default=None, init=False, repr=False, compare=False)
    # What the trial's requests came to, for the line the batch prints when it ends.
    requests_sent: int = field(default=0, init=False, compare=False)
    requests_failed: int = field(default=0, init=False, compare=False)

    @property
    def settings(self) -> LifecycleWorkload:
        return self.study.workloads.lifecycle

    @property
    def kind(self) -> str:
        return self.study.layers[self.layer].kind

    @property
    def on_cluster(self) -> bool:
        return self.platform.name == "kubernetes"

    @property
    def mechanism(self) -> Mechanism:
        found = mechanism_or_refusal(self.study, self.platform, self.layer, self.experiment)
        if isinstance(found, Refusal):
            raise RuntimeError(f"{self.experiment} on layer {self.layer} was refused: {found.reason}")
        return found

    def request(self) -> RequestSpec:
        return RequestSpec(self.settings.prompt, 0, self.settings.max_tokens)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the trial's requests while the block runs. When it ends, however it ends (a failure,
        Ctrl-C), every record handed to :meth:`sink` is written and synced to disk before it goes on."""
        writer = records.Writer.to_run(self.run_dir, records.LIFECYCLE_REQUESTS)
        self._requests = writer
        try:
            with writer:
                yield
        finally:
            self._requests = None

    def sink(self, record: dict[str, Any]) -> None:
        """Hand one request's record to the trial's writer. Called from the measuring event loop as each
        request ends, so it only queues: a request never waits for the disk."""
        if self._requests is None:
            raise ServinglabError(f"{self.experiment} on layer {self.layer} sent a request outside its trial's "
                                  "recording")  # fmt: skip
        self._requests.put(record)
        self.requests_sent += 1
        self.requests_failed += 0 if record.get("ok") else 1

    def tags(self, **extra: Any) -> dict[str, Any]:
        return {"layer": self.layer, "experiment": self.experiment, "trial": self.trial, **extra}

    def served(self, revision: str | None = None) -> str:
        name = self.study.model.served_name
        return f"{name}:{revision}" if revision else name


def mechanism_or_refusal(study: Study, platform: Platform, layer_name: str, experiment: str) -> Mechanism | Refusal:
    """How the experiment is done on this layer, or why not: the kind's own limit first, then the platform
    (the layer is not hosted here, or the mechanism needs what the platform lacks), then the study's settings."""
    found = layers.of(study.layers[layer_name]).mechanism(study, layer_name, experiment)
    if isinstance(found, Refusal) and found.by == "layer":
        return found
    hosted = platform.unsupported_reason(layer_name)
    if hosted:
        return Refusal(hosted, "platform")
    if isinstance(found, Refusal):
        return found
    return platform.refusal(found.needs) or found


def refusal(study: Study, platform: Platform, layer_name: str, experiment: str) -> Refusal | None:
    found = mechanism_or_refusal(study, platform, layer_name, experiment)
    return found if isinstance(found, Refusal) else None


# --- measurements of requests around a change ---------------------------------------------------------


def latency_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and latency percentiles of a set of lifecycle requests."""
    ok = [r for r in rows if r.get("ok")]
    out: dict[str, Any] = {"requests": len(rows), "failed": len(rows) - len(ok)}
    errors: dict[str, int] = {}
    for r in rows:
        if not r.get("ok"):
            errors[r.get("error_kind") or "unknown"] = errors.get(r.get("error_kind") or "unknown", 0) + 1
    out["errors"] = dict(sorted(errors.items()))
    for metric in ("ttft_ms", "e2el_ms"):
        values = [r[metric] for r in ok if r.get(metric) is not None]
        out[f"p50_{metric}"] = round(float(np.percentile(values, 50)), 3) if values else None
        out[f"p99_{metric}"] = round(float(np.percentile(values, 99)), 3) if values else None
    return out


def longest_gap_s(rows: list[dict[str, Any]], start: float, end: float) -> float:
    """The longest stretch of [start, end] in which no request succeeded: what a user sees as an outage."""
    ends = sorted(r["ended_at_unix"] for r in rows if r.get("ok") and start <= r["ended_at_unix"] <= end)
    marks = [start, *ends, end]
    return round(max(b - a for a, b in zip(marks, marks[1:])), 3)


def change_under_load(trial: Trial, change: Callable[[], Any], new_model: str | None, endpoint: Endpoint) -> dict[str, Any]:
    """Keep the steady load up, make the change, and measure what the requests saw before, during and after.

    ``new_model`` is the name the changed layer answers as; the change counts as served when a request
    sent after it is answered under that name. A request sent before the change that failed after it began
    is counted with those sent during it.
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
    sent = load.records
    # A request sent before the change and cut after it began failed because of the change: it counts with
    # the requests sent during it, not against the baseline.
    cut = [r for r in sent if r["phase"] == "before" and not r.get("ok") and r["ended_at_unix"] > t_change]
    before = [r for r in sent if r["phase"] == "before" and not any(r is c for c in cut)]
    during = [r for r in sent if r["phase"] == "during"] + cut
    after = [r for r in sent if r["phase"] == "after"]
    baseline = latency_stats(before)
    slowed = None
    if baseline["p99_e2el_ms"] is not None:
        slowed = sum(1 for r in during + after if r.get("ok") and r["e2el_ms"] > baseline["p99_e2el_ms"])
    return {
        "change_to_ready_s": round(t_ready - t_change, 3),
        "change_to_served_s": None if served_at is None else round(served_at - t_change, 3),
        "longest_gap_s": longest_gap_s(sent, t_change, t_end),
        "before": baseline,
        "during": latency_stats(during),
        "after": latency_stats(after),
        "slowed_beyond_baseline_p99": slowed,
        "answered_as_after": sorted({r.get("model") for r in after if r.get("ok")} - {None}),
        "steady_rate": s.steady_rate,
        "via": endpoint.via,
    }
