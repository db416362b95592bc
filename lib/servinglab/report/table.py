"""The serving-layer decision table, one cell per (dimension, layer), each measured or explained.

The rows are the source page's dimensions plus the smoke test and the performance rows. The columns are
the study's layers, grouped under the source page's columns (raw vLLM, KServe InferenceService,
LLMInferenceService): a study may have several layers of one kind (KServe in Standard and in Knative
mode). Every cell is built from the run's data only and says what kind of statement it is:

- ``measured``: a number from this run, with its unit and the number of trials;
- ``observed``: a behaviour seen in this run (a URL, a process count, checks passed, a layer refusing an
  experiment it has no means for, with the reason it gave);
- ``needs-platform``: the layer cannot run on this run's platform (or the cluster lacks what it needs);
- ``not-deployed`` / ``failed``: the layer was not deployed in this run, or it or the experiment failed,
  with the reason;
- ``not-run``: the layer ran, but the experiment that measures this row did not (with what to set).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import cost
from ..measure import intervals
from . import manifests
from .rundata import RunData

NOT_RUN_LIFECYCLE = "experiment not run in this run (40_lifecycle runs it: workloads.lifecycle.experiments)"


@dataclass(frozen=True)
class Cell:
    status: str
    text: str
    trials: int | None = None
    evidence: str | None = None  # an anchor in the report or a data file of the run
    validity: str | None = None  # the worst verdict of the latency stages the cell shows (None: none shown)
    provenance: str = "measured"  # synthetic or imported when any number in the cell is
    partly_failed: bool = False  # a measured cell one of whose experiments failed (its text says which)

    @property
    def has_value(self) -> bool:
        return self.status in ("measured", "observed")

    @property
    def badge(self) -> str:
        """The cell's status, with what qualifies its numbers: ``measured · client-limited``, ``… · synthetic``."""
        parts = [self.status]
        if self.partly_failed:
            parts.append("partly failed")
        if self.validity and self.validity != "valid":
            parts.append(self.validity)
        if self.provenance != "measured":
            parts.append(self.provenance)
        return " · ".join(parts)

    @property
    def tone(self) -> str:
        """The colour of the cell's badge: its worst part, so a measured cell with a failed experiment or an
        invalid stage does not read as plain green."""
        if self.status == "failed" or self.partly_failed:
            return "failed"
        if self.has_value and self.validity and self.validity != "valid":
            return "qualified"
        return self.status


@dataclass(frozen=True)
class Row:
    key: str  # the row's key; each layer kind's claims (run.json's layer_kinds) are keyed by it
    title: str
    measure: Callable[[RunData, str, str], Cell]


# --- formatting --------------------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def millis(value: float) -> str:
    return f"{value:.2f} ms" if abs(value) < 10 else (f"{value:.1f} ms" if abs(value) < 100 else f"{value:.0f} ms")


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole}"


def _first_line(text: str | None) -> str:
    """A reason in one line: its first, and its last when the first only introduces what follows (a log)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return "no reason recorded"
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


# --- what a cell can lean on -------------------------------------------------------------------------


def _deployment_gate(run: RunData, layer: str) -> Cell | None:
    """The cell for a layer that is not running in this run, or None when it is."""
    record = run.last_deployment(layer)
    if record is None:
        return Cell("not-deployed", "layer not deployed in this run", evidence="#deployments")
    if record["status"] == "unsupported":
        return Cell("needs-platform", record["reason"], evidence="#deployments")
    if record["status"] == "failed":
        return Cell("failed", f"deploy failed: {_first_line(record['reason'])}", evidence="#deployments")
    return None


def _on_cluster(run: RunData) -> bool:
    return run.params.get("platform", {}).get("kind") == "kubernetes"


@dataclass(frozen=True)
class Outcome:
    """One experiment on one layer: its measured trials, or the record that says why there are none."""

    measured: list[dict[str, Any]]
    other: dict[str, Any] | None  # the last unsupported / failed / interrupted record

    @property
    def last(self) -> dict[str, Any] | None:
        return self.measured[-1]["measurements"] if self.measured else None


def experiment_outcome(run: RunData, layer: str, experiment: str) -> Outcome:
    records = run.lifecycle_of(layer, experiment)
    measured = [r for r in records if r["status"] == "measured"]
    others = [r for r in records if r["status"] != "measured"]
    return Outcome(measured, others[-1] if others else None)


def _why_not(run: RunData, layer: str, experiment: str, outcome: Outcome, evidence: str = "#lifecycle") -> Cell:
    """The cell for an experiment with no measurement: the layer's own limit, the platform, a failure, or
    an experiment that was not run."""
    record = outcome.other
    if record is not None and record["status"] == "unsupported":
        reason = record["reason"] or ""
        gate = _deployment_gate(run, layer)
        if gate and gate.status == "needs-platform":  # the layer never ran here: nothing about it was seen
            return gate
        by = record.get("refused_by")
        if by == "layer":  # the kind has no means for it: a behaviour of the layer, seen in this run
            return Cell("observed", reason, trials=None, evidence=evidence)
        if by == "platform":
            return Cell("needs-platform", reason, evidence=evidence)
        return Cell("not-run", f"experiment not run: {reason}", evidence=evidence)
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    if record is not None:
        settled = f" (the layer was {record['settled']} after it)" if record.get("settled") else ""
        return Cell("failed", f"experiment {record['status']}: {_first_line(record['reason'])}{settled}", evidence=evidence)
    return Cell("not-run", NOT_RUN_LIFECYCLE, evidence=evidence)


def requests_text(stats: dict[str, Any]) -> str:
    text = f"{_share(stats['failed'], stats['requests'])} requests failed"
    if stats.get("errors"):
        text += " (" + ", ".join(f"{k} {v}" for k, v in stats["errors"].items()) + ")"
    if stats.get("p99_e2el_ms") is not None:
        text += f", p99 E2E {millis(stats['p99_e2el_ms'])}"
    return text


# --- the rows ----------------------------------------------------------------------------------------


def created_by_platform(run: RunData, layer: str) -> list[str] | None:
    """What the platform's controllers made of the layer at its last fresh start (None: never recorded)."""
    for d in reversed(run.deployments):
        if d["layer"] == layer and d["status"] == "ready" and not d.get("reused") and d.get("applied"):
            return list(d.get("created") or [])
    return None


