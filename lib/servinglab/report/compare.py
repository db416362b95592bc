"""Several runs side by side: what they ran on, and how their measurements changed.

``servinglab report RUN_DIR RUN_DIR [...]`` renders one self-contained HTML page from the run
directories alone. The first run given is the baseline: every other run's value is shown with its change
from the baseline, absolute and in percent, coloured by whether it is better or worse (lower latency,
higher throughput). The page has

- one header column per run (study, run id, dates, platform, accelerator, engine and fingerprint, model,
  server arguments, request shape, load pattern, git SHA), the rows that differ between runs marked;
- per layer and load point (latency stage) the headline metrics: TTFT, TPOT and E2E p50 and p95,
  requests/s, output tokens/s and goodput;
- per layer the lifecycle headlines where a run measured them: time to ready, model update, cold start,
  canary split, gateway overhead;
- a figure of latency against throughput with one line per run and layer.

Runs of different studies can be compared; the page says so first, since their layers and workloads may
not match. The same run directories render the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2

from .. import __version__
from ..errors import RunDirError
from . import (load_pattern, request_shape, write_if_changed, reports_folder, file_in, template_environment,
               write_index)
from .rundata import RunData, load_run
from ..measure import intervals
from .runfacts import accelerator, engine_command_args
from .table import verdict

# The seed of every bootstrap this page runs: the same run directories give the same page.
COMPARE_SEED = 20261201
# The latency figures whose difference is bootstrapped from the two stages' request records.
BOOTSTRAPPED = {f"{stat}_{metric}_ms": (metric, stat) for metric in ("ttft", "tpot", "e2el") for stat in ("median", "p95")}
# File names stay short enough for every file system and a readable index.
MAX_NAME_CHARS = 120
RUN_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
LAYER_MARKERS = ["o", "s", "^", "D", "v", "P"]


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    digits: int
    lower_is_better: bool | None  # None: neither direction is better (a canary split)


LATENCY_METRICS = [
    Metric("median_ttft_ms", "TTFT p50", "ms", 1, True),
    Metric("p95_ttft_ms", "TTFT p95", "ms", 1, True),
    Metric("median_tpot_ms", "TPOT p50", "ms", 2, True),
    Metric("p95_tpot_ms", "TPOT p95", "ms", 2, True),
    Metric("median_e2el_ms", "E2E p50", "ms", 1, True),
    Metric("p95_e2el_ms", "E2E p95", "ms", 1, True),
    Metric("request_throughput", "Throughput", "req/s", 2, False),
    Metric("output_throughput", "Output throughput", "tok/s", 0, False),
    Metric("request_goodput", "Goodput", "req/s", 2, False),
]

LIFECYCLE_METRICS = [
    Metric("time_to_ready_s", "Time to ready", "s", 1, True),
    Metric("change_to_served_s", "Model update: change to new revision served", "s", 1, True),
    Metric("cold_start_s", "Cold start: zero replicas to first token", "s", 1, True),
    Metric("canary_observed_percent", "Canary split: share to the new revision", "%", 1, None),
    Metric("gateway_overhead_ms", "Gateway overhead on TTFT (median difference)", "ms", 2, True),
]


@dataclass(frozen=True)
class Value:
    """One run's value of a metric, with its change from the baseline run (None for the baseline)."""

    text: str
    change: str = ""
    verdict: str = ""  # better, worse, same, or "" (baseline, missing, no direction)
    note: str = ""


@dataclass
class MetricRow:
    group: str  # the load point or the lifecycle experiment's layer
    metric: Metric
    values: list[Value]
    span: int = 1  # rows of the group this row heads (0: not the group's first row)


@dataclass
class ContextRow:
    title: str
    values: list[str]
    differs: bool


@dataclass
class Comparison:
    runs: list[RunData]
    context: list[ContextRow]
    notes: list[str]
    latency: dict[str, list[MetricRow]] = field(default_factory=dict)  # by layer, in first-seen order
    lifecycle: dict[str, list[MetricRow]] = field(default_factory=dict)
    figure: str | None = None
    figure_reading: str = ""


