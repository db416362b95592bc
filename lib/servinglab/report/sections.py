"""The report's evidence sections below the table: manifests, lifecycle outcomes, cost. Each is a list of
plain rows for the template, computed from the run's data only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import cost
from . import manifests
from .plots import START_PHASE_LABELS
from .rundata import RunData
from .table import created_by_platform, requests_text, millis, seconds


@dataclass(frozen=True)
class ManifestRow:
    layer: str
    kind: str
    written: str  # "Deployment, Service"
    lines: int
    fields: int
    created: str  # what the platform made of them, or why that is unknown


@dataclass(frozen=True)
class DistanceRow:
    layer: str
    model: str
    changed_fields: int
    added_or_removed: int
    total_fields: int
    diff_lines: int
    paths: list[str]


@dataclass(frozen=True)
class Manifests:
    rows: list[ManifestRow]
    distances: list[DistanceRow]
    assumed: str | None
    error: str | None


def manifest_section(run: RunData) -> Manifests:
    """Per layer, what the user writes and what the platform created; per compared model, what changes."""
    found = manifests.recorded(run)
    if found is None:
        return Manifests([], [], None, "not recorded in this run: it was made before runs kept the manifests they "
                         "applied (manifests/ in the run directory)")  # fmt: skip
    rows, distances, errors = [], [], []
    for layer, spec in run.layers.items():
        mine = found[layer]
        if mine.authored is None:
            errors.append(f"{layer}: {mine.error}")
            continue
        created = created_by_platform(run, layer)
        if created is None:
            created_text = ("not recorded: no fresh start of this layer in this run" if mine.authored.assumed is None
                            else "needs platform: kubernetes")  # fmt: skip
        else:
            created_text = ", ".join(created) or "nothing"
        rows.append(ManifestRow(layer, spec.get("kind", "?"), manifests.kind_counts(mine.authored.kinds),
                                mine.authored.lines, mine.authored.fields, created_text))  # fmt: skip
        for d in mine.distances:
            distances.append(DistanceRow(layer, f"{d.model} ({d.served_name})", d.changed_fields,
                                         d.added_or_removed, d.total_fields, d.diff_lines, d.paths))  # fmt: skip
        errors += [f"{layer}: {e}" for e in mine.distance_errors]
    return Manifests(rows, distances, manifests.assumed_text(found), "; ".join(errors) or None)


def trial_sentence(record: dict[str, Any]) -> str:
    """One experiment trial in a sentence: its headline numbers, or why it has none."""
    if record["status"] != "measured":
        return f"{record['status']}: {record.get('reason') or 'no reason recorded'}"
    m, name = record["measurements"], record["experiment"]
    if name == "time_to_ready":
        found = m.get("phases_s") or {}
        phases = ", ".join(f"{label} {found[k]:.2f}" for k, label in START_PHASE_LABELS.items() if k in found)
        return f"{seconds(m['time_to_ready_s'])} to ready ({phases}); teardown before it {seconds(m['teardown_s'])}"
    if name == "model_update":
        served = m.get("change_to_served_s")
        head = f"new revision served after {seconds(served)}" if served is not None else "new revision not seen answering"
        return (f"{m['how']}: {head}, ready after {seconds(m['change_to_ready_s'])}; before: "
                f"{requests_text(m['before'])}; during: {requests_text(m['during'])}; after: {requests_text(m['after'])}; "
                f"longest gap {seconds(m['longest_gap_s'])}")  # fmt: skip
    if name == "canary":
        split = m["split"]
        return (f"{m['how']}: {split['observed_percent']:.1f} % of {split['answered']} answers from the canary for "
                f"{split['requested_percent']:g} % requested [{split['ci_low_percent']:.1f}, "
                f"{split['ci_high_percent']:.1f}]; "
                f"canary ready after {seconds(m['canary_ready_s'])}; promote: {requests_text(m['promote']['during'])}; "
                f"rollback: {requests_text(m['rollback']['during'])}")  # fmt: skip
    if name == "scale_to_zero":
        return (f"{m['how']}: zero after {seconds(m['time_to_zero_s'])}; first token from zero after "
                f"{seconds(m['cold_start_s'])} (its TTFT {millis(m['cold_request_ttft_ms'])}); warm TTFT p50 "
                f"{millis(m['warm_ttft_ms_p50'])}")  # fmt: skip
    if name == "gateway_hop":
        t, e = m["overhead_ttft_ms"], m["overhead_e2el_ms"]
        return (f"gateway − direct over {t['pairs']} pairs: TTFT {millis(t['median_difference'])} [{t['ci_low']:.2f}, "
                f"{t['ci_high']:.2f}], E2E {millis(e['median_difference'])} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]; "
                f"through the gateway at {m['gateway_via'].removeprefix('gateway ')}; "
                f"directly by {m['direct_via']}")  # fmt: skip
    return ""


def lifecycle_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per experiment trial, in the order they ran."""
    return [{"layer": r["layer"], "experiment": r["experiment"], "trial": r["trial"] + 1, "status": r["status"],
             "result": trial_sentence(r), "settled": r.get("settled") or ""} for r in run.lifecycle]  # fmt: skip