def _what_you_write(run: RunData, layer: str, kind: str) -> Cell:
    found = manifests.recorded(run)
    if found is None:
        return Cell("not-run", "not recorded in this run: it was made before runs kept their manifests "
                    "(manifests/ in the run directory)", evidence="#manifests")  # fmt: skip
    mine = found[layer]
    if mine.authored is None:
        return Cell("failed", f"the layer's manifests: {_first_line(mine.error)}", evidence="#manifests")
    written = mine.authored
    text = (f"you write {written.objects} object{'s' if written.objects != 1 else ''} "
            f"({manifests.kind_counts(written.kinds)}): {written.lines} YAML lines, "
            f"{written.fields} fields")  # fmt: skip
    created = created_by_platform(run, layer)
    if created is not None:
        text += (f"; the platform created {len(created)} more ({manifests.kind_counts(created)})" if created
                 else "; the platform created nothing more")  # fmt: skip
    elif _on_cluster(run):
        gate = _deployment_gate(run, layer)
        text += f"; what the platform creates is unknown: {gate.text if gate else 'no fresh start recorded it'}"
    else:
        text += "; what a cluster creates from them needs platform: kubernetes"
    if written.assumed:
        text += f" ({written.assumed})"
    return Cell("measured", text, trials=1, evidence="#manifests")


def _revisions_text(run: RunData, layer: str) -> str:
    canary = experiment_outcome(run, layer, "canary").last
    if canary and canary.get("status_traffic"):
        entries = canary["status_traffic"]
        return (f"the controller's status tracked {len(entries)} revisions during the canary ("
                + ", ".join(f"{t.get('revisionName')} {t.get('percent')} %" for t in entries) + ")")
    update = experiment_outcome(run, layer, "model_update").last
    refused = experiment_outcome(run, layer, "canary").other
    if update and refused is not None and refused["status"] == "unsupported" and refused.get("refused_by") == "layer":
        return f"revisions: none listed in the layer's status; a change goes out as {update['how']}"
    return ""


def _lifecycle(run: RunData, layer: str, kind: str) -> Cell:
    ready = experiment_outcome(run, layer, "time_to_ready")
    parts: list[str] = []
    trials = None
    evidence = "#deployments"
    if ready.measured:
        values = [r["measurements"]["time_to_ready_s"] for r in ready.measured]
        trials, evidence = len(values), "#fig-lifecycle-ready"
        spread = f" ({seconds(min(values))[:-2]}–{seconds(max(values))}, {len(values)} starts)" if len(values) > 1 else ""
        label = "median " if len(values) > 1 else ""
        parts.append(f"ready from nothing: {label}{seconds(statistics.median(values))}{spread}")
    else:
        fresh = [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]
        if fresh:
            trials = len(fresh)
            label = "median " if len(fresh) > 1 else ""
            how = "apply → Ready" if _on_cluster(run) else "process start → /v1/models lists the model"
            parts.append(f"start to ready: {label}{seconds(statistics.median(fresh))} ({how})")
    update = experiment_outcome(run, layer, "model_update")
    if update.last:
        m = update.last
        args = ", ".join(f"{k}={v}" for k, v in (m.get("changed_args") or {}).items())
        served = m.get("change_to_served_s")
        parts.append(
            f"engine-argument change ({args}) served after {seconds(served)}, by {m['how']}" if served is not None
            else f"engine-argument change ({args}): the new revision was not seen answering ({m['how']})"
        )  # fmt: skip
        if evidence == "#deployments":
            evidence = "#fig-update-timeline"
    revisions = _revisions_text(run, layer)
    if revisions:
        parts.append(revisions)
    if parts:
        if not update.last:
            parts.append("model update: " + _why_not(run, layer, "model_update", update).text)
        return Cell("measured", "; ".join(parts), trials=trials, evidence=evidence)
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    if ready.other is not None:
        return _why_not(run, layer, "time_to_ready", ready)
    record = run.last_deployment(layer)
    earlier = record.get("time_to_ready_s")
    return Cell(
        "observed",
        f"reused a server started at {record['started_at']}"
        + (f" (ready then in {seconds(earlier)})" if earlier is not None else "")
        + "; no fresh start in this run",
        trials=0,
        evidence="#deployments",
    )


def _rollout(run: RunData, layer: str, kind: str) -> Cell:
    canary = experiment_outcome(run, layer, "canary")
    update = experiment_outcome(run, layer, "model_update")
    parts: list[str] = []
    trials, evidence, status, failed = None, "#lifecycle", None, False
    if canary.last:
        m, split = canary.last, canary.last["split"]
        level = round(100 * split.get("confidence", 0.95))
        parts.append(
            f"canary split: {split['requested_percent']:g} % requested, {split['observed_percent']:.1f} % observed "
            f"[{split['ci_low_percent']:.1f}, {split['ci_high_percent']:.1f}] ({level} % interval, "
            f"{split['answered']} answers) by {m['how']}; promote: {requests_text(m['promote']['during'])}; "
            f"rollback: {requests_text(m['rollback']['during'])}"
        )  # fmt: skip
        trials, evidence, status = split["answered"], "#fig-canary", "measured"
    else:
        why = _why_not(run, layer, "canary", canary)
        parts.append(("no traffic split: " if why.status == "observed" else "canary: ") + why.text)
        status = "observed" if why.status == "observed" else None
        failed = why.status == "failed"
    if update.last:
        m = update.last
        parts.append(f"model update ({m['how']}): {requests_text(m['during'])} during the change, longest gap "
                     f"without an answer {seconds(m['longest_gap_s'])}")  # fmt: skip
        if status != "measured":
            trials, evidence = m["during"]["requests"], "#fig-update-timeline"
        status = "measured"
    elif update.other is not None and _why_not(run, layer, "model_update", update).status == "failed":
        parts.append("model update: " + _why_not(run, layer, "model_update", update).text)
        failed = True
    if status is None:
        return _why_not(run, layer, "canary", canary)
    # The cell is as bad as its worst part: a failed experiment beside a measured one is not all green.
    return Cell(status, "; ".join(parts), trials=trials, evidence=evidence, partly_failed=failed)


