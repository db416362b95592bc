"""Several runs side by side: what they ran on, and how their measurements changed.

``servinglab report RUN_DIR RUN_DIR [...]`` renders one self-contained HTML page from the run
directories alone. The first run given is the baseline (run A); every other run (B, C, ...) is compared
with it. The page answers first, then shows the evidence:

- which runs, what differs between them, and per layer one line naming the changes that exceed the noise;
- the warnings of the compared stages and experiments, grouped by kind with counts, folded;
- per layer one compact table: a row per metric (TTFT, TPOT and E2E p50 and p95, requests/s, output
  tokens/s, goodput), a column per load point, a cell the change from A with its 95 % interval, coloured
  only when it exceeds the noise; a load point where a run's stage was not valid, warned, failed requests
  or is missing carries one mark in its header and a footnote, not a note in every cell; each run's own
  numbers and the full change text folded under the table;
- per layer the lifecycle headlines (time to ready, model update with the requests it failed, cold start,
  canary split, gateway overhead) and every lifecycle trial as each run's own report states it;
- the runs' full context, and a figure of latency against throughput with one line per run and layer.

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
from .sections import lifecycle_failures, lifecycle_rows
from .table import requests_text, verdict

# The seed of every bootstrap this page runs: the same run directories give the same page.
COMPARE_SEED = 20261201
# The latency figures whose difference is bootstrapped from the two stages' request records.
BOOTSTRAPPED = {f"{stat}_{metric}_ms": (metric, stat) for metric in ("ttft", "tpot", "e2el") for stat in ("median", "p95")}
# File names stay short enough for every file system and a readable index.
MAX_NAME_CHARS = 120
RUN_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
LAYER_MARKERS = ["o", "s", "^", "D", "v", "P"]
# A summary line names each load point of a metric's changes up to this many, then gives their range.
NAMED_POINTS = 3
# The kind of problem of a load point a run did not measure.
NOT_MEASURED = "load point not measured in a run"
# The run statuses that say nothing is missing from a run.
FINISHED_STATUSES = ("ok", "running", "interactive")


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    digits: int
    lower_is_better: bool | None  # None: neither direction is better (a canary split)
    short: str = ""  # its name in a summary line (the title when empty)
    experiment: str = ""  # the lifecycle experiment that measures it ("" for a latency metric)

    @property
    def name(self) -> str:
        return self.short or self.title


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
    Metric("time_to_ready_s", "Time to ready", "s", 1, True, "time to ready", "time_to_ready"),
    Metric("change_to_served_s", "Model update: change to new revision served", "s", 1, True, "model update",
           "model_update"),  # fmt: skip
    Metric("update_failed_percent", "Model update: requests failed during the change", "%", 1, True,
           "requests failed in an update", "model_update"),  # fmt: skip
    Metric("cold_start_s", "Cold start: zero replicas to first token", "s", 1, True, "cold start", "scale_to_zero"),
    Metric("canary_observed_percent", "Canary split: share to the new revision", "%", 1, None, "canary share",
           "canary"),  # fmt: skip
    Metric("gateway_overhead_ms", "Gateway overhead on TTFT (median difference)", "ms", 2, True, "gateway overhead",
           "gateway_hop"),  # fmt: skip
]


def run_label(index: int) -> str:
    """A run's short name on the page: A for the baseline, then B, C, ..."""
    return chr(ord("A") + index) if index < 26 else f"R{index + 1}"


@dataclass(frozen=True)
class Change:
    """A run's change from the baseline, in parts the page lays out, and how it compares with the noise."""

    delta: str  # "+1.0 ms", or "+0.5 pp" for a share
    percent: str  # "+10.0 %" ("" for a share, or a baseline of zero)
    interval: str  # the difference's 95 % interval, "[+0.9, +1.1]" ("" when not bootstrapped)
    judgement: str  # beyond the noise, within the noise, intervals overlap, noise unknown
    verdict: str  # better, worse, changed (beyond the noise, no direction), same, or "" (not judged)
    size: float = 0.0  # how big, to order changes: the relative change in percent when shown, else the absolute

    @property
    def shown(self) -> str:
        """The change in a few characters: relative when there is a relative change, else absolute."""
        return self.percent or self.delta

    @property
    def text(self) -> str:
        """The whole change in one line: "+1.0 ms (+10.0 %) [+0.9, +1.1]; beyond the noise"."""
        head = self.delta + (f" ({self.percent})" if self.percent else "")
        return head + (f" {self.interval}" if self.interval else "") + f"; {self.judgement}"

    @property
    def significant(self) -> bool:
        """Beyond the noise and judged: what the page colours and its summary names."""
        return self.verdict in ("better", "worse", "changed")


