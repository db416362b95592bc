"""Figures for the report, as inline SVG text that is the same for the same data; drawn for a notebook, each
also carries a PNG of the same drawing (see :mod:`servinglab.report.show`)."""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .rundata import RunData

if TYPE_CHECKING:
    from .show import FigureList

PHASE_LABELS = {
    "interpreter_and_import_s": "start Python, import vLLM",
    "engine_init_s": "engine init (weights, KV cache, compile, warm-up)",
    "api_server_up_s": "API server up (/health)",
    "model_listed_s": "model listed (/v1/models)",
}
# The phases a cluster start goes through (the kubernetes platform's marks), and a cold request's last one.
CLUSTER_PHASE_LABELS = {
    "pod_created_s": "pod created",
    "scheduling_s": "scheduling",
    "image_pull_s": "image pull",
    "container_start_s": "container start",
    "engine_ready_s": "engine ready (weights, KV cache, probes)",
}
FIRST_TOKEN_LABEL = {"first_token_s": "first token of the first request"}
START_PHASE_LABELS = {**PHASE_LABELS, **CLUSTER_PHASE_LABELS}  # a fresh start's phases, on either platform
PHASE_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]


@dataclass(frozen=True)
class Figure:
    anchor: str
    title: str
    svg: str
    reading: str  # one sentence that says what the figure shows
    png: bytes | None = None  # the same drawing as PNG: drawn for notebooks only (the report inlines the SVG)

    def __post_init__(self) -> None:
        # Every figure defines its glyphs and clip paths under the same ids; inline in one page, ids must be
        # unique, so each figure's are prefixed with its anchor.
        object.__setattr__(self, "svg", _scope_ids(self.svg, self.anchor))


def _scope_ids(svg: str, prefix: str) -> str:
    """Prefix every id an SVG defines, and every reference to one, with ``prefix-``."""
    return re.sub(r'(\bid="|href="#|url\(#)', lambda m: f"{m.group(1)}{prefix}-", svg)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    # No date, a fixed id salt: identical data gives identical bytes.
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


# Whether the figures drawn now also get a PNG. Only notebooks need one (an untrusted notebook shows no SVG), and
# drawing it costs about as much as the SVG, so the report's figures go without.
_WITH_PNG: contextvars.ContextVar[bool] = contextvars.ContextVar("servinglab_figures_with_png", default=False)
PNG_DPI = 100  # the figures' sizes in inches are chosen for this: 100 px an inch, as a notebook shows them


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: identical data gives identical bytes here too.
    fig.savefig(buffer, format="png", dpi=PNG_DPI, metadata={"Software": None}, bbox_inches="tight")
    return buffer.getvalue()


def _figure(anchor: str, title: str, fig, reading: str) -> Figure:  # noqa: ANN001 - a matplotlib Figure
    """The finished figure: its SVG, and its PNG when drawn for a notebook; closes ``fig``."""
    png = _png(fig) if _WITH_PNG.get() else None
    return Figure(anchor, title, _svg(fig), reading, png)


@contextlib.contextmanager
def _drawn_with_png() -> Iterator[None]:
    token = _WITH_PNG.set(True)
    try:
        yield
    finally:
        _WITH_PNG.reset(token)


def time_to_ready_figure(run: RunData) -> Figure | None:
    """Stacked bars: each fresh start's time to ready, split into its phases (a process's or a pod's)."""
    starts = [(d["layer"], d) for d in run.deployments if d["status"] == "ready" and not d["reused"]]
    if not starts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.5 * len(starts)))
    _phase_bars(ax, [(f"{layer} #{i + 1}", d.get("phases_s") or {}) for i, (layer, d) in enumerate(starts)])
    ax.set_xlabel("seconds from the start (process start, or apply on a cluster)")
    longest_layer, longest = max(starts, key=lambda s: s[1]["time_to_ready_s"] or 0)
    biggest = max((longest.get("phases_s") or {}).items(), key=lambda kv: kv[1], default=(None, 0))
    labels = START_PHASE_LABELS
    reading = (
        f"The slowest start, {longest_layer}, took {longest['time_to_ready_s']:.1f} s to ready; "
        f"{biggest[1]:.1f} s of it was {labels.get(biggest[0], biggest[0])}."
    )
    return _figure("fig-time-to-ready", "Time to ready by phase", fig, reading)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "servinglab"
    return plt


