"""A run's latency stages as llm-d-benchmark "Benchmark Report" documents, one per layer and load point.

The format followed is llm-d-benchmark's Benchmark Report v0.2.1, as published in the llm-d/llm-d-benchmark
repository under ``llmdbenchmark/analysis/benchmark_report/`` at commit 8bc9f1ddd873: its JSON schema
``br_v0_2_1_json_schema.json``, its pydantic models (``schema_v0_2_1.py``, which extends ``schema_v0_2.py``
and ``schema_v0_2_components.py``; ``base.py`` for the ``Units`` enum) and its loader
(``core.load_benchmark_report``), with its example ``br_v0_2_1_example.yaml``. v0.2.1 only adds optional
fields to v0.2, none of which servinglab writes, so a v0.2 document (written on request, for readers that
predate v0.2.1) differs from the default one in its ``version`` alone. Fields written:

- ``version: "0.2.1"`` (or ``"0.2"``);
- ``run``: ``uid`` (one per report), ``eid`` (one per run directory), ``time`` (``start``, ``end``,
  ``duration`` as ISO 8601); ``cid``, ``pid`` and ``user`` are left out (nothing in a run names them);
- ``scenario.stack``: each component's ``kind`` in its ``standardized`` section, where the format
  discriminates on it (its ``metadata`` takes no other key than ``schema_version``, ``label``, ``cfg_id``
  and ``description``). The engine as an ``inference_engine`` component (``tool``, ``tool_version``,
  ``role: replica``, ``replicas``, ``model.name``, ``accelerator`` with ``model``, ``count`` per replica,
  as llm-d-benchmark's own converters count it, and ``parallelism``; the engine's arguments under
  ``native.args``), and for a KServe or llm-d layer the serving layer as a ``generic`` component (the
  kind whose ``standardized`` section takes extra keys: ``resource`` and, for KServe, ``deployment_mode``)
  whose ``native.config`` is the layer's study settings;
- ``scenario.load``: ``tool`` (``servinglab``, or ``vllm-benchmark`` for imported ``vllm bench serve``
  results, llm-d-benchmark's name for that harness), ``tool_version``, ``source`` (random or sampled),
  ``stage`` (the stage's index in the layer's sweep), ``input_seq_len`` and ``output_seq_len``,
  ``rate_qps`` and ``concurrency``; the stage as planned under ``native.config``;
- ``results.request_performance.aggregate``: ``requests`` (``total``, ``failures``, ``incomplete``,
  ``input_length``, ``output_length``), ``latency`` (``time_to_first_token``, ``time_per_output_token``,
  ``inter_token_latency``, ``request_latency``, ``normalized_time_per_output_token``) and ``throughput``
  (``input_token_rate``, ``output_token_rate``, ``total_token_rate``, ``request_rate``), each a
  Statistics block: ``units`` and ``mean``, with ``stddev``, ``min``, ``p0p1`` … ``p99p9`` and ``max``
  where known.

Latency and length statistics are computed from the stage's per-request records
(``data/latency_requests.jsonl``), with the definitions of :mod:`servinglab.measure.client_metrics`: TTFT and E2E of
every completed request, TPOT = (E2E − TTFT)/(output tokens − 1) per request, ITL every gap between
token-bearing chunks pooled, NTPOT = E2E / output tokens per request. A stage without records (imported
``vllm bench serve`` results) gives what its summary holds: the mean, standard deviation and the
percentiles ``vllm bench serve`` saved, no minimum or maximum and no NTPOT. Times are in ms, as
``vllm bench serve`` and llm-d-benchmark's own import of it report them. Throughputs are the stage's
totals divided by its duration, so only their ``mean`` is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..errors import ParamsError, RunDirError
from ..measure.client_metrics import itl_ms, tpot_ms
from . import file_in, reports_folder
from .table import requires
from .rundata import RunData, load_run
from .runfacts import accelerator, args_dict, engine_command_args

# The Benchmark Report versions written, the default first.
FORMAT_VERSIONS = ("0.2.1", "0.2")
DEFAULT_FORMAT_VERSION = FORMAT_VERSIONS[0]
COMPONENT_SCHEMA_VERSION = "0.0.1"
IMPORTED_SOURCE = "vllm bench serve"
# llm-d-benchmark's name for vllm bench serve (its WorkloadGenerator enum).
VLLM_BENCH_TOOL = "vllm-benchmark"
# Percentile → Statistics key, as llm-d-benchmark names them.
PERCENTILE_KEYS = {0.1: "p0p1", 1: "p1", 5: "p5", 10: "p10", 25: "p25", 50: "p50", 75: "p75", 90: "p90", 95: "p95",
                   99: "p99", 99.9: "p99p9"}  # fmt: skip
LATENCY_FIELDS = {  # report field → (vllm bench serve metric, units)
    "time_to_first_token": ("ttft", "ms"),
    "time_per_output_token": ("tpot", "ms/token"),
    "inter_token_latency": ("itl", "ms/token"),
    "request_latency": ("e2el", "ms"),
}
ID_NAMESPACE = uuid.UUID("6f1b7c4e-2f0a-5d2e-9a7b-3c1d0e8f4a21")  # servinglab's own: ids derive from run and stage


# --- statistics --------------------------------------------------------------------------------------


def statistics_of(values: list[float], units: str) -> dict[str, Any] | None:
    """A Statistics block (units, mean, stddev, min, percentiles, max) of values; None when there are none."""
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"units": units, "mean": float(np.mean(array)), "stddev": float(np.std(array)),
                           "min": float(np.min(array))}  # fmt: skip
    for p, key in PERCENTILE_KEYS.items():
        out[key] = float(np.percentile(array, p))
    out["max"] = float(np.max(array))
    return out


def statistics_from_summary(summary: dict[str, Any], metric: str, units: str) -> dict[str, Any] | None:
    """A Statistics block from ``vllm bench serve``'s keys (``mean_ttft_ms``, ``p99_ttft_ms``, ...); None
    without a mean, which the format requires."""
    mean = summary.get(f"mean_{metric}_ms")
    if mean is None:
        return None
    out: dict[str, Any] = {"units": units, "mean": float(mean)}
    if summary.get(f"std_{metric}_ms") is not None:
        out["stddev"] = float(summary[f"std_{metric}_ms"])
    for p, key in PERCENTILE_KEYS.items():
        value = summary.get(f"median_{metric}_ms") if p == 50 else None
        if value is None:
            value = summary.get(f"p{p:g}_{metric}_ms")
        if value is not None:
            out[key] = float(value)
    return out


def _rate(value: Any, units: str) -> dict[str, Any] | None:
    return {"units": units, "mean": float(value)} if isinstance(value, (int, float)) and math.isfinite(value) else None


# --- matching stages and their records ----------------------------------------------------------------


# --- the report ---------------------------------------------------------------------------------------


def _iso(unix_s: float | None) -> str | None:
    if unix_s is None:
        return None
    return datetime.fromtimestamp(unix_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _vllm_date(text: str | None) -> str | None:
    """``vllm bench serve``'s ``YYYYMMDD-HHMMSS`` (UTC) as ISO 8601."""
    if not text or not re.fullmatch(r"\d{8}-\d{6}", text):
        return None
    return datetime.strptime(text, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def _cfg_id(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _stack(run: RunData, layer: str, stage: dict[str, Any]) -> list[dict[str, Any]]:
    spec = run.layers.get(layer, {})
    kind = run.kind_of_layer(layer)
    engine = run.context.get("engine", {})
    args = args_dict(engine_command_args(run, layer))
    deployment = run.last_deployment(layer) or {}
    model_name = (run.params.get("model", {}).get("name") or (stage.get("context") or {}).get("model_id")
                  or run.context.get("model", {}).get("name") or "unknown")  # fmt: skip
    accel = accelerator(run)
    tp = int(args.get("--tensor-parallel-size") or 1)
    pp = int(args.get("--pipeline-parallel-size") or 1)
    dp = int(args.get("--data-parallel-size") or 1)
    tool = engine.get("distribution") or engine.get("name") or "vllm"
    version = engine.get("version") or engine.get("image") or "unknown"
    # The format counts a replica's accelerators and the replicas apart (``count`` is tp × local dp in
    # llm-d-benchmark's converters); the format needs at least one replica.
    replicas = max(1, int(deployment.get("serving_replicas") or 1))
    count = max(1, int(accel["count"])) if accel["gpu"] else 1
    platform = run.context.get("platform", {}).get("name") or run.params.get("platform", {}).get("kind") or "unknown"
    stack = [{
        "metadata": {
            "schema_version": COMPONENT_SCHEMA_VERSION,
            "label": f"{layer}-engine",
            "cfg_id": (deployment.get("spec_hash") or _cfg_id(args))[:32],
            "description": f"the vLLM engine of layer {layer} ({kind['title']}) on the {platform} "
                           f"platform; {accel['text']}",
        },
        "standardized": {
            "kind": "inference_engine",
            "tool": tool,
            "tool_version": str(version),
            "role": "replica",
            "replicas": replicas,
            "model": {"name": model_name},
            "accelerator": {"model": accel["model"], "count": count, "parallelism": {"dp": dp, "ep": 1, "pp": pp, "tp": tp}},
        },
        "native": {"args": args} if args else {},
    }]  # fmt: skip
    component = kind.get("component")
    if component:
        controllers = requires(run, layer).get("controllers") or []
        versions = sorted({c["version"] for c in controllers if c.get("version")})
        standardized = {"kind": "generic", "tool": component["tool"], "tool_version": versions[-1] if versions else "unknown",
                        "resource": component["resource"]}  # fmt: skip
        if spec.get("mode"):
            standardized["deployment_mode"] = spec["mode"]
        stack.append({
            "metadata": {"schema_version": COMPONENT_SCHEMA_VERSION, "label": layer,
                         "cfg_id": _cfg_id(spec), "description": f"the {kind['title']} in front of the engine"},
            "standardized": standardized,
            "native": {"config": spec},
        })  # fmt: skip
    return stack


def _load(run: RunData, stage: dict[str, Any], index: int) -> dict[str, Any]:
    imported = stage.get("source") == IMPORTED_SOURCE
    workload = run.params.get("workloads", {}).get("latency", {})
    summary = stage["summary"]
    if imported:
        context = stage.get("context") or {}
        completed = summary.get("completed") or 0
        mean_in = (summary.get("total_input_tokens") or 0) / completed if completed else 0
        mean_out = (summary.get("total_output_tokens") or 0) / completed if completed else 0
        # The saved result keeps token totals, not the requested lengths: their means stand in for them.
        standardized = {
            "tool": VLLM_BENCH_TOOL, "tool_version": "unknown", "source": "random", "stage": index,
            "input_seq_len": {"distribution": "other", "value": max(1, round(mean_in))},
        }  # fmt: skip
        if mean_out >= 1:
            standardized["output_seq_len"] = {"distribution": "other", "value": round(mean_out)}
        native: dict[str, Any] = {"config": {**context, "source_file": Path(stage.get("source_file") or "").name}}
        description = f"vllm bench serve results imported from {Path(stage.get('source_file') or '?').name}"
    else:
        standardized = {
            "tool": "servinglab", "tool_version": run.context.get("servinglab_version") or "unknown",
            "source": "sampled" if workload.get("prompts_file") else "random", "stage": index,
            "input_seq_len": {"distribution": "fixed", "value": workload.get("input_len") or 1},
        }  # fmt: skip
        completed = summary.get("completed") or 0
        if workload.get("prompts_file") and completed and summary.get("total_input_tokens"):
            # Prompts from a file have their own lengths: the mean the server counted stands in for them.
            mean_in = summary["total_input_tokens"] / completed
            standardized["input_seq_len"] = {"distribution": "other", "value": max(1, round(mean_in))}
        if workload.get("ignore_eos") and workload.get("output_len"):
            standardized["output_seq_len"] = {"distribution": "fixed", "value": workload["output_len"]}
        plan = {k: stage.get(k) for k in ("stage", "mode", "max_concurrency", "request_rate", "num_prompts", "seed", "client")
                if stage.get(k) is not None}  # fmt: skip
        workload_config = {k: v for k, v in workload.items() if k not in ("concurrency", "sweep", "rate_sweep") and v is not None}
        native = {"config": {"stage": plan, "workload": workload_config}}
        description = (f"chat completions, streamed; {stage.get('mode')} loop"
                       f"{' at concurrency ' + str(stage['max_concurrency']) if stage.get('max_concurrency') else ''}"
                       f"{' at ' + format(stage['request_rate'], 'g') + ' req/s' if stage.get('request_rate') else ''}"
                       "; input_seq_len counts prompt tokens before the chat template")  # fmt: skip
    rate = stage.get("request_rate")
    if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
        standardized["rate_qps"] = float(rate)
    if stage.get("max_concurrency"):
        standardized["concurrency"] = int(stage["max_concurrency"])
    return {
        "metadata": {"schema_version": COMPONENT_SCHEMA_VERSION, "cfg_id": _cfg_id([standardized, native]),
                     "description": description},
        "standardized": standardized,
        "native": native,
    }  # fmt: skip


def _aggregate(stage: dict[str, Any], records: list[dict[str, Any]] | None) -> dict[str, Any]:
    summary = stage["summary"]
    if records is not None:
        done = [r for r in records if r.get("ok")]
        failed = [r for r in records if not r.get("ok")]
        cancelled = [r for r in failed if r.get("error_kind") == "cancelled"]
        requests: dict[str, Any] = {
            "total": len(records), "failures": len(failed) - len(cancelled), "incomplete": len(cancelled),
        }  # fmt: skip
        lengths = {
            "input_length": [r["prompt_tokens"] for r in done if r.get("prompt_tokens") is not None],
            "output_length": [r["output_tokens"] for r in done if r.get("output_tokens") is not None],
        }
        for name, values in lengths.items():
            if (stats := statistics_of(values, "count")) is not None:
                requests[name] = stats
        series = {
            "time_to_first_token": [r["ttft_ms"] for r in done if r.get("ttft_ms") is not None],
            "time_per_output_token": [t for r in done if (t := tpot_ms(r)) is not None],
            "inter_token_latency": [gap for r in done for gap in itl_ms(r)],
            "request_latency": [r["e2el_ms"] for r in done if r.get("e2el_ms") is not None],
            "normalized_time_per_output_token": [r["e2el_ms"] / r["output_tokens"] for r in done
                                                 if r.get("e2el_ms") is not None and r.get("output_tokens")],
        }  # fmt: skip
        units = {name: u for name, (_, u) in LATENCY_FIELDS.items()} | {"normalized_time_per_output_token": "ms/token"}
        latency = {name: s for name, values in series.items() if (s := statistics_of(values, units[name])) is not None}
        # The stage's duration (its start to the end of its last request) is in its summary only.
        duration = summary.get("duration") or 0
        input_tokens = sum(r.get("prompt_tokens") or 0 for r in done)
        output_tokens = sum(r.get("output_tokens") or 0 for r in done)
        totals = (len(done), input_tokens, output_tokens, input_tokens + output_tokens)
        request_rate, input_rate, output_rate, total_rate = (v / duration if duration > 0 else None for v in totals)
    else:
        completed, failed_count = summary.get("completed") or 0, summary.get("failed") or 0
        requests = {"total": completed + failed_count, "failures": failed_count}
        completed_n = completed or None
        for name, key in (("input_length", "total_input_tokens"), ("output_length", "total_output_tokens")):
            if summary.get(key) is not None and completed_n:
                requests[name] = {"units": "count", "mean": summary[key] / completed_n}
        latency = {
            name: s for name, (metric, units) in LATENCY_FIELDS.items()
            if (s := statistics_from_summary(summary, metric, units)) is not None
        }  # fmt: skip
        duration = summary.get("duration") or 0
        request_rate = summary.get("request_throughput")
        output_rate = summary.get("output_throughput")
        total_rate = summary.get("total_token_throughput")
        input_tokens = summary.get("total_input_tokens")
        input_rate = input_tokens / duration if input_tokens is not None and duration else None
    throughput = {
        name: s for name, s in (
            ("input_token_rate", _rate(input_rate, "tokens/s")),
            ("output_token_rate", _rate(output_rate, "tokens/s")),
            ("total_token_rate", _rate(total_rate, "tokens/s")),
            ("request_rate", _rate(request_rate, "queries/s")),
        ) if s is not None
    }  # fmt: skip
    aggregate: dict[str, Any] = {"requests": requests}
    if latency:
        aggregate["latency"] = latency
    if throughput:
        aggregate["throughput"] = throughput
    return aggregate


def _run_section(run: RunData, stage: dict[str, Any], occurrence: int) -> dict[str, Any]:
    name = f"{run.study}/{run.run_id}"
    uid = uuid.uuid5(ID_NAMESPACE, f"{name}/{stage['layer']}/{stage['stage']}/{occurrence}")
    time: dict[str, Any] = {}
    start = _iso(stage.get("started_at_unix")) or _vllm_date((stage.get("context") or {}).get("date"))
    end = _iso(stage.get("ended_at_unix"))
    if start:
        time["start"] = start
    if end:
        time["end"] = end
    duration = stage["summary"].get("duration")
    if isinstance(duration, (int, float)) and math.isfinite(duration):
        time["duration"] = f"PT{duration:.3f}S"
    out: dict[str, Any] = {"uid": str(uid), "eid": str(uuid.uuid5(ID_NAMESPACE, name))}
    if time:
        out["time"] = time
    return out


def benchmark_reports(run_dir: str | os.PathLike,
                      format_version: str = DEFAULT_FORMAT_VERSION) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """Every latency stage of a run as a Benchmark Report: (file name, report), in the run's order.

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    format_version : str
        The Benchmark Report version to write, one of ``FORMAT_VERSIONS`` (default ``"0.2.1"``).
    """
    _check_format_version(format_version)
    return _reports_of(load_run(run_dir), run_dir, format_version)


def _check_format_version(format_version: str) -> None:
    if format_version not in FORMAT_VERSIONS:
        raise ParamsError(f"format version {format_version!r}: servinglab writes llm-d-benchmark Benchmark "
                          f"Report {' or '.join(FORMAT_VERSIONS)}")  # fmt: skip


def _reports_of(run: RunData, run_dir: str | os.PathLike, format_version: str) -> list[tuple[str, dict[str, Any]]]:
    if not run.latency_stages:
        raise RunDirError(f"{run_dir}: no latency stage in this run; nothing to export")
    out = []
    seen: dict[tuple[str, str], int] = {}
    index_in_layer: dict[str, int] = {}
    for stage, records in run.stage_requests():
        key = (stage["layer"], stage["stage"])
        seen[key] = seen.get(key, 0) + 1
        index = index_in_layer.get(stage["layer"], 0)
        index_in_layer[stage["layer"]] = index + 1
        report = {
            "version": format_version,
            "run": _run_section(run, stage, seen[key]),
            "scenario": {"stack": _stack(run, stage["layer"], stage), "load": _load(run, stage, index)},
            "results": {"request_performance": {"aggregate": _aggregate(stage, records)}},
        }
        slug = re.sub(r"[^A-Za-z0-9._-]+", "", stage["stage"].replace("=", "")) or "stage"
        suffix = f"-{seen[key]}" if seen[key] > 1 else ""
        out.append((f"br_v{format_version}_{stage['layer']}_{slug}{suffix}.yaml", report))
    return out


def export_llmd_benchmark(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                          warn: Callable[[str], None] | None = None,
                          format_version: str = DEFAULT_FORMAT_VERSION) -> list[Path]:  # fmt: skip
    """Write each latency stage of a run as an llm-d-benchmark Benchmark Report (YAML).

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    out_dir : path, optional
        The folder to write into; defaults to ``reports/llmd-benchmark/<study>-<run-id>/`` of the current
        project (the working directory), never to a folder the run directory names.
    warn : callable, optional
        Called with one sentence per data file holding lines that could not be read (and are not exported).
    format_version : str
        The Benchmark Report version to write, one of ``FORMAT_VERSIONS``: ``"0.2.1"`` (the default, the newest
        version llm-d-benchmark defines) or ``"0.2"``; it also names the files (``br_v0.2.1_...``).

    Returns the files written, one per layer and load point.
    """
    _check_format_version(format_version)
    run = load_run(run_dir)
    if warn is not None:
        for warning in run.damaged:
            warn(warning)
    reports = _reports_of(run, run_dir, format_version)
    if out_dir is None:
        out_dir = file_in(reports_folder() / "llmd-benchmark", f"{run.study}-{run.run_id}")
    folder = reports_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, report in reports:
        path = file_in(folder, name)
        path.write_text(yaml.safe_dump(report, sort_keys=False, allow_unicode=True), encoding="utf-8")
        paths.append(path)
    return paths


__all__ = ["DEFAULT_FORMAT_VERSION", "FORMAT_VERSIONS", "benchmark_reports", "export_llmd_benchmark", "statistics_of"]
