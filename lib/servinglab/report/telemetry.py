"""What the server and the GPUs did under each load: the telemetry the stages recorded, per layer.

Every value comes from the stage records (``server``: vLLM's gauges sampled during the stage and its
histograms' deltas, merged over every pod; ``gpu``: the Prometheus window when telemetry was configured).
Nothing is re-measured here; a stage whose validity check failed stays in the table, marked, since its
telemetry still says what the server saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..measure.server_metrics import figure_text
from .rundata import RunData

# (column title, key in the stage's ``server`` record, scale to the unit shown, decimals)
SERVER_COLUMNS = (
    ("KV cache mean %", "mean_kv_cache_usage", 100.0, 1),
    ("KV cache max %", "max_kv_cache_usage", 100.0, 1),
    ("running mean", "mean_running", 1.0, 1),
    ("running max", "max_running", 1.0, 0),
    ("waiting mean", "mean_waiting", 1.0, 1),
    ("waiting max", "max_waiting", 1.0, 0),
)
# Shown only when some stage recorded them (a vLLM without prefix caching, or an older run, has none).
OPTIONAL_COLUMNS = (
    ("prefix-cache hit %", "prefix_cache_hit_rate", 100.0, 1),
    ("preemptions", "preemptions_total", 1.0, 0),
)


@dataclass
class TelemetryRow:
    stage: str
    valid: bool
    verdict: str
    request_rate_per_s: float | None
    cells: list[str]


@dataclass
class LayerTelemetry:
    layer: str
    pods: int | None
    columns: list[str]
    rows: list[TelemetryRow] = field(default_factory=list)
    gpu_queries: list[str] = field(default_factory=list)
    unavailable: str | None = None


def _number(value: Any, scale: float, decimals: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    return f"{value * scale:.{decimals}f}"


def _load_order(stage: dict[str, Any]) -> tuple[int, float]:
    rate = stage.get("request_rate")
    return (0, stage.get("max_concurrency") or 0) if stage.get("mode") == "closed" else (
        1, rate if isinstance(rate, int | float) else float("inf"))  # fmt: skip


def gpu_query_names(stages: list[dict[str, Any]]) -> list[str]:
    """The GPU telemetry queries some stage of these holds a value for (``mean_<name>`` in its ``gpu``)."""
    names = {k.removeprefix("mean_") for s in stages for k in (s.get("gpu") or {}) if k.startswith("mean_")}
    return sorted(names)


def telemetry_section(run: RunData) -> list[LayerTelemetry]:
    """Per layer that has server telemetry, one row per stage in load order (closed loops, then rates)."""
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for stage in run.latency_stages:
        if stage.get("server") is not None or stage.get("gpu"):
            by_layer.setdefault(stage["layer"], []).append(stage)
    out = []
    for layer, stages in by_layer.items():
        stages.sort(key=_load_order)
        gpu_names = gpu_query_names(stages)
        server_columns = SERVER_COLUMNS + tuple(
            c for c in OPTIONAL_COLUMNS if any((s.get("server") or {}).get(c[1]) is not None for s in stages))
        columns = ["stage", "req/s", *(c[0] for c in server_columns), "queue mean ms", "queue p99 ms",
                   *(f"{n} mean / max" for n in gpu_names)]  # fmt: skip
        section = LayerTelemetry(layer, None, columns, gpu_queries=gpu_names)
        if all(not (s.get("server") or {}).get("available") for s in stages):
            section.unavailable = "the server's /metrics could not be read during any stage"
        for stage in stages:
            server = stage.get("server") or {}
            section.pods = section.pods or server.get("pods")
            gpu = stage.get("gpu") or {}
            verdict = (stage.get("validity") or {}).get("verdict") or "unchecked"
            rate = stage.get("summary", {}).get("request_throughput")
            cells = [_number(rate, 1.0, 2)]
            cells += [_number(server.get(key), scale, decimals) for _, key, scale, decimals in server_columns]
            cells += [figure_text(server, "mean_queue_ms"), figure_text(server, "p99_queue_ms")]
            cells += [f"{_number(gpu.get(f'mean_{n}'), 1.0, 1)} / {_number(gpu.get(f'max_{n}'), 1.0, 1)}"
                      for n in gpu_names]  # fmt: skip
            section.rows.append(TelemetryRow(stage["stage"], verdict == "valid", verdict,
                                             rate if isinstance(rate, int | float) else None, cells))  # fmt: skip
        out.append(section)
    return out
