"""The lifecycle experiments of a study (notebook 40_lifecycle): time to ready, model update, canary split,
scale to zero and cold start, gateway overhead, per layer where the layer supports them.

Each experiment is a module of this package with a ``run(trial)`` that starts from the layer as the study
specifies it, ready, and leaves it that way when it succeeds. How it is done on a layer, or who refuses
it, is the layer kind's answer (``LayerKind.mechanism``), checked against what the platform offers.

Every outcome is one record in ``data/lifecycle.jsonl``, written when the experiment ends (measured,
unsupported with the reason and who refused, failed with the error, or interrupted); every request the
experiments send is one record in ``data/lifecycle_requests.jsonl``, written as it ends. After a failure or
an interruption the layer is put back as the study specifies it, or deleted, as
``workloads.lifecycle.on_interrupt`` says.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from ... import layers, progress, records
from ...config import Study
from ...errors import PlatformError, ServinglabError
from ...platforms import Platform
from . import canary, gateway_hop, model_update, scale_to_zero, time_to_ready
from .trial import Trial, refusal

EXPERIMENTS: dict[str, Callable[[Trial], dict[str, Any]]] = {
    "time_to_ready": time_to_ready.run,
    "model_update": model_update.run,
    "canary": canary.run,
    "scale_to_zero": scale_to_zero.run,
    "gateway_hop": gateway_hop.run,
}

# Each experiment's headline figure, for the line the batch prints as a trial ends: (label, path into its
# measurements, unit).
HEADLINE_FIGURES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "time_to_ready": ("time to ready", ("time_to_ready_s",), "s"),
    "model_update": ("change to ready", ("change_to_ready_s",), "s"),
    "canary": ("answers from the canary", ("split", "observed_percent"), "%"),
    "scale_to_zero": ("cold start", ("cold_start_s",), "s"),
    "gateway_hop": ("gateway TTFT overhead", ("overhead_ttft_ms", "median_difference"), "ms"),
}
# A failure's reason is cut to this in the line (the record and the report keep all of it).
REASON_IN_LINE_CHARS = 100

__all__ = ["EXPERIMENTS", "assert_measured", "run_lifecycle", "plan_frame", "outcomes_frame", "time_to_ready_frame",
           "settle"]  # fmt: skip


def _record(trial: Trial, status: str, started: float, **fields: Any) -> dict[str, Any]:
    record = {
        "layer": trial.layer, "kind": trial.kind, "platform": trial.platform.name, "experiment": trial.experiment,
        "trial": trial.trial, "status": status, "reason": None, "started_at_unix": round(started, 3),
        "ended_at_unix": round(time.time(), 3), "measurements": {}, "settled": None,
    } | fields  # fmt: skip
    records.append(trial.run_dir, records.LIFECYCLE, [record])
    return record


def settle(study: Study, platform: Platform, layer_name: str, run_dir: str | os.PathLike) -> str:
    """Put a layer back as the study specifies it (``restore``) or delete it (``teardown``); what was done."""
    if study.workloads.lifecycle.on_interrupt == "teardown":
        platform.teardown([layer_name])
        return "torn down"
    spec = study.layers[layer_name]
    wanted = layers.of(spec).serving_replicas(spec)
    current = platform.replicas(layer_name)
    if current is not None and current != wanted:  # scaled by hand during the experiment
        since = time.time()
        platform.scale(layer_name, wanted)
        platform.wait_ready(layer_name, since)
    platform.ensure(layer_name, str(run_dir))
    return "restored"


def run_lifecycle(
    study: Study,
    platform: Platform,
    run_dir: str | os.PathLike,
    layers: list[str] | None = None,
    experiments: list[str] | None = None,
    deploy_missing: bool = False,
) -> list[dict[str, Any]]:
    """Run the study's lifecycle experiments on each layer (all of the study's when ``layers`` is empty).

    Parameters
    ----------
    experiments : list of str, optional
        A subset of ``workloads.lifecycle.experiments``; empty: all of them, in the study's order.
    deploy_missing : bool
        Deploy a hostable layer that is not running first (a notebook run on its own); otherwise such a
        layer's experiments are recorded as failed.

    Returns the records written to ``data/lifecycle.jsonl``. Ctrl-C stops at once: the experiment under
    way is recorded as interrupted, the layer settled, and the interrupt goes on.
    """
    settings = study.workloads.lifecycle
    names = experiments or list(settings.experiments)
    for name in names:
        if name not in EXPERIMENTS:
            raise ServinglabError(f"unknown lifecycle experiment '{name}'; known: {', '.join(EXPERIMENTS)}")
    out = []
    for layer_name in study.select_layers(layers):
        for name in names:
            repeats = settings.repeats if name == "time_to_ready" else 1
            for index in range(repeats):
                trial = Trial(study, platform, Path(run_dir), layer_name, name, index)
                started = time.time()
                refused = refusal(study, platform, layer_name, name)
                if refused:
                    out.append(_record(trial, "unsupported", started, reason=refused.reason, refused_by=refused.by))
                    progress.say(trial_end_line(out[-1], 1, trial))
                    break
                out.append(_run_one(trial, started, deploy_missing))
                progress.say(trial_end_line(out[-1], repeats, trial))
    return out


def trial_end_line(record: dict[str, Any], trials: int, trial: Trial) -> str:
    """One line for a trial as it ends: experiment, layer, trial n of m, its headline figure or why it has
    none, and how many of its requests failed.

    Parameters
    ----------
    record : dict
        The trial's record of ``data/lifecycle.jsonl``.
    trials : int
        How many trials of the experiment the layer gets.
    trial : Trial
        The trial that ran (it counted its requests).
    """
    head = f"lifecycle {record['experiment']} on {record['layer']}, trial {record['trial'] + 1} of {trials}: "
    if record["status"] != "measured":
        reason = " ".join(str(record.get("reason") or "no reason recorded").split())
        cut = reason if len(reason) <= REASON_IN_LINE_CHARS else reason[: REASON_IN_LINE_CHARS - 1] + "…"
        head += f"{record['status']}: {cut}"
    else:
        label, path, unit = HEADLINE_FIGURES.get(record["experiment"], ("", (), ""))
        value: Any = record["measurements"]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        head += "measured" + (f", {label} {value:.1f} {unit}" if isinstance(value, (int, float)) and path else "")
    if trial.requests_sent:
        head += f"; {trial.requests_failed} of {trial.requests_sent} requests failed"
    return head


def _run_one(trial: Trial, started: float, deploy_missing: bool) -> dict[str, Any]:
    try:
        with trial.recording():  # its requests are on disk before the outcome is written, whatever happens
            _ready(trial, deploy_missing)
            measurements = EXPERIMENTS[trial.experiment](trial)
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        try:
            settled = settle(trial.study, trial.platform, trial.layer, trial.run_dir)
        except BaseException as settle_error:  # noqa: BLE001 - recorded; the original error goes on
            settled = f"could not settle: {settle_error}"
        record = _record(trial, "interrupted" if interrupted else "failed", started,
                         reason=f"{type(exc).__name__}: {exc}", settled=settled)  # fmt: skip
        if interrupted or not isinstance(exc, (ServinglabError, OSError, ValueError)):
            raise
        return record
    return _record(trial, "measured", started, measurements=measurements)


def assert_measured(outcomes: list[dict[str, Any]]) -> None:
    """Raise when an experiment that could run did not measure (failed or interrupted)."""
    failed = [r for r in outcomes if r["status"] in ("failed", "interrupted")]
    if failed:
        raise ServinglabError("lifecycle experiments did not measure:\n  " + "\n  ".join(
            f"{r['layer']} {r['experiment']} #{r['trial'] + 1}: {r['reason']} (layer {r['settled']})" for r in failed))  # fmt: skip


def _ready(trial: Trial, deploy_missing: bool) -> None:
    """The layer must be running with the study's spec before an experiment starts from it."""
    try:
        trial.platform.endpoint(trial.layer)
    except PlatformError:
        if not deploy_missing:
            raise
        trial.platform.ensure(trial.layer, str(trial.run_dir))