def _closed_stages(run: RunData) -> dict[str, list[dict]]:
    by_layer: dict[str, list[dict]] = {}
    for stage in run.latency_stages:
        if stage.get("mode") == "closed" and stage["summary"].get("completed"):
            by_layer.setdefault(stage["layer"], []).append(stage)
    for stages in by_layer.values():
        stages.sort(key=lambda s: s.get("max_concurrency") or 0)
    return by_layer


def latency_throughput_figure(run: RunData) -> Figure | None:
    """TTFT and TPOT medians against output throughput, one line per layer, one point per concurrency."""
    by_layer = _closed_stages(run)
    if not by_layer:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for layer, stages in by_layer.items():
        x = [s["summary"]["output_throughput"] for s in stages]
        for ax, key in zip(axes, ("median_ttft_ms", "median_tpot_ms")):
            y = [s["summary"].get(key, float("nan")) for s in stages]  # an imported result may lack one
            ax.plot(x, y, marker="o", label=layer)
            for s, xi, yi in zip(stages, x, y):
                ax.annotate(f"c={s['max_concurrency']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=8, frameon=False)
    best_layer, best = max(((l, s[-1]) for l, s in by_layer.items()), key=lambda p: p[1]["summary"]["output_throughput"])
    reading = (
        f"At its highest concurrency ({best['max_concurrency']}) {best_layer} reached "
        f"{best['summary']['output_throughput']:.0f} output tokens/s with a TTFT p50 of "
        f"{best['summary']['median_ttft_ms']:.1f} ms."
    )
    return _figure("fig-latency-throughput", "Latency against throughput", fig, reading)


def distributions_figure(run: RunData) -> Figure | None:
    """Cumulative distributions of TTFT and ITL per closed-loop stage (client side)."""
    requests = [r for r in run.latency_requests if r.get("ok") and not r.get("warmup")]
    if not requests:
        return None
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in requests:
        groups.setdefault((r["layer"], r["stage"]), []).append(r)
    for (layer, stage), rs in sorted(groups.items()):
        ttft = np.sort([r["ttft_ms"] for r in rs])
        itl = np.sort([b - a for r in rs for a, b in zip(r["token_ms"], r["token_ms"][1:])])
        label = f"{layer} {stage}"
        axes[0].plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=label)
        if len(itl):
            axes[1].plot(itl, np.arange(1, len(itl) + 1) / len(itl), label=label)
    for ax, label in zip(axes, ("TTFT (ms)", "ITL (ms)")):
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests" if label.startswith("TTFT") else "share of gaps")
        ax.set_xscale("symlog", linthresh=1)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].legend(fontsize=7, frameon=False)
    all_itl = [b - a for r in requests for a, b in zip(r["token_ms"], r["token_ms"][1:])]
    reading = (
        f"Over {len(requests)} requests, TTFT ran from {min(r['ttft_ms'] for r in requests):.1f} to "
        f"{max(r['ttft_ms'] for r in requests):.1f} ms; the median gap between tokens was "
        f"{float(np.median(all_itl)) if all_itl else float('nan'):.2f} ms."
    )
    return _figure("fig-distributions", "TTFT and ITL distributions", fig, reading)


def _goodput(stage: dict) -> float | None:
    # vllm bench serve saves request_goodput as null when it was given no objectives (--goodput).
    value = stage["summary"].get("request_goodput")
    return float(value) if isinstance(value, (int, float)) else None


def goodput_figure(run: RunData) -> Figure | None:
    """Goodput and throughput against concurrency, when the study sets per-request objectives (drawn for the
    stages that recorded a goodput; none: no figure)."""
    by_layer = _closed_stages(run)
    with_goodput = [s for st in by_layer.values() for s in st if _goodput(s) is not None]
    if not with_goodput:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for layer, stages in by_layer.items():
        c = [s["max_concurrency"] for s in stages]
        ax.plot(c, [s["summary"]["request_throughput"] for s in stages], marker="o", linestyle="--", label=f"{layer} throughput")
        measured = [s for s in stages if _goodput(s) is not None]
        if measured:
            ax.plot([s["max_concurrency"] for s in measured], [_goodput(s) for s in measured], marker="o",
                    label=f"{layer} goodput")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    best = max(with_goodput, key=lambda s: _goodput(s) or 0.0)
    reading = (
        f"Goodput peaked at {_goodput(best):.2f} requests/s ({best['layer']}, "
        f"concurrency {best['max_concurrency']}), against {best['summary']['request_throughput']:.2f} requests/s served."
    )
    left_out = len([s for st in by_layer.values() for s in st]) - len(with_goodput)
    if left_out:
        plural = left_out > 1
        reading += (f" {left_out} stage{'s' if plural else ''} recorded no goodput and {'are' if plural else 'is'} "
                    "drawn with throughput only.")  # fmt: skip
    return _figure("fig-goodput", "Goodput against load", fig, reading)