@dataclass(frozen=True)
class Value:
    """One run's value of a metric, with its change from the baseline run (None for the baseline)."""

    text: str
    change: Change | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        return self.change.verdict if self.change else ""

    @property
    def measured(self) -> bool:
        return self.text != MISSING


MISSING = "–"


@dataclass
class MetricRow:
    """A lifecycle headline: each run's value of one metric."""

    metric: Metric
    values: list[Value]


@dataclass(frozen=True)
class Problem:
    """Something that qualifies a run's stage at a load point: it was not valid, warned, failed requests, is
    missing. ``kind`` groups it with its like at the top of the page."""

    kind: str
    run: int  # the run's place in the comparison (0: the baseline)
    short: str  # a few words for the column's footnote: "not valid (server-burst)"
    text: str  # the whole reason

    @property
    def label(self) -> str:
        return run_label(self.run)


@dataclass
class LoadPoint:
    """A column of a layer's table: the load point and what qualifies its stages in any run."""

    label: str
    problems: list[Problem] = field(default_factory=list)
    mark: str = ""  # the footnote's number ("" when nothing qualifies it)

    @property
    def short(self) -> str:
        """Its problems in a few words, once each per run: "B not valid (server-burst), warned"."""
        by_run: dict[str, list[str]] = {}
        for p in self.problems:
            if p.short not in by_run.setdefault(p.label, []):
                by_run[p.label].append(p.short)
        return "; ".join(f"{label} {', '.join(shorts)}" for label, shorts in by_run.items())


@dataclass
class MetricLine:
    """A row of a layer's table: per load point each run's value (None: no run measured it there)."""

    metric: Metric
    cells: list[list[Value] | None]


@dataclass
class LayerTable:
    layer: str
    points: list[LoadPoint]
    rows: list[MetricLine]

    @property
    def footnotes(self) -> list[LoadPoint]:
        return [p for p in self.points if p.mark]

    @property
    def compared(self) -> bool:
        """Whether any cell holds a change (False: the layer was measured in one run only)."""
        return any(v.change for row in self.rows for cell in row.cells if cell for v in cell)

    @property
    def measured_in(self) -> list[int]:
        """The runs (by place) with a value anywhere in the table."""
        return sorted({i for row in self.rows for cell in row.cells if cell for i, v in enumerate(cell) if v.measured})

    def line(self, key: str) -> MetricLine | None:
        return next((r for r in self.rows if r.metric.key == key), None)

    def cell(self, key: str, point: str) -> list[Value] | None:
        """Each run's value of metric ``key`` at load point ``point`` (None: not measured there)."""
        line = self.line(key)
        index = next((i for i, p in enumerate(self.points) if p.label == point), None)
        return None if line is None or index is None else line.cells[index]


@dataclass(frozen=True)
class TrialFacts:
    """One lifecycle trial of a layer (``model_update #1``) as each run's report states it (None: not in that run)."""

    experiment: str
    trial: int
    per_run: list[dict[str, Any] | None]  # sections.lifecycle_rows's row: status, result, settled


@dataclass(frozen=True)
class LayerTrials:
    """A layer's lifecycle trials in every run, and per run its trials counted by status."""

    trials: list[TrialFacts]
    counts: list[str]  # "5 measured, 2 unsupported" ("none")


@dataclass(frozen=True)
class WarningGroup:
    kind: str
    items: list[str]


@dataclass
class ContextRow:
    title: str
    values: list[str]
    differs: bool