def _scale_to_zero(run: RunData, layer: str, kind: str) -> Cell:
    outcome = experiment_outcome(run, layer, "scale_to_zero")
    if not outcome.last:
        return _why_not(run, layer, "scale_to_zero", outcome)
    m = outcome.last
    warm = m.get("warm_ttft_ms_p50")
    text = (f"{m['how']}: zero pods {seconds(m['time_to_zero_s'])} after the last request; first token from zero "
            f"after {seconds(m['cold_start_s'])}")  # fmt: skip
    if warm is not None:
        text += f" against a warm TTFT of {millis(warm)} (p50 of {m.get('warm_requests', '?')} requests)"
    return Cell("measured", text, trials=1, evidence="#fig-cold-start")


def published_urls(run: RunData, layer: str) -> list[str]:
    """Every status.url the layer published in this run: at its deploys and its fresh starts."""
    urls = [d["url"] for d in run.deployments if d["layer"] == layer and d.get("url")]
    starts = experiment_outcome(run, layer, "time_to_ready").measured
    urls += [r["measurements"]["url"] for r in starts if r["measurements"].get("url")]
    return urls


def _gateway_paths(run: RunData, layer: str) -> list[str]:
    vias = [s.get("via") or "" for s in run.smoke_of(layer)]
    for r in run.lifecycle_of(layer, "canary") + run.lifecycle_of(layer, "gateway_hop"):
        m = r.get("measurements") or {}
        vias += [m.get("via") or "", m.get("gateway_via") or ""]
    return sorted({v for v in vias if v.startswith("gateway")})