def _measured(run: RunData, experiment: str) -> list[dict]:
    return [r for r in run.lifecycle if r["experiment"] == experiment and r["status"] == "measured"]


def _phase_bars(ax, rows: list[tuple[str, dict[str, float]]]) -> None:  # noqa: ANN001 - a matplotlib Axes
    labels = {**PHASE_LABELS, **CLUSTER_PHASE_LABELS, **FIRST_TOKEN_LABEL}
    present = [p for p in labels if any(p in phases for _, phases in rows)]
    lefts = [0.0] * len(rows)
    for phase, color in zip(present, PHASE_COLORS):
        widths = [phases.get(phase, 0.0) for _, phases in rows]
        ax.barh([name for name, _ in rows], widths, left=lefts, color=color, label=labels[phase])
        lefts = [a + b for a, b in zip(lefts, widths)]
    ax.invert_yaxis()
    # The same distance below the axes whatever their height: room for the tick labels and the x label.
    height_in = ax.get_position().height * ax.figure.get_figheight()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.62 / height_in), ncol=2, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def lifecycle_ready_figure(run: RunData) -> Figure | None:
    """Stacked bars: every repeated start from nothing, by phase, so the spread between starts shows."""
    trials = _measured(run, "time_to_ready")
    if not trials:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.45 * len(trials)))
    _phase_bars(ax, [(f"{r['layer']} #{r['trial'] + 1}", r["measurements"]["phases_s"]) for r in trials])
    ax.set_xlabel("seconds from the start")
    by_layer: dict[str, list[float]] = {}
    for r in trials:
        by_layer.setdefault(r["layer"], []).append(r["measurements"]["time_to_ready_s"])
    reading = "; ".join(f"{layer} took {min(v):.1f}–{max(v):.1f} s over {len(v)} starts" for layer, v in by_layer.items()) + "."
    return _figure("fig-lifecycle-ready", "Time to ready from nothing, repeated", fig, reading)


def update_timeline_figure(run: RunData) -> Figure | None:
    """Each steady request around a model update: its latency at its send time, failures marked."""
    updates = _measured(run, "model_update")
    if not updates:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(updates), 1, figsize=(8, 2.6 * len(updates)), squeeze=False)
    parts = []
    for ax, update in zip(axes[:, 0], updates):
        m = update["measurements"]
        requests = [r for r in run.lifecycle_requests if r["experiment"] == "model_update" and r["layer"] == update["layer"]
                    and r["trial"] == update["trial"]]  # fmt: skip
        change = min((r["sent_at_unix"] for r in requests if r.get("phase") == "during"), default=None)
        if change is None:
            continue
        ok = [r for r in requests if r.get("ok")]
        bad = [r for r in requests if not r.get("ok")]
        ax.scatter([r["sent_at_unix"] - change for r in ok], [r["e2el_ms"] for r in ok], s=8, color="#4c72b0", label="answered")
        ax.scatter([r["sent_at_unix"] - change for r in bad], [0] * len(bad), s=14, marker="x", color="#c44e52", label="failed")
        ax.axvline(0, color="#555", linewidth=0.8)
        ax.axvline(m["change_to_ready_s"], color="#55a868", linewidth=0.8, linestyle="--", label="change ready")
        ax.set_title(f"{update['layer']}: {m['how']}", fontsize=9)
        ax.set_ylabel("E2E (ms)")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
        parts.append(f"{update['layer']} failed {m['during']['failed']} of {m['during']['requests']} requests "
                     f"with a longest gap of {m['longest_gap_s']:.1f} s")  # fmt: skip
    axes[-1, 0].set_xlabel("seconds since the change began")
    fig.tight_layout()
    return _figure("fig-update-timeline", "Requests during a model update", fig, "; ".join(parts) + ".")


