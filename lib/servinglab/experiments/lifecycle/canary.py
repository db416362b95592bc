"""Canary: part of the traffic to a new revision, counted by who answers; then promote it, and roll back."""

from __future__ import annotations

import time
from typing import Any

from ...layers.common import Canary
from . import traffic
from .stats import split_estimate
from .trial import Trial, change_under_load, latency_stats

CANARY_REVISION = "canary"


def run(trial: Trial) -> dict[str, Any]:
    """Send part of the traffic to a new revision; count who answers; promote it, then roll back."""
    s = trial.settings
    platform = trial.platform
    how = trial.mechanism.how
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

    promoted = change_under_load(trial, promote, new_model, gateway)
    rolled_back = change_under_load(trial, roll_back, trial.served(), gateway)
    return {
        "how": how, "canary_ready_s": canary_ready_s, "split": estimate, "status_traffic": status_traffic,
        "split_latency": latency_stats(sent), "answered_as": sorted({a for a in answered_by if a}),
        "promote": promoted, "rollback": rolled_back, "via": gateway.via,
    }  # fmt: skip