def _ingress(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    starts = len([d for d in run.deployments if d["layer"] == layer and d["status"] == "ready"])
    if not _on_cluster(run):
        urls = sorted({d["base_url"] for d in run.deployments if d["layer"] == layer and d.get("base_url")})
        return Cell(
            "observed",
            f"no route object: clients use the process address {urls[-1]}; its port is picked at each "
            f"start ({len(urls)} distinct address{'es' if len(urls) != 1 else ''} in this run)",
            trials=starts, evidence="#deployments",
        )  # fmt: skip
    parts = []
    urls = published_urls(run, layer)
    if urls:
        distinct = sorted(set(urls))
        if len(distinct) > 1:
            parts.append(f"status.url changed between starts: {', '.join(distinct)}")
        else:
            parts.append(f"stable URL {distinct[0]} (status.url)"
                         + (f", the same at all {len(urls)} starts" if len(urls) > 1 else ""))  # fmt: skip
    else:
        parts.append("no URL published (no status.url)")
    created = created_by_platform(run, layer) or []
    routes = [c for c in created if c.startswith("HTTPRoute/")]
    parts.append(f"routes the platform created: {', '.join(routes)}" if routes else "no HTTPRoute created")
    if not run.kind(kind).get("has_gateway"):
        record = run.last_deployment(layer) or {}
        services = [a for a in record.get("applied") or [] if a.startswith("Service/")]
        parts.append(f"clients reach your {', '.join(services) or 'Service'}; a gateway route is yours to write")
    paths = _gateway_paths(run, layer)
    if paths:
        parts.append(f"answered through the gateway ({paths[0].split(' ', 1)[-1]})")
    hop = experiment_outcome(run, layer, "gateway_hop").last
    if hop:
        o = hop["overhead_ttft_ms"]
        parts.append(f"the gateway adds {millis(o['median_difference'])} TTFT [{o['ci_low']:.2f}, {o['ci_high']:.2f}]")
    return Cell("observed", "; ".join(parts), trials=max(len(urls), starts), evidence="#deployments")


def _multi_model(run: RunData, layer: str, kind: str) -> Cell:
    others = run.params.get("compare_models") or {}
    if not others:
        return Cell("not-run", "the study names no further model to render beside its own (compare_models)",
                    evidence="#manifests")  # fmt: skip
    found = manifests.recorded(run)
    if found is None:
        return Cell("not-run", "not recorded in this run: it was made before runs kept their manifests",
                    evidence="#manifests")  # fmt: skip
    mine = found[layer]
    if mine.authored is None or mine.distance_errors:
        why = mine.error or "; ".join(mine.distance_errors)
        return Cell("failed", f"the manifests of a compared model: {_first_line(why)}", evidence="#manifests")
    parts = []
    for d in mine.distances:
        shape = f"{d.added_or_removed} added or removed" if d.added_or_removed else "same shape"
        fields = sorted({p.split(".", 1)[-1].rsplit(".", 1)[-1] for p in d.paths})
        parts.append(f"{run.params['model']['served_name']} → {d.served_name}: {d.changed_fields} of {d.total_fields} "
                     f"fields change ({shape}; in {', '.join(fields)}), {d.diff_lines} diff lines")  # fmt: skip
    text = "; ".join(parts) + "; every other field is the same"
    if mine.authored.assumed:
        text += f" ({mine.authored.assumed})"
    return Cell("measured", text, trials=len(mine.distances), evidence="#manifests")


def _cluster_checks(run: RunData) -> dict[str, Any] | None:
    for record in reversed(run.preflight):
        cluster = record.get("facts", {}).get("cluster")
        if cluster:
            return cluster
    return None


def requires(run: RunData, layer: str) -> dict[str, Any]:
    """What the preflight recorded that the layer relies on: CRDs, control-plane namespaces, controllers."""
    for record in reversed(run.preflight):
        for row in record.get("layers") or []:
            if row.get("layer") == layer:
                return row.get("requires") or {}
    return {}


def _control(run: RunData, layer: str, kind: str) -> Cell:
    if not _on_cluster(run):
        gate = _deployment_gate(run, layer)
        if gate:
            return gate
        record = run.last_deployment(layer)
        if record.get("processes"):
            return Cell("observed", f"no controller: the engine is {record['processes']} processes using "
                        f"{record['rss_mib']:.0f} MiB of memory when ready", trials=1, evidence="#deployments")  # fmt: skip
        return Cell("not-run", "the platform recorded no process inventory for this layer", evidence="#deployments")
    checks = _cluster_checks(run)
    if checks is None:
        return Cell("not-run", "no cluster inventory in this run's preflight (00_preflight)", evidence="#preflight")
    needs = requires(run, layer)
    namespaces = needs.get("control_plane_namespaces") or []
    plane = checks.get("control_plane", {})
    created = created_by_platform(run, layer)
    if not namespaces:
        text = "no controller of its own: nothing outside what you wrote"
        if created:
            text += f" and what Kubernetes made of it ({manifests.kind_counts(created)})"
        text += f"; it needs none of the {sum(p['pods'] for p in plane.values())} serving control-plane pods found"
        return Cell("observed", text, trials=1, evidence="#preflight")
    seen = {ns: plane[ns] for ns in namespaces if ns in plane}
    pods = sum(p["pods"] for p in seen.values())
    cpu = sum(p.get("cpu_cores", 0) for p in seen.values())
    memory = sum(p.get("memory_gib", 0) for p in seen.values())
    by_namespace = ", ".join(f"{ns} {p['pods']}" for ns, p in seen.items()) or "none found"
    text = f"control plane: {pods} pods ({by_namespace}) requesting {cpu:.2f} CPU cores and {memory:.2f} GiB"
    absent = [ns for ns in namespaces if ns not in plane]
    if absent:
        text += f"; no pods found in {', '.join(absent)}"
    crds = checks.get("crds", {})
    relied = [f"{label} ({', '.join(crds[n])})" for n, label in (needs.get("crds") or {}).items() if n in crds]
    if relied:
        text += f"; CRDs it relies on: {', '.join(relied)}"
    return Cell("observed", text, trials=1, evidence="#preflight")


def _prereqs(run: RunData, layer: str, kind: str) -> Cell:
    if not run.preflight:
        return Cell("not-deployed", "no preflight in this run", evidence="#preflight")
    latest = run.preflight[-1]
    support = {row["layer"]: row for row in latest["layers"]}.get(layer)
    if support is None:
        return Cell("not-deployed", "layer not in this run's preflight", evidence="#preflight")
    if not support["hostable"]:
        return Cell("needs-platform", support["reason"], evidence="#preflight")
    checks = latest["facts"].get("cluster")
    if not checks:
        engine = latest["facts"].get("engine", {})
        return Cell(
            "observed",
            f"found {engine.get('distribution', 'vllm')} {engine.get('version')} in the engine's Python; "
            "no cluster components needed on this platform",
            trials=1, evidence="#preflight",
        )  # fmt: skip
    needs = requires(run, layer)
    found = [f"Kubernetes {checks.get('kubernetes_version')}"]
    gpus = checks.get("gpus", {})
    need = run.params.get("platform", {}).get("gpus", 1)
    if need:
        found.append(f"{gpus.get('total', 0)} × {gpus.get('resource', 'GPU')} on {len(gpus.get('by_node', {}))} nodes")
    found += [f"{c['name']} {c.get('version') or '?'} ({c.get('ready', 0)} ready)" for c in needs.get("controllers") or []]
    found += [f"{fact} {value}" for fact, value in (needs.get("facts") or {}).items()]
    crds = checks.get("crds", {})
    wanted = needs.get("crds") or {}
    found += [f"{label} CRD ({', '.join(crds[n])})" for n, label in wanted.items() if n in crds]
    if needs.get("has_gateway") and checks.get("gateway_classes"):
        found.append(f"gateway class {', '.join(checks['gateway_classes'])}")
    missing = [label for n, label in wanted.items() if n not in crds]
    text = "found " + ", ".join(found)
    text += f"; missing: {', '.join(missing)}" if missing else "; nothing it needs is missing"
    return Cell("observed", text, trials=1, evidence="#preflight")


def _smoke(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    checks = run.smoke_of(layer)
    if not checks:
        return Cell("not-run", "smoke test not run on this layer (20_smoke)", evidence="#smoke")
    passed = [c for c in checks if c["passed"]]
    fingerprint = next((c["observed"] for c in checks if c["check"] == "fingerprint_names_engine"), None)
    status = "observed" if len(passed) == len(checks) else "failed"
    failed = [c["check"] for c in checks if not c["passed"]]
    text = f"{len(passed)}/{len(checks)} checks passed; system_fingerprint {fingerprint}"
    via = next((c.get("via") for c in checks if c.get("via")), None)
    if via:
        text += f"; through {via.split(' (', 1)[0] if via.startswith('port-forward') else via}"
    if failed:
        text += f"; failed: {', '.join(failed)}"
    return Cell(status, text, trials=len(checks), evidence="#smoke")


def _closed_stages(run: RunData, layer: str) -> list[dict]:
    stages = [s for s in run.latency_stages if s["layer"] == layer and s.get("mode") == "closed"]
    return sorted(stages, key=lambda s: s.get("max_concurrency") or 0)


def _finished_closed_stages(run: RunData, layer: str) -> list[dict]:
    return [s for s in _closed_stages(run, layer) if s["summary"].get("completed")]


def verdict(stage: dict[str, Any]) -> str:
    """A stage's validity verdict as recorded (``valid``, ``client-limited``, ``server-burst``,
    ``too-few-samples``, ``unchecked`` for an import)."""
    return (stage.get("validity") or {}).get("verdict", "unchecked")


def valid_stages(stages: list[dict]) -> list[dict]:
    """The stages whose numbers may feed a verdict: valid, measured here."""
    return [s for s in stages if verdict(s) == "valid" and s.get("provenance", "measured") != "imported"]


VERDICT_ORDER = ("valid", "too-few-samples", "unchecked", "server-burst", "client-limited")


def worst_verdict(stages: list[dict]) -> str | None:
    found = [verdict(s) for s in stages]
    return max(found, key=VERDICT_ORDER.index) if found else None


def provenance_of(stages: list[dict]) -> str:
    """synthetic, imported or measured: the least direct source among the stages a cell shows."""
    found = {s.get("provenance", "measured") for s in stages}
    return next((p for p in ("synthetic", "imported") if p in found), "measured")


def interval_text(stage: dict[str, Any], key: str, digits: int = 1) -> str:
    """A stage's recorded interval of a figure (``[8.1–9.9]``), or nothing when it has none."""
    found = intervals.recorded(stage, key)
    return f" [{found[0]:.{digits}f}–{found[1]:.{digits}f}]" if found else ""


def _no_latency(run: RunData, layer: str) -> Cell:
    """Why a layer has no latency figures: not running here, or the latency notebook did not run."""
    return _deployment_gate(run, layer) or Cell(
        "not-run", "no latency stage in this run (30_latency did not run)", evidence="#latency"
    )


def _ms_or_absent(summary: dict[str, Any], key: str) -> str:
    """A latency figure, or what says it is absent (vllm bench serve saves only the percentiles asked for)."""
    value = summary.get(key)
    return "n/a" if value is None else f"{value:.1f}"


def _percentiles(metric: str) -> Callable[[RunData, str, str], Cell]:
    def measure(run: RunData, layer: str, kind: str) -> Cell:
        stages = _finished_closed_stages(run, layer)
        if not stages:
            return _no_latency(run, layer)
        shown = [s for s in stages if s["summary"].get(f"median_{metric}_ms") is not None]
        parts = [
            f"c={s['max_concurrency']}: {_ms_or_absent(s['summary'], f'median_{metric}_ms')}"
            f"{interval_text(s, f'median_{metric}_ms')} / {_ms_or_absent(s['summary'], f'p95_{metric}_ms')}"
            f"{interval_text(s, f'p95_{metric}_ms')} ms" + ("" if verdict(s) == "valid" else f" ({verdict(s)})")
            for s in shown
        ]  # fmt: skip
        if not parts:  # an imported result that saved no such percentile
            return Cell("not-run", f"no {metric.upper()} percentiles in this run's stages", evidence="#latency")
        trials = sum(s["summary"]["completed"] for s in shown)
        return Cell("measured", "; ".join(parts), trials=trials, evidence="#latency", validity=worst_verdict(shown),
                    provenance=provenance_of(shown))  # fmt: skip

    return measure


P95_KEYS = {"ttft": "p95_ttft_ms", "tpot": "p95_tpot_ms", "e2e": "p95_e2el_ms"}


def latency_objectives(run: RunData) -> dict[str, float]:
    """The study's p95 latency objectives that are set: {"ttft": ms, ...}."""
    slos = run.params.get("slos", {})
    return {k: slos[f"{k}_ms_p95"] for k in P95_KEYS if slos.get(f"{k}_ms_p95")}


def meets_objectives(stage: dict[str, Any], limits: dict[str, float]) -> bool:
    return all((stage["summary"].get(P95_KEYS[k]) or float("inf")) <= v for k, v in limits.items())


def objectives_text(limits: dict[str, float]) -> str:
    return ", ".join(f"{k.upper()} p95 ≤ {v:g} ms" for k, v in limits.items())


def _left_out(stages: list[dict]) -> str:
    """The stages a verdict may not lean on, and why (not valid, or not measured here)."""
    out = [f"{s['stage']} ({verdict(s) if verdict(s) != 'valid' else s.get('provenance')})"
           for s in stages if s not in valid_stages(stages)]  # fmt: skip
    return f"; left out as not valid: {', '.join(out)}" if out else ""


def sweep_stages(run: RunData, layer: str) -> list[dict]:
    """The layer's finished stages of a saturation sweep (``sweep`` recorded), in the order they ran."""
    return [s for s in run.latency_stages
            if s["layer"] == layer and s.get("sweep") and s["summary"].get("completed")]  # fmt: skip


def load_stages(run: RunData, layer: str) -> list[dict]:
    """The stages "highest load within the SLOs" is judged from: the saturation sweep's when the layer had one
    (it went up to saturation), else the closed-loop concurrency stages."""
    return sweep_stages(run, layer) or _finished_closed_stages(run, layer)


def best_within(run: RunData, layer: str, limits: dict[str, float]) -> dict[str, Any] | None:
    """The stage that carried the most load while valid and within every p95 objective, or None: from the
    saturation sweep, the highest measured request rate; else the highest concurrency."""
    meeting = [s for s in valid_stages(load_stages(run, layer)) if meets_objectives(s, limits)]
    if meeting and meeting[0].get("sweep"):
        return max(meeting, key=lambda s: s["summary"]["request_throughput"])
    return meeting[-1] if meeting else None


def load_point(stage: dict[str, Any]) -> str:
    """How a load point is named in a sentence: ``concurrency 8``, or its place in a saturation sweep."""
    place = stage.get("sweep")
    if not place:
        return f"concurrency {stage['max_concurrency']}"
    if place.get("part") == "rate":
        return (f"the saturation sweep's rate {place.get('index')} of {place.get('count')} "
                f"({stage.get('request_rate') or 0:.3g} req/s requested)")  # fmt: skip
    return f"the saturation sweep's {place.get('part')} stage"


def _goodput(run: RunData, layer: str, kind: str) -> Cell:
    stages = load_stages(run, layer)
    if not stages:
        return _no_latency(run, layer)
    limits = latency_objectives(run)
    if not limits:
        return Cell("observed", "the study sets no p95 latency objectives (slos.*_ms_p95) to test the stages against",
                    trials=len(stages), evidence="#latency")  # fmt: skip
    valid = valid_stages(stages)
    objectives = objectives_text(limits)
    provenance = provenance_of(stages)
    if not valid:
        return Cell("not-run", f"no valid stage to judge against {objectives}{_left_out(stages)}", evidence="#latency",
                    validity=worst_verdict(stages), provenance=provenance)  # fmt: skip
    best = best_within(run, layer, limits)
    if best is None:
        tested = "stage of the saturation sweep" if stages[0].get("sweep") else "concurrency"
        return Cell("measured", f"no valid {tested} met {objectives}{_left_out(stages)}", trials=len(valid),
                    evidence="#latency", validity="valid", provenance=provenance)  # fmt: skip
    s = best["summary"]
    text = (f"{load_point(best)}: {s['request_throughput']:.2f}"
            f"{interval_text(best, 'request_throughput', 2)} req/s, {s['output_throughput']:.0f} output tok/s "
            f"within {objectives}")  # fmt: skip
    if s.get("request_goodput") is not None:
        text += f"; goodput {s['request_goodput']:.2f} req/s"
    return Cell("measured", text + _left_out(stages), trials=len(valid), evidence="#latency", validity="valid",
                provenance=provenance)  # fmt: skip


def _gateway(run: RunData, layer: str, kind: str) -> Cell:
    outcome = experiment_outcome(run, layer, "gateway_hop")
    if not outcome.last:
        return _why_not(run, layer, "gateway_hop", outcome, evidence="#lifecycle")
    m = outcome.last
    t, e = m["overhead_ttft_ms"], m["overhead_e2el_ms"]
    level = round(100 * t.get("confidence", 0.95))
    text = (f"TTFT {millis(t['median_difference'])} [{t['ci_low']:.2f}, {t['ci_high']:.2f}], E2E "
            f"{millis(e['median_difference'])} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]: median of {t['pairs']} "
            f"interleaved pairs, gateway minus direct, {level} % interval")  # fmt: skip
    if m.get("note"):
        text += f"; {m['note']}"
    return Cell("measured", text, trials=t["pairs"], evidence="#lifecycle")


def load_point_costs(run: RunData) -> list[dict[str, Any]]:
    """Cost per 1,000 requests at every valid latency stage, from the run's prices, replicas and throughput."""
    return cost.load_point_costs(run.params, run.deployments, valid_stages(run.latency_stages))


def best_cost_point(run: RunData, layer: str) -> tuple[dict[str, Any], bool] | None:
    """The layer's cheapest load point per 1,000 requests, among those meeting the p95 objectives when
    any does; with whether it meets them. None without a price or a priced stage."""
    rows = [r for r in load_point_costs(run) if r["layer"] == layer and r["cost_per_1k_requests"] is not None]
    if not rows:
        return None
    stages = {s["stage"]: s for s in run.latency_stages if s["layer"] == layer}
    limits = latency_objectives(run)
    meeting = [r for r in rows if r["stage"] in stages and meets_objectives(stages[r["stage"]], limits)]
    pool = meeting or rows
    return min(pool, key=lambda r: (r["cost_per_1k_requests"], r["stage"])), bool(meeting)


def replica_price(run: RunData) -> tuple[float, str] | None:
    """What one replica costs an hour under the study's prices, and the currency (None: no price applies)."""
    return cost.replica_price(run.params)


def idle_cost(run: RunData, layer: str) -> dict[str, Any] | None:
    return next((r for r in cost.idle_costs(run.params, run.deployments) if r["layer"] == layer), None)


def _money(value: float, currency: str) -> str:
    return f"{value:.4f} {currency}" if 0 < value < 1 else f"{value:,.2f} {currency}"


def _cost(run: RunData, layer: str, kind: str) -> Cell:
    costs = run.params.get("costs", {})
    if costs.get("gpu_hourly") is None and costs.get("replica_hourly") is None:
        return Cell("not-run", "the study sets no price (costs.gpu_hourly, or costs.replica_hourly for a CPU machine)",
                    evidence="#cost")  # fmt: skip
    idle = idle_cost(run, layer)
    idle_text = ""
    if idle and idle.get("idle_cost_per_month") is not None:
        idle_text = (f"idle: {idle['idle_replicas']} replica{'s' if idle['idle_replicas'] != 1 else ''} kept, "
                     f"{_money(idle['idle_cost_per_month'], idle['currency'])} a month")  # fmt: skip
    elif idle:
        idle_text = "no price applies to this platform's replicas (a CPU replica needs costs.replica_hourly)"
    best = best_cost_point(run, layer)
    stages = [s for s in run.latency_stages if s["layer"] == layer]
    if best is None:
        cell = (Cell("not-run", f"no valid stage to price{_left_out(stages)}", validity=worst_verdict(stages))
                if stages else _no_latency(run, layer))  # fmt: skip
        return Cell(cell.status, f"{cell.text}; {idle_text}" if idle_text else cell.text, evidence="#cost",
                    validity=cell.validity)  # fmt: skip
    point, within = best
    replicas = f"{point['replicas']} replica{'s' if point['replicas'] != 1 else ''}"
    limits = latency_objectives(run)
    where = (" within the SLOs" if within else " (no load point met the SLOs)") if limits else ""
    text = (f"{_money(point['cost_per_1k_requests'], point['currency'])} per 1,000 requests at {point['stage']}{where} "
            f"({point['request_throughput']:.2f} req/s on {replicas} "
            f"at {point['price_per_replica_hour']:g} {point['currency']}/h)")  # fmt: skip
    text += _left_out(stages)
    if idle_text:
        text += f"; {idle_text}"
    priced = len(valid_stages(stages))
    return Cell("measured", text, trials=priced, evidence="#cost", validity="valid", provenance=provenance_of(stages))


# --- routing with shared prefixes -------------------------------------------------------------------

ROUTING_NEEDS = ("two or more replicas of the layer and its own routing in the requests' path (platform.endpoint: "
                 "gateway, or the in-cluster load client)")  # fmt: skip


def routing_stages(run: RunData, layer: str) -> dict[str, dict[str, Any]]:
    """The layer's last routing stage of each workload (``shared-prefix``, ``no-prefix``) that completed any."""
    found: dict[str, dict[str, Any]] = {}
    for s in run.latency_stages:
        if s["layer"] == layer and s.get("mode") == "routing" and s["summary"].get("completed"):
            found[(s.get("routing") or {}).get("workload", "")] = s
    return found


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _pods_text(server: dict[str, Any]) -> str:
    """``pod-a 40 (hit rate 91.2 %), pod-b 24 (88.0 %)``: requests each pod finished and its hit rate."""
    per_pod = server.get("per_pod") or {}
    parts = []
    for pod, served in (server.get("requests_per_pod") or {}).items():
        rate = (per_pod.get(pod) or {}).get("prefix_cache_hit_rate")
        parts.append(f"{pod} {served if served is not None else '?'}" + (f" ({_percent(rate)} hits)" if rate is not None else ""))
    return ", ".join(parts) or "no pod's /metrics could be read"


def _ttft_text(stage: dict[str, Any]) -> str:
    value = stage["summary"].get("median_ttft_ms")
    return "–" if value is None else f"{millis(value)}{interval_text(stage, 'median_ttft_ms')}"


def _routing_measured(shared: dict[str, Any], unshared: dict[str, Any] | None) -> str:
    facts, server = shared["routing"], shared.get("server") or {}
    prefixes = facts["num_prefixes"]
    text = (f"{shared['summary']['completed']} requests, {prefixes} shared {facts['prefix_len']}-token "
            f"prefix{'es' if prefixes != 1 else ''} + {facts['input_len']} tokens each, c={shared['max_concurrency']}, "
            f"through {facts['routed_by']}: prefix-cache hit rate {_percent(server.get('prefix_cache_hit_rate'))}; "
            f"requests per pod: {_pods_text(server)}; TTFT p50 {_ttft_text(shared)}")  # fmt: skip
    if unshared is not None:
        other = unshared.get("server") or {}
        text += (f" against {_ttft_text(unshared)} without shared prefixes (hit rate "
                 f"{_percent(other.get('prefix_cache_hit_rate'))}; per pod: {_pods_text(other)})")  # fmt: skip
    else:
        text += "; the stage without shared prefixes did not complete"
    if server.get("preemptions_total"):
        text += f"; {server['preemptions_total']:.0f} preemptions"
    return text


def _routing(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate and gate.status != "needs-platform":
        return gate
    found = routing_stages(run, layer)
    shared, unshared = found.get("shared-prefix"), found.get("no-prefix")
    if not _on_cluster(run):
        text = f"routing between replicas needs platform: kubernetes, with {ROUTING_NEEDS}"
        if shared is not None:  # one process measured: its cache, not any routing
            text += (f"; on this one process, prefix-cache hit rate "
                     f"{_percent((shared.get('server') or {}).get('prefix_cache_hit_rate'))} with shared prefixes")  # fmt: skip
            if unshared is not None:
                text += f", {_percent((unshared.get('server') or {}).get('prefix_cache_hit_rate'))} without"
        return Cell("needs-platform", text, evidence="#latency")
    if gate:
        return gate
    if shared is None:
        why = ("the routing experiment did not run (30_latency runs it when the study sets workloads.routing)"
               if not found else "its shared-prefix stage did not complete")  # fmt: skip
        return Cell("not-run", why, evidence="#latency")
    facts = shared["routing"]
    if not facts.get("routed_by"):
        paths = facts.get("routing_paths") or {}
        needs = ("a path through it: " + "; ".join(f"{path}, {words}" for path, words in paths.items())
                 if paths else ROUTING_NEEDS)  # fmt: skip
        return Cell("not-run", f"the requests went through {facts['via']}, which bypasses the layer's routing: "
                    f"measuring it needs {needs}", evidence="#latency")  # fmt: skip
    shown = [s for s in (shared, unshared) if s is not None]
    text = _routing_measured(shared, unshared)
    if facts["pods"] < 2:
        text = (f"one pod served (the study runs {facts['replicas']} replica{'s' if facts['replicas'] != 1 else ''}): "
                f"no routing choice to make; {text}")  # fmt: skip
    return Cell("measured", text, trials=sum(s["summary"]["completed"] for s in shown), evidence="#latency",
                validity=worst_verdict(shown), provenance=provenance_of(shown))  # fmt: skip


ROWS: list[Row] = [
    Row("what_you_write", "What you write", _what_you_write),
    Row("model_lifecycle", "Model lifecycle", _lifecycle),
    Row("rollout_canary", "Rollout / canary", _rollout),
    Row("scale_to_zero", "Scale-to-zero", _scale_to_zero),
    Row("ingress_url", "Ingress / URL", _ingress),
    Row("multi_model", "Multi-model contract", _multi_model),
    Row("control", "Control / blast radius", _control),
    Row("prereqs", "Prereqs", _prereqs),
    Row("confirmed", "Confirmed behavior", _smoke),
    Row("ttft", "TTFT p50 / p95", _percentiles("ttft")),
    Row("tpot", "TPOT p50 / p95", _percentiles("tpot")),
    Row("e2e", "E2E p50 / p95", _percentiles("e2el")),
    Row("goodput", "Highest load within the SLOs", _goodput),
    Row("gateway", "Gateway overhead", _gateway),
    Row("routing", "Routing with shared prefixes", _routing),
    Row("cost", "Cost", _cost),
]
PERFORMANCE_ROWS = ("ttft", "tpot", "e2e", "goodput", "gateway", "cost")


@dataclass(frozen=True)
class Table:
    layers: list[tuple[str, str]]  # (layer name, kind), grouped by kind in the source page's order
    rows: list[tuple[Row, list[Cell]]]
    claims: dict[str, dict[str, str]] = field(default_factory=dict)  # by kind: the source page's claim per row
    columns: dict[str, str] = field(default_factory=dict)  # by kind: the source page's column it stands under

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(the source page's column, number of layers under it) for each column the study has, in order."""
        out: list[tuple[str, int]] = []
        for _, kind in self.layers:
            column = self.columns.get(kind, kind)
            if out and out[-1][0] == column:
                out[-1] = (column, out[-1][1] + 1)
            else:
                out.append((column, 1))
        return out

    def claim(self, row_key: str, kind: str) -> str | None:
        """The source page's claim for a row about a layer of this kind, as the run recorded it."""
        return self.claims.get(kind, {}).get(row_key)

    def cells(self) -> dict[str, dict[str, Cell]]:
        """{row key: {layer: cell}}."""
        names = [n for n, _ in self.layers]
        return {row.key: dict(zip(names, cells)) for row, cells in self.rows}


def _qualified(run: RunData, layer: str, cell: Cell) -> Cell:
    """A cell with a value whose row did not say where its numbers came from gets the least direct source
    among the layer's deployment, smoke and lifecycle records (a synthetic run's cells all say so)."""
    if not cell.has_value or cell.provenance != "measured":
        return cell
    found = [r for rows in (run.deployments, run.smoke, run.lifecycle, run.preflight) for r in rows
             if r.get("layer", layer) == layer]  # fmt: skip
    return dataclasses.replace(cell, provenance=provenance_of(found))


def decision_table(run: RunData) -> Table:
    """Every row of ROWS measured (or explained) for every layer of the run's study."""
    order = list(run.context.get("layer_kinds") or {})  # the kinds in the source page's order, as recorded
    layers = [(name, spec["kind"]) for name, spec in run.layers.items()]
    layers.sort(key=lambda nk: order.index(nk[1]) if nk[1] in order else len(order))  # stable
    rows = [(row, [_qualified(run, name, row.measure(run, name, kind)) for name, kind in layers]) for row in ROWS]
    claims = {kind: dict(run.kind(kind).get("claims") or {}) for _, kind in layers}
    columns = {kind: run.kind(kind).get("column", kind) for _, kind in layers}
    return Table(layers, rows, claims, columns)


def table_frame(table: Table):
    """The table as a pandas DataFrame (rows × layers, cell texts), for notebooks."""
    import pandas as pd

    data = {name: [cells[i].text for _, cells in table.rows] for i, (name, _) in enumerate(table.layers)}
    return pd.DataFrame(data, index=[row.title for row, _ in table.rows])


# --- what qualifies the numbers: validity, annotations, provenance ----------------------------------


def _stages_by_layer(stages: list[dict]) -> str:
    """``raw (c=4, c=8), kserve (c=8)``: stages named under their layers, in the run's order."""
    layers: dict[str, list[str]] = {}
    for s in stages:
        layers.setdefault(s["layer"], []).append(s["stage"])
    return ", ".join(f"{layer} ({', '.join(names)})" for layer, names in layers.items())


def _value_range(values: list[float], unit: str) -> str:
    low, high = min(values), max(values)
    number = (lambda v: f"{v:g}") if unit != "ms" else (lambda v: f"{v:.1f}")
    return f"{number(low)} {unit}" if low == high else f"{number(low)}–{number(high)} {unit}"


VERDICT_MEANING = {
    "client-limited": "the client's event loop woke late at p99 by {values} (limit {limit}), so their latencies "
                      "include the client's own delay",
    "server-burst": "{values} of their streams reached the client in one burst at the end, so TTFT and ITL describe "
                    "the server's delivery, not its generation",
    "too-few-samples": "{values} completed, fewer than a p95 needs ({limit})",
}  # fmt: skip


def validity_lines(run: RunData) -> list[str]:
    """One line per verdict other than valid: the stages (under their layers) that got it, the range of the
    numbers behind it, and that they feed no verdict of this report."""
    out = []
    stages = run.latency_stages
    for name in ("client-limited", "server-burst", "too-few-samples"):
        found = [s for s in stages if verdict(s) == name]
        if not found:
            continue
        reasons = [r for s in found for r in (s.get("validity") or {}).get("reasons", []) if r["verdict"] == name]
        unit = reasons[0]["unit"] if reasons else ""
        values = _value_range([r["value"] for r in reasons], unit) if reasons else "?"
        limits = sorted({r["limit"] for r in reasons})
        limit = f"{limits[0]:g} {unit}" if len(limits) == 1 else "per stage"
        stopped = [s for s in found if s.get("stopped_sweep")]
        line = (f"{name}: {_stages_by_layer(found)}: " + VERDICT_MEANING[name].format(values=values, limit=limit)
                + "; their numbers feed no verdict of this report")  # fmt: skip
        if stopped:
            line += f"; the sweep stopped after {_stages_by_layer(stopped)}"
        out.append(line)
    imported = [s for s in stages if verdict(s) == "unchecked"]
    if imported:
        out.append(f"unchecked: {_stages_by_layer(imported)} came from another tool, which records nothing of its "
                   "client's health; they are shown, and feed no verdict")  # fmt: skip
    return out


def annotation_lines(run: RunData) -> list[str]:
    """What qualifies valid numbers without making them invalid (token packing, a p99 from few requests):
    one line per kind of note, the stages named."""
    out = []
    stages = run.latency_stages
    packed = [s for s in stages if any(n["note"] == "token-packing" for n in (s.get("validity") or {}).get("annotations", []))]
    if packed:
        ratios = [n["value"] for s in packed for n in s["validity"]["annotations"] if n["note"] == "token-packing"]
        out.append(f"token packing: {_stages_by_layer(packed)}: chunks arrived {_value_range(ratios, '×')} further apart "
                   "than tokens were generated (ITL over TPOT): the server sent several tokens a chunk, so ITL "
                   "describes its delivery; TPOT its generation")  # fmt: skip
    few = [s for s in stages if any(n["note"] == "p99-few-samples" for n in (s.get("validity") or {}).get("annotations", []))]
    if few:
        out.append(f"p99 from fewer than 100 requests: {_stages_by_layer(few)}: read their p99s as rough")
    once = [s for s in stages if s.get("uncertainty") and (s.get("repeats") or 1) == 1]
    if once:
        out.append(f"measured once: {_stages_by_layer(once)}: their intervals cover the spread between requests, "
                   "not between runs (workloads.latency.repeats)")  # fmt: skip
    return out


def provenance_lines(run: RunData) -> list[str]:
    """What of the run was not measured by this run: synthetic records (made by a script) and imports (another
    tool's results), with where they are; empty when everything was."""
    out = []
    tables = {"latency stages": run.latency_stages, "latency requests": run.latency_requests,
              "deployments": run.deployments, "smoke checks": run.smoke, "preflight": run.preflight,
              "lifecycle trials": run.lifecycle, "lifecycle requests": run.lifecycle_requests}  # fmt: skip
    for label, meaning in (("synthetic", "made by a script, not measured"), ("imported", "imported from another tool's "
                                                                                       "result file")):  # fmt: skip
        found = [f"{name} ({len(hits)})" for name, rows in tables.items()
                 if (hits := [r for r in rows if r.get("provenance") == label])]  # fmt: skip
        if found:
            stages = [s for s in run.latency_stages if s.get("provenance") == label]
            where = f"; among them the latency stages of {_stages_by_layer(stages)}" if stages else ""
            out.append(f"{label.capitalize()} data: {', '.join(found)} {'are' if len(found) > 1 else 'is'} {meaning}"
                       f"{where}. Every cell they reach says “{label}”.")  # fmt: skip
    return out