def cold_start_figure(run: RunData) -> Figure | None:
    """The first request from zero replicas by phase, with the warm request's TTFT for scale."""
    colds = _measured(run, "scale_to_zero")
    if not colds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.5 * len(colds)))
    _phase_bars(ax, [(r["layer"], r["measurements"]["cold_phases_s"]) for r in colds])
    ax.set_xlabel("seconds from the start of the wake-up")
    reading = "; ".join(
        f"{r['layer']}: {r['measurements']['cold_start_s']:.1f} s from zero to the first token against a warm TTFT "
        f"of {r['measurements']['warm_ttft_ms_p50']:.0f} ms ({r['measurements']['how']})" for r in colds) + "."  # fmt: skip
    return _figure("fig-cold-start", "Cold start from zero replicas", fig, reading)


def canary_figure(run: RunData) -> Figure | None:
    """Requested against observed canary share, with the confidence interval, per layer."""
    canaries = _measured(run, "canary")
    if not canaries:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.5 * len(canaries)))
    names = [r["layer"] for r in canaries]
    split = [r["measurements"]["split"] for r in canaries]
    observed = [s["observed_percent"] for s in split]
    errors = [[o - s["ci_low_percent"] for o, s in zip(observed, split)], [s["ci_high_percent"] - o for o, s in zip(observed, split)]]
    ax.errorbar(observed, names, xerr=errors, fmt="o", color="#4c72b0", capsize=4, label="observed (CI)")
    ax.scatter([s["requested_percent"] for s in split], names, marker="|", s=300, color="#c44e52", label="requested")
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of requests answered by the new revision (%)")
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    reading = "; ".join(
        f"{r['layer']}: {s['observed_percent']:.1f} % observed [{s['ci_low_percent']:.1f}, {s['ci_high_percent']:.1f}] "
        f"for {s['requested_percent']:g} % requested" for r, s in zip(canaries, split)) + "."  # fmt: skip
    return _figure("fig-canary", "Canary split, requested against observed", fig, reading)