# --- loading ---------------------------------------------------------------------------------------


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> list[RunData]:
    """Every run directory read; raises RunDirError naming the path that is not one."""
    if len(run_dirs) < 2:
        raise RunDirError(
            f"a comparison needs two or more run directories; got {len(run_dirs)}"
            + (f" ({run_dirs[0]})" if run_dirs else "")
        )
    runs, seen = [], {}
    for given in run_dirs:
        path = Path(given)
        if not path.exists():
            raise RunDirError(f"{given}: no such directory")
        if not path.is_dir():
            raise RunDirError(f"{given}: not a directory; give a run directory (runs/<study>/<run-id>)")
        resolved = path.resolve()
        if resolved in seen:
            raise RunDirError(f"{given}: the same run directory as {seen[resolved]}; give each run once")
        seen[resolved] = given
        runs.append(load_run(path))
    return runs


# --- the numbers -----------------------------------------------------------------------------------


def _format(value: float | None, metric: Metric) -> str:
    if value is None:
        return "–"
    return f"{value:.{metric.digits}f} {metric.unit}"


@dataclass(frozen=True)
class Noise:
    """What tells a change from run-to-run noise: the 95 % interval of the difference (bootstrapped from both
    runs' request records), or whether the two runs' recorded intervals overlap."""

    exceeds: bool
    interval: list[float] | None = None  # of the difference, when bootstrapped
    how: str = "bootstrap"  # or "intervals" (the recorded intervals of both values, compared)


def change_text(base: float | None, value: float | None, metric: Metric, noise: Noise | None = None,
                judged: bool = True) -> tuple[str, str]:  # fmt: skip
    """The change from ``base`` to ``value`` as text ("+1.0 ms (+10.0 %) [+0.4, +1.6]") and its verdict:
    ``better`` or ``worse`` only when the change exceeds the noise, ``same`` within it, "" when the noise is
    unknown, the change has no direction, or ``judged`` is false (a stage that was not valid)."""
    if base is None or value is None:
        return "", ""
    delta = value - base
    sign = "+" if delta >= 0 else "−"
    if metric.unit == "%":  # a share: its change is in percentage points, a relative change would mislead
        text = f"{sign}{abs(delta):.{metric.digits}f} pp"
    else:
        text = f"{sign}{abs(delta):.{metric.digits}f} {metric.unit}"
        if base != 0:
            percent = 100.0 * delta / abs(base)
            text += f" ({'+' if percent >= 0 else '−'}{abs(percent):.1f} %)"
    if noise is None:
        return text + "; noise unknown", ""
    if noise.interval is not None:
        low, high = noise.interval
        text += f" [{low:+.{metric.digits}f}, {high:+.{metric.digits}f}]"
    if not noise.exceeds:
        return text + ("; within the noise" if noise.how == "bootstrap" else "; intervals overlap"), "same" if judged else ""
    if not judged or metric.lower_is_better is None:
        return text + "; beyond the noise", ""
    return text + "; beyond the noise", "better" if (delta < 0) == metric.lower_is_better else "worse"


def _values(numbers: list[float | None], metric: Metric, notes: list[str] | None = None,
            noises: list[Noise | None] | None = None, judged: list[bool] | None = None) -> list[Value]:  # fmt: skip
    """Each run's value with its change from the first run's (the baseline), judged against the noise."""
    out = []
    count = len(numbers)
    for i, (number, note) in enumerate(zip(numbers, notes or [""] * count)):
        if number is None:
            out.append(Value("–", note="not measured"))
            continue
        noise = (noises or [None] * count)[i]
        fair = (judged or [True] * count)[i] and (judged or [True] * count)[0]
        text, verdict = change_text(numbers[0], number, metric, noise, fair) if i else ("", "")
        out.append(Value(_format(number, metric), text, verdict, note))
    return out


def _overlap_noise(a: list[float] | None, b: list[float] | None) -> Noise | None:
    together = intervals.overlap(a, b)
    return None if together is None else Noise(exceeds=not together, how="intervals")


def _scaled(stage: dict[str, Any], key: str) -> list[float] | None:
    """A stage's interval of a throughput: recorded, or (output tokens/s) its request throughput's, scaled."""
    found = intervals.recorded(stage, key)
    if found or key != "output_throughput":
        return found
    base, rps = intervals.recorded(stage, "request_throughput"), stage["summary"].get("request_throughput")
    value = stage["summary"].get(key)
    return [base[0] * value / rps, base[1] * value / rps] if base and rps and value is not None else None