@dataclass
class Comparison:
    runs: list[RunData]
    context: list[ContextRow]
    notes: list[str]  # about the runs as a whole: shown first, never folded
    latency: dict[str, LayerTable] = field(default_factory=dict)  # by layer, in first-seen order
    lifecycle: dict[str, list[MetricRow]] = field(default_factory=dict)
    trials: dict[str, LayerTrials] = field(default_factory=dict)
    warnings: list[WarningGroup] = field(default_factory=list)
    summary: dict[str, list[str]] = field(default_factory=dict)  # per layer, a line per compared run
    figure: str | None = None
    figure_reading: str = ""

    @property
    def labels(self) -> list[str]:
        return [run_label(i) for i in range(len(self.runs))]

    @property
    def warning_count(self) -> int:
        return sum(len(g.items) for g in self.warnings)

    @property
    def differs(self) -> list[ContextRow]:
        return [row for row in self.context if row.differs]

    def value(self, title: str, index: int) -> str:
        """Run ``index``'s value of a context field ("Engine")."""
        return next(row.values[index] for row in self.context if row.title == title)


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
        return MISSING
    return f"{value:.{metric.digits}f} {metric.unit}"


@dataclass(frozen=True)
class Noise:
    """What tells a change from run-to-run noise: the 95 % interval of the difference (bootstrapped from both
    runs' request records), or whether the two runs' recorded intervals overlap."""

    exceeds: bool
    interval: list[float] | None = None  # of the difference, when bootstrapped
    how: str = "bootstrap"  # or "intervals" (the recorded intervals of both values, compared)


def judge_change(base: float | None, value: float | None, metric: Metric, noise: Noise | None = None,
                 judged: bool = True) -> Change | None:  # fmt: skip
    """The change from ``base`` to ``value`` and whether it exceeds the noise: the one place that rule lives.

    Parameters
    ----------
    base, value : float or None
        The baseline run's value and the compared run's; None when either is missing (no change then).
    metric : Metric
        Its unit, digits and which direction is better.
    noise : Noise, optional
        The difference's bootstrapped interval, or whether the recorded intervals overlap; None: unknown.
    judged : bool
        False when a stage behind either value was not valid: the change is shown, never called better or worse.

    Returns
    -------
    Change or None
        ``better`` or ``worse`` only when the change exceeds the noise (``changed`` for a metric with no better
        direction), ``same`` within it, "" when the noise is unknown or the change is not judged.
    """
    if base is None or value is None:
        return None
    delta = value - base
    sign = "+" if delta >= 0 else "−"
    percent, size = "", abs(delta)
    if metric.unit == "%":  # a share: its change is in percentage points, a relative change would mislead
        text = f"{sign}{abs(delta):.{metric.digits}f} pp"
    else:
        text = f"{sign}{abs(delta):.{metric.digits}f} {metric.unit}"
        if base != 0:
            relative = 100.0 * delta / abs(base)
            percent, size = f"{'+' if relative >= 0 else '−'}{abs(relative):.1f} %", abs(relative)
    if noise is None:
        return Change(text, percent, "", "noise unknown", "", size)
    span = ""
    if noise.interval is not None:
        low, high = noise.interval
        span = f"[{low:+.{metric.digits}f}, {high:+.{metric.digits}f}]"
    if not noise.exceeds:
        within = "within the noise" if noise.how == "bootstrap" else "intervals overlap"
        return Change(text, percent, span, within, "same" if judged else "", size)
    if not judged:
        return Change(text, percent, span, "beyond the noise", "", size)
    if metric.lower_is_better is None:
        return Change(text, percent, span, "beyond the noise", "changed", size)
    better = (delta < 0) == metric.lower_is_better
    return Change(text, percent, span, "beyond the noise", "better" if better else "worse", size)


def change_text(base: float | None, value: float | None, metric: Metric, noise: Noise | None = None,
                judged: bool = True) -> tuple[str, str]:  # fmt: skip
    """The change from ``base`` to ``value`` as one line ("+1.0 ms (+10.0 %) [+0.4, +1.6]; beyond the noise")
    and its verdict, as :func:`judge_change` decides them; ("", "") when either value is missing."""
    change = judge_change(base, value, metric, noise, judged)
    return (change.text, change.verdict) if change else ("", "")


