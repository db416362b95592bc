"""The latency sweeps of a study: closed-loop concurrency stages, then open-loop rate stages, per layer.

Each request's record goes to ``data/latency_requests.jsonl`` as it ends; each stage's summary (client
metrics under ``vllm bench serve``'s names, the server's ``/metrics`` deltas, client health) goes to
``data/latency_stages.jsonl`` when the stage ends. A stage whose server died is recorded as such, and the
sweep stops or goes on as ``workloads.latency.on_server_death`` says.

The load comes from this machine, or, with ``workloads.latency.client: in-cluster``, from an indexed Job
in the cluster (``clusterload``); every stage records where its client ran.
"""

from __future__ import annotations

import math
import os
import socket
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


class ServerWindow:
    """The server's side of one stage, seen from this machine: ``/metrics`` before and after, its gauges
    while the stage runs, its health after, and GPU telemetry over the stage's time window.

    Without an endpoint (a server this machine cannot reach) only the time window is recorded.
    """

    def __init__(self, study: Study, endpoint: Endpoint | None) -> None:
        self.study, self.endpoint = study, endpoint
        self.gauges: servermetrics.GaugeSampler | None = None
        self.before: dict[str, Any] | None = None
        self.fields: dict[str, Any] = {}

    def __enter__(self) -> ServerWindow:
        if self.endpoint is not None:
            self.before = servermetrics.scrape(self.endpoint.root_url, self.endpoint.api_key)
            self.gauges = servermetrics.GaugeSampler(self.endpoint.root_url, self.endpoint.api_key).__enter__()
        self.fields["started_at_unix"] = servermetrics.now_unix_s()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.gauges is not None:
            self.gauges.__exit__(*exc)
        if exc[0] is not None:
            return
        if self.endpoint is not None:
            after = servermetrics.scrape(self.endpoint.root_url, self.endpoint.api_key)
            self.fields["server_alive_after"] = _alive(self.endpoint)
            self.fields["server"] = servermetrics.delta(self.before, after) | self.gauges.summary()
        else:
            self.fields["server_alive_after"] = None
            self.fields["server"] = {"available": False}
        self.fields["ended_at_unix"] = servermetrics.now_unix_s()
        if self.study.telemetry.prometheus_url:
            self.fields["gpu"] = servermetrics.prometheus_window(
                self.study.telemetry.prometheus_url, self.study.telemetry.queries, self.fields["started_at_unix"],
                self.fields["ended_at_unix"],
            )


def stage_record(
    plan: dict[str, Any], layer: str, seed: int, client: str, interrupted: bool, summary: dict[str, Any],
    window: ServerWindow,
) -> dict[str, Any]:  # fmt: skip
    """A stage's row of ``data/latency_stages.jsonl``: the planned stage, where its client ran, what it measured.

    Parameters
    ----------
    plan : dict
        The stage as :func:`planned_stages` lists it.
    layer : str
        The layer measured.
    seed : int
        The seed of the stage's prompts and arrivals.
    client : str
        Where the load generator ran (this machine's name, or the in-cluster Job and its pods).
    interrupted : bool
        Whether the stage was stopped before its requests were all sent.
    summary : dict
        The client-side metrics (:func:`servinglab.metrics.summarize`).
    window : ServerWindow
        The server's side of the stage, exited.
    """
    fields = window.fields
    record = plan | {
        "layer": layer,
        "source": "servinglab",
        "seed": seed,
        "client": client,
        "started_at_unix": fields["started_at_unix"],
        "ended_at_unix": fields["ended_at_unix"],
        "interrupted": interrupted,
        "server_alive_after": fields["server_alive_after"],
        "summary": summary,
        "server": fields["server"],
    }
    if "gpu" in fields:
        record["gpu"] = fields["gpu"]
    return record


def this_machine() -> str:
    """How a stage names a client that ran here."""
    return f"this machine ({socket.gethostname()})"


def run_layer_sweep(
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, modes: tuple[str, ...] = ("closed", "open")
) -> list[dict[str, Any]]:
    """Every planned stage of the given modes against one layer; returns the stage records.

    With ``workloads.latency.client: in-cluster`` each stage runs as an indexed Job in the cluster
    (:func:`servinglab.clusterload.run_in_cluster_stage`); the server is still watched from here.
    """
    w = study.workloads.latency
    in_cluster = w.client == "in-cluster" and platform.name == "kubernetes"
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
        warmups, requests = specs[: w.num_warmups], specs[w.num_warmups :]
        if in_cluster:
            from .clusterload import run_in_cluster_stage

            record = run_in_cluster_stage(study, platform, endpoint.layer, plan, run_dir, requests, warmups, stage,
                                          endpoint=endpoint)  # fmt: skip
        else:
            sink = RecordSink(results.table_path(run_dir, REQUESTS_TABLE), {"layer": endpoint.layer, "stage": plan["stage"]})
            try:
                with ServerWindow(study, endpoint) as window:
                    outcome = run_stage(target, requests, stage, sink, warmups)
            finally:
                sink.close()
            summary = summarize(sink.records, outcome.duration_s, slos or None, rate, outcome.send_window_s,
                                outcome.schedule_lag_ms, outcome.loop_lag_ms)  # fmt: skip
            record = stage_record(plan, endpoint.layer, seed, this_machine(), outcome.interrupted, summary, window)
            results.append_records(run_dir, STAGES_TABLE, [record])
        out.append(record)
        if record["server_alive_after"] is False and w.on_server_death == "stop":
            break
    return out


def stages_frame(run_dir: str | os.PathLike):
    """The latency stages of a run, one row each, with the headline metrics flattened."""
    import pandas as pd

    rows = []
    for stage in results.read_records(run_dir, STAGES_TABLE):
        s = stage["summary"]
        rows.append({
            "layer": stage["layer"], "stage": stage["stage"], "source": stage.get("source"), "client": stage.get("client"),
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