@dataclass(frozen=True)
class Costs:
    load_points: list[dict[str, Any]]
    idle: list[dict[str, Any]]
    note: str | None  # why there is nothing to show


def cost_section(run: RunData) -> Costs:
    """Cost per 1,000 requests at every load point and the idle cost of each layer, from the study's prices."""
    if cost.replica_price(run.params) is None:
        return Costs([], [], "The study sets no price that applies here: costs.gpu_hourly (GPU replicas), or "
                     "costs.replica_hourly (any replica, a CPU machine too).")  # fmt: skip
    return Costs(cost.load_point_costs(run.params, run.deployments, run.latency_stages),
                 cost.idle_costs(run.params, run.deployments), None)  # fmt: skip


# --- failures and warnings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunWarning:
    """One failure or warning of the run, with the group it is listed under and the whole of its reason."""

    kind: str  # the group's heading, shared by every warning of that kind ("Lifecycle experiment failed")
    reason: str  # the whole reason; the lines after the first (a log) are kept
    layer: str = ""  # the layer it concerns ("" for the whole run)
    subject: str = ""  # what of the layer: a stage ("c=32"), a trial ("canary #1"), a check

    @property
    def line(self) -> str:
        """The warning as one entry of a flat list (the batch's summary counts these)."""
        where = " ".join(part for part in (self.layer, self.subject) if part)
        return f"{where}: {self.reason}" if where else self.reason


@dataclass(frozen=True)
class WarningItem:
    reason: str
    where: str  # the layers and subjects that share this reason: "raw (c=16, c=32), kserve (c=8)"
    count: int


@dataclass(frozen=True)
class WarningGroup:
    kind: str
    items: list[WarningItem]

    @property
    def count(self) -> int:
        return sum(item.count for item in self.items)


def _where(warnings: list[RunWarning]) -> str:
    """``raw (c=16, c=32), kserve (c=8)``: the subjects named under their layers, in the run's order."""
    layers: dict[str, list[str]] = {}
    for w in warnings:
        layers.setdefault(w.layer, []).extend([w.subject] if w.subject else [])
    named = [(layer, ", ".join(subjects)) for layer, subjects in layers.items()]
    return ", ".join(f"{layer} ({subjects})" if layer and subjects else layer or subjects
                     for layer, subjects in named if layer or subjects)  # fmt: skip


def group_warnings(warnings: list[RunWarning]) -> list[WarningGroup]:
    """The warnings grouped by kind (in the order kinds first appear), and within a kind the ones with the same
    reason merged into one item that names every stage or trial it concerns."""
    kinds: dict[str, dict[str, list[RunWarning]]] = {}
    for w in warnings:
        kinds.setdefault(w.kind, {}).setdefault(w.reason, []).append(w)
    return [WarningGroup(kind, [WarningItem(reason, _where(same), len(same)) for reason, same in reasons.items()])
            for kind, reasons in kinds.items()]  # fmt: skip


def stage_warnings(run: RunData) -> list[RunWarning]:
    """What went wrong in the latency stages: the stage's own warnings, failed requests, a server that stopped
    answering, an interrupted stage."""
    out = []
    for stage in run.latency_stages:
        at = {"layer": stage["layer"], "subject": stage["stage"]}
        summary = stage["summary"]
        out += [RunWarning("Latency stage warned", warning, **at) for warning in summary.get("warnings", [])]
        if summary.get("failed"):
            out.append(RunWarning("Requests failed in a latency stage",
                               f"{summary['failed']} requests failed {summary.get('errors', {})}", **at))  # fmt: skip
        if stage.get("server_alive_after") is False:
            out.append(RunWarning("Server not answering after a stage", "the server was not answering after the stage",
                                  **at))  # fmt: skip
        if stage.get("interrupted"):
            out.append(RunWarning("Latency stage interrupted", "interrupted; its measurements up to then are kept",
                                  **at))  # fmt: skip
    return out


def lifecycle_failures(run: RunData) -> list[RunWarning]:
    """The experiments that failed or were interrupted, with what was done to the layer after; the log lines
    of the reason stay, after its first line."""
    out = []
    for r in run.lifecycle:
        if r["status"] in ("failed", "interrupted"):
            first, *rest = (r.get("reason") or "no reason recorded").strip().splitlines() or [""]
            settled = f" (the layer was {r['settled']})" if r.get("settled") else ""
            out.append(RunWarning(f"Lifecycle experiment {r['status']}", "\n".join([f"{first}{settled}", *rest]),
                               r["layer"], f"{r['experiment']} #{r['trial'] + 1}"))  # fmt: skip
    return out