def _values(numbers: list[float | None], metric: Metric, notes: list[str] | None = None,
            noises: list[Noise | None] | None = None, judged: list[bool] | None = None) -> list[Value]:  # fmt: skip
    """Each run's value with its change from the first run's (the baseline), judged against the noise."""
    count = len(numbers)
    notes = notes or [""] * count
    noises = noises or [None] * count
    judged = judged or [True] * count
    out = []
    for i, (number, note) in enumerate(zip(numbers, notes)):
        if number is None:
            out.append(Value(MISSING, note=note or "not measured"))
            continue
        change = judge_change(numbers[0], number, metric, noises[i], judged[i] and judged[0]) if i else None
        out.append(Value(_format(number, metric), change, note))
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
    if mode == "sweep":  # the synchronous probe, the throughput probe, then the rates in their order
        place = stage.get("sweep") or {}
        part = {"synchronous": 0, "throughput": 1}.get(place.get("part"), 2)
        return (2, part * 1000 + (place.get("index") or 0), stage["stage"])
    return (3, 0, stage["stage"])


def _load_label(stage: dict[str, Any]) -> str:
    """The load point's name; results another tool measured (an import) keep their own columns."""
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


def _stage_problems(run: int, stage: dict[str, Any] | None) -> list[Problem]:
    """What qualifies one run's stage at a load point, each with the whole reason the run recorded."""
    if stage is None:
        return [Problem(NOT_MEASURED, run, "not measured", "not measured in this run")]
    summary = stage["summary"]
    if not summary.get("completed"):
        return [Problem("load point with no completed request", run, "no completed request", "completed no request")]
    found = []
    state = verdict(stage)
    if state != "valid":
        reasons = "; ".join(r["text"] for r in (stage.get("validity") or {}).get("reasons", []))
        text = state + (f": {reasons}" if reasons else "") + "; no verdict at this load point"
        found.append(Problem(f"stages not valid: {state}", run, f"not valid ({state})", text))
    failed = summary.get("failed")
    if failed:
        errors = ", ".join(f"{k} {v}" for k, v in (summary.get("errors") or {}).items())
        text = f"{failed} of {failed + summary['completed']} requests failed" + (f" ({errors})" if errors else "")
        found.append(Problem("stages with failed requests", run, f"{failed} requests failed", text))
    found += [Problem("stages that warned", run, "warned", warning) for warning in summary.get("warnings", [])]
    if stage.get("interrupted"):
        text = "interrupted; its measurements up to then are kept"
        found.append(Problem("stages interrupted", run, "interrupted", text))
    return found


def _layer_points(keys: dict[tuple[str, str], dict[str, Any]], layer: str) -> list[tuple[str, str]]:
    return sorted((k for k in keys if k[0] == layer), key=lambda k: (_stage_order(keys[k]), k[1]))


def _point_cells(runs: list[RunData], stages: list[dict[str, Any] | None]) -> dict[str, list[Value] | None]:
    """Per latency metric, each run's value at one load point and its change (None: no run measured it)."""
    # A stage that was not valid feeds no verdict: its changes are shown, never called better or worse.
    judged = [s is None or verdict(s) == "valid" for s in stages]
    noises = _stage_noises(runs, stages)
    out: dict[str, list[Value] | None] = {}
    for metric in LATENCY_METRICS:
        numbers = [s["summary"].get(metric.key) if s and s["summary"].get("completed") else None for s in stages]
        measured = any(n is not None for n in numbers)
        out[metric.key] = _values(numbers, metric, None, noises[metric.key], judged) if measured else None
    return out


