"""The latency sweeps of a study: closed-loop concurrency stages, then open-loop rate stages, per layer.

Each stage is run the one way every stage is (``servinglab.measure.stage``). Each request's record goes to
``data/latency_requests.jsonl`` as it ends; each stage's summary (client metrics under ``vllm bench
serve``'s names, the server's ``/metrics`` deltas from every pod of the layer, client health) goes to
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

from .. import records
from ..config import Study
from ..measure.loadgen import StageSpec, Target
from ..measure.server_metrics import ServerWindow
from ..measure.stage import StagePlan, run_local, stage_record
from ..measure.workload import DirectoryTokenizer, ServerTokenizer, file_requests, random_requests
from ..platforms import Endpoint, Platform


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


def this_machine() -> str:
    """How a stage names a client that ran here."""
    return f"this machine ({socket.gethostname()})"


def run_layer_sweep(
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, modes: tuple[str, ...] = ("closed", "open")
) -> list[dict[str, Any]]:
    """Every planned stage of the given modes against one layer; returns the stage records.

    With ``workloads.latency.client: in-cluster`` each stage runs as an indexed Job in the cluster
    (:func:`servinglab.experiments.clusterload.run_in_cluster_stage`); the server is still watched from here.
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
    for index, planned in enumerate(p for p in planned_stages(study) if p["mode"] in modes):
        # Seeded per stage, so a stage's prompts do not depend on which stages ran before it.
        seed = w.seed + index
        count = planned["num_prompts"] + w.num_warmups
        if w.prompts_file:
            specs = file_requests(study.resolve_path(w.prompts_file), w.output_len, tokenizer, count)
        else:
            specs = random_requests(tokenizer, count, w.input_len, w.output_len, seed)
        rate = planned["request_rate"] or math.inf
        spec = StageSpec(request_rate=rate, max_concurrency=planned["max_concurrency"], seed=seed,
                         burstiness=w.rate_sweep.burstiness, duration_s=w.stage_duration_s)  # fmt: skip
        plan = StagePlan.make(planned["stage"], specs[w.num_warmups :], specs[: w.num_warmups], spec)
        window = ServerWindow(platform.metrics_targets(endpoint.layer), endpoint, study.telemetry)
        if in_cluster:
            from .clusterload import run_in_cluster_stage

            record = run_in_cluster_stage(study, platform, endpoint.layer, planned, run_dir, plan, window)
        else:
            writer = records.Writer.to_run(run_dir, records.LATENCY_REQUESTS, {"layer": endpoint.layer, "stage": plan.name})
            try:
                with window:
                    merged = run_local(target, plan, writer, slos or None)
            finally:
                writer.close()
            record = stage_record(planned, endpoint.layer, seed, this_machine(), merged.interrupted, merged.summary,
                                  window)  # fmt: skip
            records.append(run_dir, records.LATENCY_STAGES, [record])
        out.append(record)
        if record["server_alive_after"] is False and w.on_server_death == "stop":
            break
    return out


def stages_frame(run_dir: str | os.PathLike):
    """The latency stages of a run, one row each, with the headline metrics flattened."""
    import pandas as pd

    rows = []
    for stage in records.read(run_dir, records.LATENCY_STAGES).rows:
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
    for stage in records.read(run_dir, records.LATENCY_STAGES).rows:
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