# --- tables ------------------------------------------------------------------------------------------


def plan_frame(study: Study, platform: Platform, layers: list[str] | None = None):
    """Which experiment runs on which layer here, and why not where it does not."""
    import pandas as pd

    rows = []
    for layer_name in study.select_layers(layers):
        row = {"layer": layer_name}
        for name in study.workloads.lifecycle.experiments:
            refused = refusal(study, platform, layer_name, name)
            row[name] = f"no: {refused.reason}" if refused else "yes"
        rows.append(row)
    return pd.DataFrame(rows)


def outcomes_frame(run_dir: str | os.PathLike):
    """One row per experiment trial: layer, experiment, status and the headline figure or the reason."""
    import pandas as pd

    from ...report.sections import trial_sentence  # the report's wording, so notebook and report agree

    rows = [{"layer": r["layer"], "experiment": r["experiment"], "trial": r["trial"] + 1, "status": r["status"],
             "result": trial_sentence(r), "settled": r.get("settled")}
            for r in records.read(run_dir, records.LIFECYCLE).rows]  # fmt: skip
    return pd.DataFrame(rows, columns=["layer", "experiment", "trial", "status", "result", "settled"])


def time_to_ready_frame(run_dir: str | os.PathLike):
    """Seconds per phase of every measured fresh start (rows: layer and trial)."""
    import pandas as pd

    rows = []
    for r in records.read(run_dir, records.LIFECYCLE).rows:
        if r["experiment"] == "time_to_ready" and r["status"] == "measured":
            m = r["measurements"]
            rows.append({"layer": r["layer"], "trial": r["trial"] + 1, "time_to_ready_s": m["time_to_ready_s"],
                         "teardown_s": m["teardown_s"], **m["phases_s"]})  # fmt: skip
    return pd.DataFrame(rows)