def _latency_tables(runs: list[RunData]) -> dict[str, LayerTable]:
    """Per layer, a row per metric and a column per load point; each cell every run's value and change."""
    per_run = [_stages_by_key(run) for run in runs]
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for stages in per_run:
        for key, stage in stages.items():
            keys.setdefault(key, stage)
    out: dict[str, LayerTable] = {}
    for layer in dict.fromkeys(layer for layer, _ in keys):
        points: list[LoadPoint] = []
        cells: dict[str, list[list[Value] | None]] = {m.key: [] for m in LATENCY_METRICS}
        for key in _layer_points(keys, layer):
            stages = [stages.get(key) for stages in per_run]
            points.append(LoadPoint(key[1], [p for i, s in enumerate(stages) for p in _stage_problems(i, s)]))
            for metric_key, cell in _point_cells(runs, stages).items():
                cells[metric_key].append(cell)
        rows = [MetricLine(m, cells[m.key]) for m in LATENCY_METRICS if any(c is not None for c in cells[m.key])]
        for number, point in enumerate((p for p in points if p.problems), start=1):
            point.mark = str(number)
        if rows:
            out[layer] = LayerTable(layer, points, rows)
    return out


# --- what the page says first ----------------------------------------------------------------------


def _points_text(found: list[tuple[str, Change]], points: int) -> str:
    """A metric's significant changes in a few words: "+9.9 % to +10.0 % at c=1, c=4" (a lifecycle headline
    has no load point; beyond NAMED_POINTS load points they are counted, of the ``points`` compared)."""
    ordered = sorted(found, key=lambda f: f[1].size)
    smallest, largest = ordered[0][1].shown, ordered[-1][1].shown
    size = smallest if smallest == largest else f"{smallest} to {largest}"
    where = [point for point, _ in found if point]
    if not where:
        return size
    return f"{size} at " + (", ".join(where) if len(where) <= NAMED_POINTS else f"{len(where)} of {points} load points")


def _verdict_text(metrics: dict[str, list[tuple[str, Change]]], points: int) -> str:
    """The metrics of one verdict, those that changed alike named together: "TTFT p50, E2E p50 +20.0 % at c=1"."""
    alike: dict[str, list[str]] = {}
    for metric, found in metrics.items():
        alike.setdefault(_points_text(found, points), []).append(metric)
    return "; ".join(f"{', '.join(names)} {text}" for text, names in alike.items())


def _summary_line(table: LayerTable | None, lifecycle: list[MetricRow], index: int) -> str:
    """Run ``index``'s changes from the baseline on one layer that exceed the noise, worse first."""
    by_verdict: dict[str, dict[str, list[tuple[str, Change]]]] = {"worse": {}, "better": {}, "changed": {}}
    compared = unjudged = 0
    for line in table.rows if table else []:
        for point, cell in zip(table.points, line.cells):  # type: ignore[union-attr]
            change = cell[index].change if cell else None
            if change is None:
                continue
            compared += 1
            unjudged += change.verdict == "" and change.judgement == "beyond the noise"
            if change.significant:
                by_verdict[change.verdict].setdefault(line.metric.name, []).append((point.label, change))
    for row in lifecycle:
        change = row.values[index].change
        if change is not None:
            compared += 1
            if change.significant:
                by_verdict[change.verdict].setdefault(row.metric.name, []).append(("", change))
    points = len(table.points) if table else 0
    parts = [f"{name}: {_verdict_text(metrics, points)}" for name, metrics in by_verdict.items() if metrics]
    significant = sum(len(f) for m in by_verdict.values() for f in m.values())
    values = "value" if compared == 1 else "values"
    head = (f"{significant} of {compared} compared {values} changed beyond the noise" if significant
            else f"no change beyond the noise in {compared} compared {values}" if compared
            else "nothing measured in both runs to compare")  # fmt: skip
    tail = f"; {unjudged} more beyond it at stages not valid, not judged" if unjudged else ""
    return head + (": " + " · ".join(parts) if parts else "") + tail


def _summary(runs: list[RunData], latency: dict[str, LayerTable],
             lifecycle: dict[str, list[MetricRow]]) -> dict[str, list[str]]:  # fmt: skip
    """Per layer, one line per compared run naming its significant changes from the baseline."""
    layers = list(dict.fromkeys([*latency, *lifecycle]))
    return {layer: [_summary_line(latency.get(layer), lifecycle.get(layer, []), i) for i in range(1, len(runs))]
            for layer in layers}  # fmt: skip