def stage_repeats(run: RunData, stage: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """A stage's completed requests as its repeats measured them (empty when its records cannot be told)."""
    found = next((requests for s, requests in run.stage_requests() if s is stage), None)
    by_repeat: dict[int, list[dict[str, Any]]] = {}
    for r in found or []:
        if r.get("ok") and not r.get("warmup"):
            by_repeat.setdefault(r.get("repeat") or 0, []).append(r)
    return [by_repeat[k] for k in sorted(by_repeat)]


def _stage_noises(runs: list[RunData], stages: list[dict[str, Any] | None]) -> dict[str, list[Noise | None]]:
    """Per latency metric, each run's noise against the baseline's stage (None: the baseline, or unknown)."""
    out: dict[str, list[Noise | None]] = {m.key: [None] * len(runs) for m in LATENCY_METRICS}
    base = stages[0]
    if base is None:
        return out
    base_repeats = stage_repeats(runs[0], base)
    for i in range(1, len(runs)):
        stage = stages[i]
        if stage is None:
            continue
        repeats = stage_repeats(runs[i], stage)
        found = (intervals.differences(base_repeats, repeats, list(BOOTSTRAPPED.values()), COMPARE_SEED)
                 if base_repeats and repeats else {})  # fmt: skip
        for metric in LATENCY_METRICS:
            diff = found.get(BOOTSTRAPPED[metric.key]) if metric.key in BOOTSTRAPPED else None
            if diff is not None:
                out[metric.key][i] = Noise(diff["exceeds_noise"], diff["interval"])
            else:
                out[metric.key][i] = _overlap_noise(_scaled(base, metric.key), _scaled(stage, metric.key))
    return out


def _stage_order(stage: dict[str, Any]) -> tuple:
    mode = stage.get("mode")
    if mode == "closed":
        return (0, stage.get("max_concurrency") or 0, stage["stage"])
    if mode == "open":
        return (1, float(stage.get("request_rate") or 0), stage["stage"])
    return (2, 0, stage["stage"])


def _load_label(stage: dict[str, Any]) -> str:
    """The load point's name; results another tool measured (an import) keep their own rows."""
    source = stage.get("source") or "servinglab"
    return stage["stage"] if source == "servinglab" else f"{stage['stage']} ({source})"


def _stages_by_key(run: RunData) -> dict[tuple[str, str], dict[str, Any]]:
    """The stage to compare for each (layer, load point): the last one with completed requests."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for stage in run.latency_stages:
        key = (stage["layer"], _load_label(stage))
        if stage["summary"].get("completed") or key not in out:
            out[key] = stage
    return out


def _latency_rows(runs: list[RunData], notes: list[str]) -> dict[str, list[MetricRow]]:
    per_run = [_stages_by_key(run) for run in runs]
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for stages in per_run:
        for key, stage in stages.items():
            keys.setdefault(key, stage)
    layers: list[str] = []
    for layer, _ in keys:
        if layer not in layers:
            layers.append(layer)
    out: dict[str, list[MetricRow]] = {}
    for layer in layers:
        points = sorted((k for k in keys if k[0] == layer), key=lambda k: (_stage_order(keys[k]), k[1]))
        rows: list[MetricRow] = []
        for key in points:
            first = len(rows)
            stages = [stages.get(key) for stages in per_run]
            absent = [runs[i].run_id for i, s in enumerate(stages) if s is None]
            empty = [runs[i].run_id for i, s in enumerate(stages) if s is not None and not s["summary"].get("completed")]
            if absent:
                notes.append(f"layer {layer} at {key[1]} was not measured in run {', '.join(absent)}")
            if empty:
                notes.append(f"layer {layer} at {key[1]} completed no request in run {', '.join(empty)}")
            warned, judged = [], []
            for run, s in zip(runs, stages):
                # A stage that was not valid feeds no verdict; what its run warned of is said above the table.
                for warning in (s or {}).get("summary", {}).get("warnings", []) if s else []:
                    notes.append(f"run {run.run_id}, layer {layer} at {key[1]}: {warning}")
                state = verdict(s) if s else "valid"
                if state != "valid":
                    reasons = "; ".join(r["text"] for r in (s.get("validity") or {}).get("reasons", []))  # type: ignore[union-attr]
                    notes.append(f"run {run.run_id}, layer {layer} at {key[1]}: {state}" + (f": {reasons}" if reasons else ""))
                judged.append(state == "valid")
                warned.append(f"{state}: no verdict" if state != "valid" else
                              ("the stage warned: see above" if s and s["summary"].get("warnings") else ""))  # fmt: skip
            noises = _stage_noises(runs, stages)
            for metric in LATENCY_METRICS:
                numbers = [(s["summary"].get(metric.key) if s and s["summary"].get("completed") else None) for s in stages]
                if all(n is None for n in numbers):
                    continue
                rows.append(MetricRow(key[1], metric, _values(numbers, metric, warned, noises[metric.key], judged),
                                      span=0))  # fmt: skip
            if len(rows) > first:
                rows[first].span = len(rows) - first
        if rows:
            out[layer] = rows
    return out


@dataclass(frozen=True)
class Headline:
    value: float
    note: str = ""
    interval: list[float] | None = None  # its 95 % interval, where the run recorded or allows one


def _median_interval(values: list[float]) -> list[float] | None:
    """A seeded bootstrap interval of the median of a few trials (three or more), else None."""
    if len(values) < 3:
        return None
    import numpy as np

    rng = np.random.default_rng(COMPARE_SEED)
    draws = np.median(np.asarray(values)[rng.integers(0, len(values), size=(intervals.RESAMPLES, len(values)))], axis=1)
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def lifecycle_headlines(run: RunData, layer: str) -> dict[str, Headline]:
    """A layer's lifecycle headline numbers in a run, each with a note on where it comes from and its interval."""
    measured = [r for r in run.lifecycle if r["layer"] == layer and r["status"] == "measured"]

    def of(experiment: str) -> list[dict[str, Any]]:
        return [r["measurements"] for r in measured if r["experiment"] == experiment]

    out: dict[str, Headline] = {}
    ready = [m["time_to_ready_s"] for m in of("time_to_ready") if m.get("time_to_ready_s") is not None]
    if ready:
        out["time_to_ready_s"] = Headline(statistics.median(ready), f"median of {len(ready)} starts" if len(ready) > 1
                                          else "", _median_interval(ready))  # fmt: skip
    else:
        fresh = [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]
        if fresh:
            label = f"median of {len(fresh)} deploys" if len(fresh) > 1 else "at deploy"
            out["time_to_ready_s"] = Headline(statistics.median(fresh), label, _median_interval(fresh))
    served = [m["change_to_served_s"] for m in of("model_update") if m.get("change_to_served_s") is not None]
    if served:
        out["change_to_served_s"] = Headline(served[-1])
    cold = [m for m in of("scale_to_zero") if m.get("cold_start_s") is not None]
    if cold:
        out["cold_start_s"] = Headline(cold[-1]["cold_start_s"], cold[-1].get("how") or "")
    canary = [m["split"] for m in of("canary") if m.get("split")]
    if canary:
        split = canary[-1]
        out["canary_observed_percent"] = Headline(
            split["observed_percent"],
            f"{split['requested_percent']:g} % requested, "
            f"interval {split['ci_low_percent']:.1f}–{split['ci_high_percent']:.1f}",
            [split["ci_low_percent"], split["ci_high_percent"]],
        )
    hop = [m["overhead_ttft_ms"] for m in of("gateway_hop") if m.get("overhead_ttft_ms")]
    if hop:
        o = hop[-1]
        out["gateway_overhead_ms"] = Headline(o["median_difference"], f"interval {o['ci_low']:.2f}–{o['ci_high']:.2f} ms",
                                              [o["ci_low"], o["ci_high"]])  # fmt: skip
    return out


def _lifecycle_rows(runs: list[RunData]) -> dict[str, list[MetricRow]]:
    layers: list[str] = []
    for run in runs:
        for layer in [*run.layers, *(r["layer"] for r in run.lifecycle), *(d["layer"] for d in run.deployments)]:
            if layer not in layers:
                layers.append(layer)
    out: dict[str, list[MetricRow]] = {}
    for layer in layers:
        headlines = [lifecycle_headlines(run, layer) for run in runs]
        rows = []
        for metric in LIFECYCLE_METRICS:
            found = [h.get(metric.key) for h in headlines]
            if all(f is None for f in found):
                continue
            numbers = [f.value if f else None for f in found]
            base = found[0].interval if found[0] else None
            noises = [None] + [_overlap_noise(base, f.interval if f else None) for f in found[1:]]
            rows.append(MetricRow(layer, metric, _values(numbers, metric, [f.note if f else "" for f in found], noises)))
        if rows:
            out[layer] = rows
    return out


# --- the header ------------------------------------------------------------------------------------


def _context_rows(runs: list[RunData]) -> list[ContextRow]:
    def engine(run: RunData) -> str:
        e = run.context.get("engine", {})
        name = e.get("distribution") or e.get("name") or "vllm"
        text = f"{name} {e.get('version') or '?'}"
        return text + (f" (image {e['image']})" if e.get("image") else "")

    def model(run: RunData) -> str:
        m = run.context.get("model", {}) or {}
        p = run.params.get("model", {})
        text = f"{m.get('name') or p.get('name') or '?'} served as {m.get('served_name') or p.get('served_name') or '?'}"
        if m.get("load_format") == "dummy":
            text += " (dummy weights)"
        return text

    def platform(run: RunData) -> str:
        return run.context.get("platform", {}).get("name") or run.params.get("platform", {}).get("kind") or "?"

    def git(run: RunData) -> str:
        g = run.context.get("git", {})
        return (g.get("sha") or "unknown")[:12] + (" (uncommitted changes)" if g.get("dirty") else "")

    def when(run: RunData) -> str:
        return f"{run.context.get('started_at') or '?'} → {run.context.get('ended_at') or 'not finished'}"

    fields = [
        ("Study", lambda r: r.study),
        ("When", when),
        ("Status", lambda r: r.context.get("status") or "?"),
        ("Platform", platform),
        ("Cluster / GPU or CPU", lambda r: accelerator(r)["text"]),
        ("Engine", engine),
        ("Fingerprint", lambda r: r.context.get("engine", {}).get("system_fingerprint") or "not seen"),
        ("Model", model),
        ("Server args", lambda r: " ".join(engine_command_args(r)) or "none recorded"),
        ("Layers", lambda r: ", ".join(f"{n} ({r.kind_of_layer(n)['title']})" for n in r.layers)),
        ("Request shape", request_shape),
        ("Load pattern", load_pattern),
        ("Code", lambda r: f"git {git(r)} · servinglab {r.context.get('servinglab_version') or '?'}"),
    ]
    # Identity fields differ by nature; marking them would hide the differences that matter.
    never_marked = {"When", "Status"}
    rows = []
    for title, get in fields:
        values = [get(run) for run in runs]
        rows.append(ContextRow(title, values, title not in never_marked and len(set(values)) > 1))
    return rows


def _notes(runs: list[RunData], context: list[ContextRow]) -> list[str]:
    notes = []
    studies = sorted({r.study for r in runs})
    if len(studies) > 1:
        notes.append(f"These runs come from different studies ({', '.join(studies)}): their layers, model and "
                     "workload may differ, so a change below may come from the study, not the system.")  # fmt: skip
    differs = {row.title for row in context if row.differs}
    if "Request shape" in differs:
        notes.append("The request shape differs between the runs: latency and throughput changes mix the "
                     "workload with the system.")  # fmt: skip
    for run in runs:
        status = run.context.get("status")
        if status and status not in ("ok", "running", "interactive"):
            notes.append(f"run {run.run_id} ended as {status}: some of its measurements may be missing")
    return notes


# --- the figure ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "servinglab"
    return plt


def _svg(fig) -> str:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    # No date and a fixed id salt (set in _pyplot): the same data gives the same bytes.
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def latency_throughput_svg(runs: list[RunData]) -> tuple[str | None, str]:
    """TTFT and TPOT p50 against output tokens/s: a colour per run, a marker per layer, a point per concurrency."""
    series = []
    layers: list[str] = []
    for i, run in enumerate(runs):
        by_layer: dict[str, list[dict[str, Any]]] = {}
        for stage in _stages_by_key(run).values():
            if stage.get("mode") == "closed" and stage["summary"].get("completed"):
                source = stage.get("source") or "servinglab"
                name = stage["layer"] if source == "servinglab" else f"{stage['layer']} ({source})"
                by_layer.setdefault(name, []).append(stage)
        for layer, stages in by_layer.items():
            stages.sort(key=lambda s: s.get("max_concurrency") or 0)
            if layer not in layers:
                layers.append(layer)
            series.append((i, run, layer, stages))
    if not series:
        return None, ""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
    for i, run, layer, stages in series:
        color = RUN_COLORS[i % len(RUN_COLORS)]
        marker = LAYER_MARKERS[layers.index(layer) % len(LAYER_MARKERS)]
        x = [s["summary"]["output_throughput"] for s in stages]
        for ax, key in zip(axes, ("median_ttft_ms", "median_tpot_ms")):
            points = [(xi, s["summary"].get(key)) for xi, s in zip(x, stages) if s["summary"].get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color,
                    linestyle="-" if i == 0 else "--", label=f"{run.run_id} · {layer}")  # fmt: skip
            for s, (xi, yi) in zip(stages, points):
                ax.annotate(f"c={s['max_concurrency']}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.spines[["top", "right"]].set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2, fontsize=7, frameon=False)  # fmt: skip
    parts = []
    for i, run, layer, stages in series:
        top = stages[-1]["summary"]
        parts.append(f"{run.run_id} {layer}: {top['output_throughput']:.0f} tokens/s at c={stages[-1]['max_concurrency']}"
                     + (f", TTFT p50 {top['median_ttft_ms']:.1f} ms" if top.get("median_ttft_ms") is not None else ""))  # fmt: skip
    return _svg(fig), "At each run's highest concurrency: " + "; ".join(parts) + "."


# --- the page --------------------------------------------------------------------------------------


def compare(run_dirs: Sequence[str | os.PathLike]) -> Comparison:
    """The comparison of two or more runs, as data (the first run is the baseline)."""
    return _compare(load_runs(run_dirs))


def _compare(runs: list[RunData]) -> Comparison:
    context = _context_rows(runs)
    notes = _notes(runs, context)
    latency = _latency_rows(runs, notes)
    lifecycle = _lifecycle_rows(runs)
    svg, reading = latency_throughput_svg(runs)
    return Comparison(runs, context, notes, latency, lifecycle, svg, reading)


def render_comparison_html(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Two or more runs side by side as one self-contained HTML document (same data, same bytes)."""
    return _render(load_runs(run_dirs))


def _render(runs: list[RunData]) -> str:
    comparison = _compare(runs)
    env = template_environment(jinja2.StrictUndefined)
    return env.get_template("compare.html.j2").render(
        version=__version__, c=comparison, runs=comparison.runs
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def comparison_file_name(runs: Sequence[RunData]) -> str:
    """``compare-<study>-<run1>-vs-<run2>[-vs-...].html``; each run named with its study when studies differ.

    A name that would grow past MAX_NAME_CHARS (many runs) keeps the first run and a hash of them all.
    """
    same_study = len({r.study for r in runs}) == 1
    first = f"{_slug(runs[0].study)}-{_slug(runs[0].run_id)}"
    others = [_slug(r.run_id) if same_study else f"{_slug(r.study)}-{_slug(r.run_id)}" for r in runs[1:]]
    name = f"compare-{first}-vs-{'-vs-'.join(others)}.html"
    if len(name) <= MAX_NAME_CHARS:
        return name
    digest = hashlib.sha256("\n".join(f"{r.study}/{r.run_id}" for r in runs).encode()).hexdigest()[:10]
    return f"compare-{first}-vs-{len(runs) - 1}-runs-{digest}.html"


def publish_comparison(
    run_dirs: Sequence[str | os.PathLike], reports_dir: str | os.PathLike | None = None
) -> Path:
    """Render a comparison into ``<reports_dir>/compare-....html`` and list it in the index.

    Parameters
    ----------
    run_dirs : sequence of paths
        Two or more run directories; the first is the baseline the others are compared with.
    reports_dir : path, optional
        Where reports go; defaults to ``reports/`` of the current project (the working directory).

    Returns the path of the comparison page.
    """
    runs = load_runs(run_dirs)
    folder = reports_folder(reports_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = file_in(folder, comparison_file_name(runs))
    write_if_changed(path, _render(runs))
    write_index(folder)
    return path


__all__ = ["compare", "comparison_file_name", "publish_comparison", "render_comparison_html"]
