""""When to use which", derived from the run's measurements and the study's objectives.

Two views of the same numbers:

- per layer, a verdict: does what was measured meet the study's objectives (``slos``), what misses them
  and by how much, and what this run could not tell;
- per need a team may have (a rollout without failed requests, a traffic-split canary, scale to zero,
  a URL made for it, few moving parts, load within the latency objectives, cost), the layers that showed
  it in this run, with the numbers, and what the others did instead.

Nothing here is copied from the source page: a layer that did not measure something is not credited
with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import cost
from ..measure import intervals
from .rundata import RunData
from . import manifests
from .table import (
    Table,
    created_by_platform,
    experiment_outcome,
    published_urls,
    best_cost_point,
    best_within,
    load_point,
    load_stages,
    idle_cost,
    interval_text,
    requires,
    latency_objectives,
    meets_objectives,
    millis,
    objectives_text,
    replica_price,
    seconds,
)


@dataclass(frozen=True)
class Advice:
    layer: str
    verdict: str  # fits | fits so far | misses | unknown | broken
    reasons: list[str]


@dataclass(frozen=True)
class Recommendation:
    need: str  # what a team may need, in its words
    layers: list[str]  # the layers that showed it in this run (empty: none did)
    reading: str  # why, from this run's numbers
    evidence: str  # an anchor in the report


def _ready_times(run: RunData, layer: str) -> list[float]:
    trials = [r["measurements"]["time_to_ready_s"] for r in experiment_outcome(run, layer, "time_to_ready").measured]
    return trials or [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]


def _has_closed_stages(run: RunData, layer: str) -> bool:
    """Whether the layer has stages to judge its load by (closed-loop, or a saturation sweep's)."""
    return bool(load_stages(run, layer))


def _update_allowance(run: RunData) -> int | None:
    return run.params.get("slos", {}).get("update_failed_requests")


def _update_line(layer: str, m: dict[str, Any]) -> str:
    return (f"{layer}'s update ({m['how']}) failed {m['during']['failed']} of {m['during']['requests']} requests, "
            f"longest gap {seconds(m['longest_gap_s'])}")  # fmt: skip


def derive_advice(run: RunData, table: Table) -> list[Advice]:
    """One verdict per layer: does what was measured meet the study's objectives, and what is unknown."""
    slos = run.params.get("slos", {})
    cells = table.cells()
    limits = latency_objectives(run)
    advice = []
    for layer, kind in table.layers:
        reasons: list[str] = []
        verdict = "fits"

        def miss(reason: str) -> None:
            nonlocal verdict
            verdict = "misses" if verdict in ("fits", "fits so far") else verdict
            reasons.append(reason)

        deployment = run.last_deployment(layer)
        if deployment is None or deployment["status"] == "unsupported":
            why = deployment["reason"] if deployment else "not deployed in this run"
            advice.append(Advice(layer, "unknown", [f"no measurement on this run's platform ({why})"]))
            continue
        if deployment["status"] == "failed":
            advice.append(Advice(layer, "broken", ["it failed to deploy; see the deployments section"]))
            continue
        smoke = cells["confirmed"][layer]
        if smoke.status == "failed":
            verdict = "broken"
            reasons.append(f"it failed its smoke checks ({smoke.text})")

        ready = _ready_times(run, layer)
        objective = slos.get("time_to_ready_s")
        if ready and objective:
            worst = max(ready)
            if worst <= objective:
                reasons.append(f"ready in {seconds(worst)} at worst, within the time-to-ready objective of {objective:g} s")
            else:
                miss(f"ready in {seconds(worst)} at worst, over the time-to-ready objective of {objective:g} s")
        elif ready:
            reasons.append(f"ready in {seconds(max(ready))} at worst; the study sets no time-to-ready objective")

        cold = experiment_outcome(run, layer, "scale_to_zero").last
        objective = slos.get("cold_start_s")
        if cold and objective:
            if cold["cold_start_s"] <= objective:
                reasons.append(f"its first token from zero came after {seconds(cold['cold_start_s'])}, within the "
                               f"cold-start objective of {objective:g} s")  # fmt: skip
            else:
                price = replica_price(run)
                keep = (f"; one warm replica costs {price[0] * cost.HOURS_PER_MONTH:,.2f} {price[1]} a month"
                        if price else "")  # fmt: skip
                miss(f"scale-to-zero cold start {seconds(cold['cold_start_s'])} exceeds the cold-start objective of "
                     f"{objective:g} s: serve it with min_replicas ≥ 1{keep}")  # fmt: skip

        update = experiment_outcome(run, layer, "model_update").last
        allowed = _update_allowance(run)
        if update:
            failed = update["during"]["failed"]
            text = (f"a model update ({update['how']}) failed {failed} of {update['during']['requests']} requests, "
                    f"longest gap without an answer {seconds(update['longest_gap_s'])}")  # fmt: skip
            if allowed is not None and failed > allowed:
                miss(f"{text}: over the {allowed} the study allows (slos.update_failed_requests)")
            else:
                reasons.append(text + (f", within the {allowed} allowed" if allowed is not None else ""))

        if limits and _has_closed_stages(run, layer):
            best = best_within(run, layer, limits)
            if best is None:
                miss(f"no tested concurrency met {objectives_text(limits)}")
            else:
                s = best["summary"]
                reasons.append(f"up to {load_point(best)} ({s['request_throughput']:.2f} req/s) "
                               f"within {objectives_text(limits)}")  # fmt: skip

        canary = experiment_outcome(run, layer, "canary").last
        if canary:
            split = canary["split"]
            held = split.get("requested_within_ci")
            reasons.append(f"its canary split {'held' if held else 'missed'}: {split['observed_percent']:.1f} % observed "
                           f"for {split['requested_percent']:g} % requested over {split['answered']} answers")  # fmt: skip

        hop = experiment_outcome(run, layer, "gateway_hop").last
        if hop:
            overhead = hop["overhead_ttft_ms"]["median_difference"]
            share = f", {100 * overhead / limits['ttft']:.1f} % of the TTFT p95 objective" if limits.get("ttft") else ""
            reasons.append(f"its gateway adds {millis(overhead)} to TTFT{share}")

        best_cost = best_cost_point(run, layer)
        if best_cost:
            point, _ = best_cost
            reasons.append(f"{point['cost_per_1k_requests']:.4f} {point['currency']} per 1,000 requests at {point['stage']}")

        failed = [row.title for row, _ in table.rows if cells[row.key][layer].status == "failed" and row.key != "confirmed"]
        unmeasured = [row.title for row, _ in table.rows if cells[row.key][layer].status == "not-run"]
        if failed:
            reasons.append("failed in this run: " + ", ".join(failed))
        if unmeasured:
            reasons.append("not measured in this run: " + ", ".join(unmeasured))
        if (failed or unmeasured) and verdict == "fits":
            verdict = "fits so far"
        advice.append(Advice(layer, verdict, reasons))
    return advice


# --- needs → layers ------------------------------------------------------------------------------------


def _names(layers: list[str]) -> str:
    return ", ".join(layers) if layers else "none"


def _rollout_need(run: RunData, layers: list[str]) -> Recommendation | None:
    updates = {layer: m for layer in layers if (m := experiment_outcome(run, layer, "model_update").last)}
    if not updates:
        return None
    allowed = _update_allowance(run) or 0
    fitting = [layer for layer, m in updates.items() if m["during"]["failed"] <= allowed]
    def cost_of(layer: str) -> tuple[float, float]:
        during = updates[layer]["during"]
        return during["failed"] / max(1, during["requests"]), updates[layer]["longest_gap_s"]

    ranked = sorted(updates, key=cost_of)
    lines = [_update_line(layer, updates[layer]) for layer in ranked]
    bar = f"at most {allowed} failed requests" if allowed else "no failed request"
    rate = next(iter(updates.values())).get("steady_rate")
    load = f" under a steady {rate:g} req/s" if rate else ""
    if fitting:
        reading = f"{_names(fitting)} updated with {bar}{load}; " + "; ".join(lines)
    else:
        reading = f"no layer updated with {bar}{load}: " + "; ".join(lines) + f". The fewest failures were on {ranked[0]}"
    recreated = [layer for layer in updates if layer not in fitting and updates[layer].get("replaces_in_place")]
    if recreated:
        reading += (f"; {_names(recreated)} replaces its pods in place, so an update without downtime needs a second "
                    "replica (and a RollingUpdate) or a layer that starts the new revision before it stops the old")
    need = f"Model updates with at most {allowed} failed requests" if allowed else "Model updates without failed requests"
    return Recommendation(need, fitting, reading + ".", "#row-rollout_canary")


def _canary_need(run: RunData, layers: list[str]) -> Recommendation | None:
    found, refused, failed = {}, {}, {}
    for layer in layers:
        outcome = experiment_outcome(run, layer, "canary")
        if outcome.last:
            found[layer] = outcome.last["split"]
        elif outcome.other is not None and outcome.other["status"] == "unsupported":
            refused[layer] = outcome.other["reason"]
        elif outcome.other is not None:
            failed[layer] = outcome.other["status"]
    if not found and not refused:
        return None
    held = [layer for layer, split in found.items() if split.get("requested_within_ci")]
    parts = [f"{layer}: {s['observed_percent']:.1f} % observed for {s['requested_percent']:g} % requested "
             f"[{s['ci_low_percent']:.1f}, {s['ci_high_percent']:.1f}]" for layer, s in found.items()]  # fmt: skip
    parts += [f"{layer}: {reason.split(':', 1)[0]}" for layer, reason in refused.items()]
    parts += [f"{layer}: the canary {status} (see the warnings)" for layer, status in failed.items()]
    return Recommendation("A traffic-split canary", held, "; ".join(parts) + ".", "#row-rollout_canary")


def _scale_need(run: RunData, layers: list[str]) -> Recommendation | None:
    objective = run.params.get("slos", {}).get("cold_start_s")
    measured = {layer: m for layer in layers if (m := experiment_outcome(run, layer, "scale_to_zero").last)}
    if not measured:
        return None
    on_demand = [layer for layer, m in measured.items() if not m["how"].startswith("by hand")
                 and (objective is None or m["cold_start_s"] <= objective)]  # fmt: skip
    parts = []
    for layer, m in measured.items():
        text = f"{layer}: first token from zero after {seconds(m['cold_start_s'])}"
        if m["how"].startswith("by hand"):
            text += " (scaled by hand, nothing wakes it on a request)"
        if objective is not None and m["cold_start_s"] > objective:
            text += f", over the {objective:g} s objective"
        idle = idle_cost(run, layer)
        if idle and idle.get("idle_cost_per_month") is not None:
            text += f"; idle {idle['idle_cost_per_month']:,.2f} {idle['currency']} a month as configured"
        parts.append(text)
    need = "Scale to zero when idle, woken by a request"
    return Recommendation(need, on_demand, "; ".join(parts) + ".", "#row-scale_to_zero")


def _url_need(run: RunData, layers: list[str]) -> Recommendation | None:
    if run.params.get("platform", {}).get("kind") != "kubernetes":
        return None
    parts, fitting = [], []
    for layer in layers:
        if run.last_deployment(layer) is None or run.last_deployment(layer)["status"] != "ready":
            continue
        urls = sorted(set(published_urls(run, layer)))
        routes = [c for c in created_by_platform(run, layer) or [] if c.startswith("HTTPRoute/")]
        if len(urls) == 1:
            fitting.append(layer)
            parts.append(f"{layer}: {urls[0]}" + (f" with {', '.join(routes)}" if routes else ""))
        elif urls:
            parts.append(f"{layer}: its URL changed between starts")
        else:
            parts.append(f"{layer}: no URL published, you route to its Service")
    if not parts:
        return None
    return Recommendation("A stable URL made for each model", fitting, "; ".join(parts) + ".", "#row-ingress_url")


def _moving_parts_need(run: RunData, layers: list[str]) -> Recommendation | None:
    checks = next((r["facts"]["cluster"] for r in reversed(run.preflight) if r.get("facts", {}).get("cluster")), None)
    if checks is None:
        return None
    plane = checks.get("control_plane", {})
    counts = {}
    for layer in layers:
        namespaces = requires(run, layer).get("control_plane_namespaces") or []
        counts[layer] = sum(plane[ns]["pods"] for ns in namespaces if ns in plane)
    fewest = min(counts.values())
    parts = [f"{layer}: {n} control-plane pods" for layer, n in counts.items()]
    return Recommendation("The fewest moving parts to run and upgrade", [l for l, n in counts.items() if n == fewest],
                          "; ".join(parts) + ".", "#row-control")  # fmt: skip


def _ties(values: dict[str, float], bounds: dict[str, list[float] | None], higher_is_better: bool,
          unit: str) -> tuple[list[str], str]:  # fmt: skip
    """The layers not told apart from the best (their recorded 95 % intervals overlap the best's), and a
    sentence saying, for each other layer, by how much it trails beyond the noise. A layer without an
    interval ties only on an equal value."""
    if not values:
        return [], ""
    best = min(values, key=lambda l: (-values[l] if higher_is_better else values[l], l))
    tied, apart = [], []
    for layer, value in values.items():
        same = layer == best or value == values[best] or bool(intervals.overlap(bounds.get(layer), bounds.get(best)))
        if same:
            tied.append(layer)
        else:
            gap = abs(values[best] - value)
            known = bounds.get(layer) and bounds.get(best)
            apart.append(f"{layer} trails {best} by {gap:.4g} {unit}" + ("" if known else " (no interval recorded)"))
    noise = ""
    if len(tied) > 1:
        noise += f" {' and '.join(tied)} are within each other's 95 % intervals."
    if apart:
        noise += " Beyond the noise: " + "; ".join(apart) + "."
    return tied, noise


def _load_need(run: RunData, layers: list[str]) -> Recommendation | None:
    limits = latency_objectives(run)
    tested = [layer for layer in layers if _has_closed_stages(run, layer)]
    if not limits or not tested:
        return None
    best = {layer: best_within(run, layer, limits) for layer in tested}
    throughput = {layer: s["summary"]["request_throughput"] for layer, s in best.items() if s}
    parts = [f"{layer}: {throughput[layer]:.2f}{interval_text(best[layer], 'request_throughput', 2)} req/s at "
             f"{load_point(best[layer])}" if layer in throughput
             else f"{layer}: no tested load met them" for layer in tested]  # fmt: skip
    bounds = {layer: intervals.recorded(s, "request_throughput") for layer, s in best.items() if s}
    fitting, noise = _ties(throughput, bounds, higher_is_better=True, unit="req/s")
    return Recommendation(f"The most load within {objectives_text(limits)}", fitting, "; ".join(parts) + "." + noise,
                          "#row-goodput")  # fmt: skip


def _cost_need(run: RunData, layers: list[str]) -> Recommendation | None:
    points = {layer: p for layer in layers if (p := best_cost_point(run, layer))}
    if not points:
        return None
    parts = [f"{layer}: {p['cost_per_1k_requests']:.4f} {p['currency']} per 1,000 requests at {p['stage']}"
             + ("" if within else " (outside the objectives)") for layer, (p, within) in points.items()]  # fmt: skip
    values = {layer: p["cost_per_1k_requests"] for layer, (p, _) in points.items()}
    bounds = {layer: p.get("cost_interval") for layer, (p, _) in points.items()}
    fitting, noise = _ties(values, bounds, higher_is_better=False, unit=next(iter(points.values()))[0]["currency"])
    return Recommendation("The lowest cost per request", fitting, "; ".join(parts) + "." + noise, "#row-cost")


def _manifest_need(run: RunData, table: Table, layers: list[str]) -> Recommendation | None:
    found = manifests.recorded(run)
    if not found or any(found[layer].authored is None for layer in layers):
        return None  # the table's cells say why the manifests are not there
    written = {layer: found[layer].authored.fields for layer in layers}  # type: ignore[union-attr]
    changes = {layer: sum(d.changed_fields for d in found[layer].distances) for layer in layers}
    fewest = min(written.values())
    compared = bool(run.params.get("compare_models"))
    parts = [f"{layer}: {written[layer]} fields" + (f", {changes[layer]} changed for another model" if compared else "")
             for layer in layers]  # fmt: skip
    return Recommendation("The least to write and review per model", [l for l in layers if written[l] == fewest],
                          "; ".join(parts) + ".", "#row-what_you_write")  # fmt: skip


def derive_recommendations(run: RunData, table: Table) -> list[Recommendation]:
    """Per need, the layers that showed it in this run (only needs this run measured something for)."""
    layers = [name for name, _ in table.layers]
    running = [l for l in layers if (d := run.last_deployment(l)) is not None and d["status"] == "ready"]
    makers = [_rollout_need(run, layers), _canary_need(run, layers), _scale_need(run, layers), _url_need(run, layers),
              _moving_parts_need(run, layers), _load_need(run, running), _cost_need(run, running),
              _manifest_need(run, table, layers)]  # fmt: skip
    return [r for r in makers if r is not None]