def _point_warnings(runs: list[RunData], layer: str, table: LayerTable) -> list[tuple[str, str]]:
    """(kind, text) of every problem at a layer's load points; a layer a run did not measure at all is one."""
    absent = {i for i in range(len(runs))
              if all(any(p.kind == NOT_MEASURED and p.run == i for p in point.problems) for point in table.points)}
    out = [(NOT_MEASURED, f"run {run_label(i)} ({runs[i].run_id}), layer {layer}: none of its {len(table.points)} "
            "load points measured in this run") for i in sorted(absent)]  # fmt: skip
    for point in table.points:
        for problem in point.problems:
            if problem.run not in absent:
                where = f"run {problem.label} ({runs[problem.run].run_id}), layer {layer} at {point.label}"
                out.append((problem.kind, f"{where}: {problem.text}"))
    return out


def _warning_groups(runs: list[RunData], latency: dict[str, LayerTable]) -> list[WarningGroup]:
    """Everything that qualifies the comparison, grouped by kind, each item naming its run and where."""
    groups: dict[str, list[str]] = {}
    for i, run in enumerate(runs):
        who = f"run {run_label(i)} ({run.run_id})"
        groups.setdefault("damaged records", []).extend(f"{who}: {d}" for d in run.damaged)
        failed = [f"{w.kind.lower()}: {w.line}" for w in lifecycle_failures(run)]  # the single-run report's own entries
        groups.setdefault("lifecycle experiments failed or interrupted", []).extend(f"{who}: {w}" for w in failed)
    for layer, table in latency.items():
        for kind, text in _point_warnings(runs, layer, table):
            groups.setdefault(kind, []).append(text)
    return [WarningGroup(kind, items) for kind, items in groups.items() if items]


# --- the lifecycle ---------------------------------------------------------------------------------


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


def _ready_headline(run: RunData, ready: list[float], layer: str) -> Headline | None:
    if ready:
        label = f"median of {len(ready)} starts" if len(ready) > 1 else ""
        return Headline(statistics.median(ready), label, _median_interval(ready))
    fresh = [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]
    if fresh:
        label = f"median of {len(fresh)} deploys" if len(fresh) > 1 else "at deploy"
        return Headline(statistics.median(fresh), label, _median_interval(fresh))
    return None


def _update_headlines(updates: list[dict[str, Any]]) -> dict[str, Headline]:
    """The last model update: when the new revision served, and what it cost the requests sent meanwhile."""
    if not updates:
        return {}
    m, out = updates[-1], {}
    during = m.get("during") or {}
    failures = f"during the change: {requests_text(during)}" if during.get("requests") is not None else ""
    if m.get("change_to_served_s") is not None:
        out["change_to_served_s"] = Headline(m["change_to_served_s"], failures)
    if during.get("requests"):
        share = 100.0 * (during.get("failed") or 0) / during["requests"]
        out["update_failed_percent"] = Headline(share, f"{during.get('failed') or 0} of {during['requests']} requests "
                                                "failed during the change")  # fmt: skip
    return out


def lifecycle_headlines(run: RunData, layer: str) -> dict[str, Headline]:
    """A layer's lifecycle headline numbers in a run, each with a note on where it comes from and its interval."""
    measured = [r for r in run.lifecycle if r["layer"] == layer and r["status"] == "measured"]

    def of(experiment: str) -> list[dict[str, Any]]:
        return [r["measurements"] for r in measured if r["experiment"] == experiment]

    out: dict[str, Headline] = {}
    ready = _ready_headline(run, [m["time_to_ready_s"] for m in of("time_to_ready")
                                  if m.get("time_to_ready_s") is not None], layer)  # fmt: skip
    if ready:
        out["time_to_ready_s"] = ready
    out.update(_update_headlines(of("model_update")))
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


