"""The latency sweeps of a study: closed-loop concurrency stages, then open-loop rate stages, per layer.

Each request's record goes to ``data/latency_requests.jsonl`` as it ends; each stage's summary (client
metrics under ``vllm bench serve``'s names, the server's ``/metrics`` deltas, client health) goes to
``data/latency_stages.jsonl`` when the stage ends. A stage whose server died is recorded as such, and the
sweep stops or goes on as ``workloads.latency.on_server_death`` says.
"""

from __future__ import annotations

import math
import os
from typing import Any

import httpx

from . import results, servermetrics
from .bench import REQUESTS_TABLE, STAGES_TABLE, RecordSink
from .config import Study
from .loadgen import StageSpec, Target, run_stage
from .metrics import summarize
from .platforms import Endpoint, Platform
from .workload import DirectoryTokenizer, ServerTokenizer, file_requests, random_requests


def planned_stages(study: Study) -> list[dict[str, Any]]:
    """The stages of the sweep, in order: (name, mode, concurrency, rate, prompts)."""
    w = study.workloads.latency
    stages = [
        {"stage": f"c={c}", "mode": "closed", "max_concurrency": c, "request_rate": None,
         "num_prompts": max(w.min_prompts, w.prompts_per_concurrency * c)}
        for c in w.concurrency
    ]  # fmt: skip
    stages += [
        {"stage": f"rate={r:g}", "mode": "open", "max_concurrency": w.rate_sweep.max_concurrency, "request_rate": r,
         "num_prompts": w.rate_sweep.num_prompts}
        for r in w.rate_sweep.rates
    ]  # fmt: skip
    return stages


def _alive(endpoint: Endpoint) -> bool:
    try:
        return httpx.get(f"{endpoint.root_url}/health", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def run_layer_sweep(
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, modes: tuple[str, ...] = ("closed", "open")
) -> list[dict[str, Any]]:
    """Every planned stage of the given modes against one layer; returns the stage records."""
    w = study.workloads.latency
    if platform.name == "local":
        tokenizer = DirectoryTokenizer(platform.model_dir()[0])
    else:
        tokenizer = ServerTokenizer(endpoint.root_url, endpoint.served_name, endpoint.api_key, endpoint.headers,
                                    endpoint.verify_tls)  # fmt: skip
    target = Target(endpoint.base_url, endpoint.served_name, endpoint.api_key, w.request_timeout_s, w.ignore_eos,
                    headers=tuple(endpoint.headers.items()), verify_tls=endpoint.verify_tls)  # fmt: skip
    slos = study.slos.goodput.limits()
    out = []
    for index, plan in enumerate(p for p in planned_stages(study) if p["mode"] in modes):
        # Seeded per stage, so a stage's prompts do not depend on which stages ran before it.
        seed = w.seed + index
        count = plan["num_prompts"] + w.num_warmups
        if w.prompts_file:
            specs = file_requests(study.resolve_path(w.prompts_file), w.output_len, tokenizer, count)
        else:
            specs = random_requests(tokenizer, count, w.input_len, w.output_len, seed)
        rate = plan["request_rate"] or math.inf
        stage = StageSpec(request_rate=rate, max_concurrency=plan["max_concurrency"], seed=seed,
                          burstiness=w.rate_sweep.burstiness, duration_s=w.stage_duration_s)  # fmt: skip
        sink = RecordSink(results.table_path(run_dir, REQUESTS_TABLE), {"layer": endpoint.layer, "stage": plan["stage"]})
        before = servermetrics.scrape(endpoint.root_url, endpoint.api_key)
        started = servermetrics.now_unix_s()
        try:
            with servermetrics.GaugeSampler(endpoint.root_url, endpoint.api_key) as gauges:
                outcome = run_stage(target, specs[w.num_warmups :], stage, sink, specs[: w.num_warmups])
        finally:
            sink.close()
        after = servermetrics.scrape(endpoint.root_url, endpoint.api_key)
        alive = _alive(endpoint)
        record = plan | {
            "layer": endpoint.layer,
            "source": "servinglab",
            "seed": seed,
            "started_at_unix": started,
            "ended_at_unix": servermetrics.now_unix_s(),
            "interrupted": outcome.interrupted,
            "server_alive_after": alive,
            "summary": summarize(sink.records, outcome.duration_s, slos or None, rate, outcome.send_window_s,
                                 outcome.schedule_lag_ms, outcome.loop_lag_ms),  # fmt: skip
            "server": servermetrics.delta(before, after) | gauges.summary(),
        }
        if study.telemetry.prometheus_url:
            record["gpu"] = servermetrics.prometheus_window(
                study.telemetry.prometheus_url, study.telemetry.queries, started, record["ended_at_unix"]
            )
        results.append_records(run_dir, STAGES_TABLE, [record])
        out.append(record)
        if not alive and w.on_server_death == "stop":
            break
    return out


def stages_frame(run_dir: str | os.PathLike):
    """The latency stages of a run, one row each, with the headline metrics flattened."""
    import pandas as pd

    rows = []
    for stage in results.read_records(run_dir, STAGES_TABLE):
        s = stage["summary"]
        rows.append({
            "layer": stage["layer"], "stage": stage["stage"], "source": stage.get("source"),
            "completed": s.get("completed"), "failed": s.get("failed"),
            "req/s": s.get("request_throughput"), "out tok/s": s.get("output_throughput"),
            "TTFT p50": s.get("median_ttft_ms"), "TTFT p95": s.get("p95_ttft_ms"),
            "TPOT p50": s.get("median_tpot_ms"), "ITL p50": s.get("median_itl_ms"), "ITL p95": s.get("p95_itl_ms"),
            "E2E p50": s.get("median_e2el_ms"), "E2E p95": s.get("p95_e2el_ms"),
            "server TTFT mean": (stage.get("server") or {}).get("mean_ttft_ms"),
            "warnings": "; ".join(s.get("warnings", [])),
        })  # fmt: skip
    return pd.DataFrame(rows)


def run_sweep(
    study: Study,
    platform: Platform,
    run_dir: str | os.PathLike,
    layers: list[str] | None = None,
    modes: tuple[str, ...] = ("closed", "open"),
    deploy_missing: bool = False,
) -> list[dict[str, Any]]:
    """The sweep against every layer the platform hosts (all of the study's when ``layers`` is empty).

    ``deploy_missing`` deploys a layer that is not running (a notebook run on its own).
    """
    from .deploy import running_endpoints

    stages = []
    for endpoint in running_endpoints(study, platform, run_dir, layers, deploy_missing):
        stages += run_layer_sweep(study, platform, endpoint, run_dir, modes)
    return stages


def server_vs_client_frame(run_dir: str | os.PathLike):
    """Client-side TTFT next to the server's own (its histogram's mean), per stage."""
    import pandas as pd

    rows = []
    for stage in results.read_records(run_dir, STAGES_TABLE):
        server = stage.get("server") or {}
        rows.append({
            "layer": stage["layer"], "stage": stage["stage"],
            "client TTFT mean (ms)": stage["summary"].get("mean_ttft_ms"),
            "server TTFT mean (ms)": server.get("mean_ttft_ms"),
            "client E2E mean (ms)": stage["summary"].get("mean_e2el_ms"),
            "server E2E mean (ms)": server.get("mean_e2el_ms"),
            "server max running": server.get("max_running"), "server max waiting": server.get("max_waiting"),
            "server max KV-cache usage": server.get("max_kv_cache_usage"),
        })  # fmt: skip
    return pd.DataFrame(rows)