def cost_figure(run: RunData) -> Figure | None:
    """Cost per 1,000 requests against the request rate served, one line per layer, one point per stage."""
    from .. import cost

    rows = [r for r in cost.load_point_costs(run.params, run.deployments, run.latency_stages) if r["cost_per_1k_requests"]]
    if not rows:
        return None
    by_layer: dict[str, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    from .table import latency_objectives, meets_objectives

    limits = latency_objectives(run)
    stages = {(s["layer"], s["stage"]): s for s in run.latency_stages}
    for layer, points in by_layer.items():
        points.sort(key=lambda r: r["request_throughput"])
        (line,) = ax.plot([r["request_throughput"] for r in points], [r["cost_per_1k_requests"] for r in points],
                          marker="o", label=layer)  # fmt: skip
        missed = [r for r in points if limits and (layer, r["stage"]) in stages
                  and not meets_objectives(stages[(layer, r["stage"])], limits)]  # fmt: skip
        ax.scatter([r["request_throughput"] for r in missed], [r["cost_per_1k_requests"] for r in missed], s=60,
                   facecolors="white", edgecolors=line.get_color(), zorder=3)  # fmt: skip
    currency = rows[0]["currency"]
    ax.set_xlabel("requests/s served")
    ax.set_ylabel(f"{currency} per 1,000 requests")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    cheapest = {layer: min(points, key=lambda r: r["cost_per_1k_requests"]) for layer, points in by_layer.items()}
    reading = "; ".join(f"{layer} is cheapest at {r['stage']}, {r['cost_per_1k_requests']:.4f} {currency} per 1,000 "
                        f"requests" for layer, r in cheapest.items()) + (
        f" (each replica priced at {rows[0]['price_per_replica_hour']:g} {currency} an hour"
        + ("; hollow points missed the p95 latency objectives" if limits else "") + ")."
    )  # fmt: skip
    return _figure("fig-cost", "Cost per 1,000 requests against load", fig, reading)


def notebook_figures(run_dir: str | os.PathLike, makers: tuple[Callable[[RunData], Figure | None], ...]) -> FigureList:
    """The figures ``makers`` draw from a run, each as PNG beside SVG, as a notebook shows them.

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    makers : tuple of callables
        Figure functions of this module (``RunData`` → ``Figure`` or None when there is nothing to draw).
    """
    from .rundata import load_run
    from .show import FigureList

    run = load_run(run_dir)
    with _drawn_with_png():
        return FigureList([f for f in (make(run) for make in makers) if f is not None])


def lifecycle_figures(run_dir: str | os.PathLike) -> FigureList:
    """The lifecycle figures of a run, for a notebook."""
    return notebook_figures(run_dir, (lifecycle_ready_figure, update_timeline_figure, cold_start_figure, canary_figure))


def telemetry_figure(run: RunData, layer: str) -> Figure | None:
    """KV-cache usage, running and waiting requests, queue time and (when configured) GPU utilisation of one
    layer against the request rate each stage achieved; a hollow marker is a stage that was not valid."""
    stages = sorted((s for s in run.latency_stages if s["layer"] == layer and (s.get("server") or {}).get("available")
                     and isinstance(s.get("summary", {}).get("request_throughput"), int | float)),
                    key=lambda s: s["summary"]["request_throughput"])  # fmt: skip
    if not stages:
        return None
    gpu_key = next((k for s in stages for k in sorted(s.get("gpu") or {}) if k.startswith("mean_")
                    and "util" in k), None)  # fmt: skip
    panels = [("KV cache used (%)", lambda s: _scaled(s["server"], "mean_kv_cache_usage", 100)),
              ("requests (mean)", None), ("queue time, mean (ms)", lambda s: s["server"].get("mean_queue_ms"))]
    if gpu_key:
        panels.append((f"GPU {gpu_key.removeprefix('mean_')}", lambda s: (s.get("gpu") or {}).get(gpu_key)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.6, 2.8))
    x = [s["summary"]["request_throughput"] for s in stages]
    valid = [(s.get("validity") or {}).get("verdict") == "valid" for s in stages]
    for ax, (label, value) in zip(axes, panels):
        series = ([("running", lambda s: s["server"].get("mean_running")),
                   ("waiting", lambda s: s["server"].get("mean_waiting"))] if value is None else [(None, value)])  # fmt: skip
        for name, get in series:
            y = [get(s) for s in stages]
            y = [float("nan") if v is None else v for v in y]
            line = ax.plot(x, y, label=name)[0]
            for xi, yi, ok in zip(x, y, valid):
                ax.plot([xi], [yi], marker="o", color=line.get_color(), markerfacecolor=line.get_color() if ok else "none")
        ax.set_xlabel("requests/s achieved")
        ax.set_title(label, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        if value is None:
            ax.legend(fontsize=7, frameon=False)
    top = stages[-1]
    kv = _scaled(top["server"], "max_kv_cache_usage", 100)
    reading = (f"At {top['summary']['request_throughput']:.2f} req/s ({top['stage']}) {layer}'s KV cache peaked at "
               + (f"{kv:.1f} %" if kv is not None else "an unrecorded level")
               + f", with {top['server'].get('max_waiting') or 0:.0f} requests waiting at most.")
    return _figure(f"fig-telemetry-{_anchor_part(layer)}", f"Server telemetry against load: {layer}", fig, reading)


def _scaled(record: dict, key: str, scale: float) -> float | None:
    value = record.get(key)
    return value * scale if isinstance(value, int | float) else None


def _anchor_part(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())


def telemetry_figures(run: RunData) -> list[Figure]:
    """One telemetry figure per layer whose stages recorded the server's metrics."""
    layers = list(dict.fromkeys(s["layer"] for s in run.latency_stages))
    return [f for f in (telemetry_figure(run, layer) for layer in layers) if f is not None]


def figures(run: RunData) -> list[Figure]:
    """Every figure the report shows, in its order: starts, latency, lifecycle, cost."""
    makers = (time_to_ready_figure, latency_throughput_figure, distributions_figure, goodput_figure,
              lifecycle_ready_figure, update_timeline_figure, cold_start_figure, canary_figure, cost_figure)  # fmt: skip
    return [f for f in (make(run) for make in makers) if f is not None]


def latency_figures(run_dir: str | os.PathLike) -> FigureList:
    """The latency figures of a run, for a notebook."""
    return notebook_figures(run_dir, (latency_throughput_figure, distributions_figure, goodput_figure))