def _in_a_line(text: str) -> str:
    """A reason in one line: its first, and its last when the first only introduces what follows (a log)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _why_missing(run: RunData, facts: list[dict[str, Any]], layer: str, experiment: str) -> str:
    """Why a run has no headline of an experiment: its last trial's own sentence (a refusal, a failure), else
    a deploy that failed or could not run; "" when the run simply did not try it."""
    found = [f for f in facts if f["layer"] == layer and f["experiment"] == experiment and f["status"] != "measured"]
    if found:
        settled = f" (the layer was {found[-1]['settled']})" if found[-1]["settled"] else ""
        return _in_a_line(found[-1]["result"]) + settled  # the whole reason is in the trial list below
    deployment = run.last_deployment(layer)
    if deployment and deployment["status"] in ("failed", "unsupported"):
        return f"deploy {deployment['status']}: {_in_a_line(deployment.get('reason') or 'no reason recorded')}"
    return ""


def _lifecycle_layers(runs: list[RunData]) -> list[str]:
    layers: list[str] = []
    for run in runs:
        layers += [*run.layers, *(r["layer"] for r in run.lifecycle), *(d["layer"] for d in run.deployments)]
    return list(dict.fromkeys(layers))


def _lifecycle_rows(runs: list[RunData]) -> dict[str, list[MetricRow]]:
    facts = [lifecycle_rows(run) for run in runs]
    out: dict[str, list[MetricRow]] = {}
    for layer in _lifecycle_layers(runs):
        headlines = [lifecycle_headlines(run, layer) for run in runs]
        rows = []
        for metric in LIFECYCLE_METRICS:
            found = [h.get(metric.key) for h in headlines]
            why = [_why_missing(run, f, layer, metric.experiment) if h is None else ""
                   for run, f, h in zip(runs, facts, found)]  # fmt: skip
            if all(f is None for f in found) and not any(why):
                continue
            numbers = [f.value if f else None for f in found]
            base = found[0].interval if found[0] else None
            noises = [None] + [_overlap_noise(base, f.interval if f else None) for f in found[1:]]
            notes = [f.note if f else w for f, w in zip(found, why)]
            rows.append(MetricRow(metric, _values(numbers, metric, notes, noises)))
        if rows:
            out[layer] = rows
    return out


def _trial_facts(runs: list[RunData]) -> dict[str, LayerTrials]:
    """Per layer, every lifecycle trial of any run, each run's row as its own report lists it."""
    rows = [lifecycle_rows(run) for run in runs]
    keys = list(dict.fromkeys((r["layer"], r["experiment"], r["trial"]) for found in rows for r in found))
    by_layer: dict[str, list[TrialFacts]] = {}
    for layer, experiment, trial in keys:
        per_run = [next((r for r in found if (r["layer"], r["experiment"], r["trial"]) == (layer, experiment, trial)),
                        None) for found in rows]  # fmt: skip
        by_layer.setdefault(layer, []).append(TrialFacts(experiment, trial, per_run))
    return {layer: LayerTrials(facts, [_trial_counts(facts, i) for i in range(len(runs))])
            for layer, facts in by_layer.items()}  # fmt: skip


def _trial_counts(facts: list[TrialFacts], index: int) -> str:
    """A run's trials of a layer counted by status: "5 measured, 2 unsupported" ("none" when it has none)."""
    counts: dict[str, int] = {}
    for fact in facts:
        row = fact.per_run[index]
        if row is not None:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"


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
    for i, run in enumerate(runs):
        status = run.context.get("status")
        if status and status not in FINISHED_STATUSES:
            notes.append(f"run {run_label(i)} ({run.run_id}) ended as {status}: some of its measurements may be "
                         "missing")  # fmt: skip
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
    latency = _latency_tables(runs)
    lifecycle = _lifecycle_rows(runs)
    svg, reading = latency_throughput_svg(runs)
    return Comparison(runs, context, _notes(runs, context), latency, lifecycle, _trial_facts(runs),
                      _warning_groups(runs, latency), _summary(runs, latency, lifecycle), svg, reading)  # fmt: skip


def render_comparison_html(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Two or more runs side by side as one self-contained HTML document (same data, same bytes)."""
    return _render(load_runs(run_dirs))


def _render(runs: list[RunData]) -> str:
    return comparison_html(_compare(runs))


def comparison_html(comparison: Comparison) -> str:
    """A comparison (from :func:`compare`) as one self-contained HTML document (same data, same bytes)."""
    env = template_environment(jinja2.StrictUndefined)
    return env.get_template("compare.html.j2").render(version=__version__, c=comparison, runs=comparison.runs)


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


__all__ = ["compare", "comparison_file_name", "comparison_html", "publish_comparison", "render_comparison_html"]
