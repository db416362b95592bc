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
import uuid
from typing import Any, Callable

from .. import progress, records
from ..config import Study
from ..measure.client import ENGINE_PROCESSES, run_local, workers_for
from ..measure.loadgen import StageSpec, Target
from ..measure.server_metrics import ServerWindow, figure_text
from ..measure.stage import MergedStage, StagePlan, stage_end_line, stage_record
from ..measure.workload import DirectoryTokenizer, ServerTokenizer, file_requests, random_requests
from ..platforms import Endpoint, Platform, placement


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
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, modes: tuple[str, ...] = ("closed", "open"),
    say: Callable[[str], None] | None = progress.say,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every planned stage of the given modes against one layer, each measured ``repeats`` times; returns the
    stage records.

    With ``workloads.latency.client: in-cluster`` each stage runs as an indexed Job in the cluster
    (:mod:`servinglab.experiments.clusterload`); the server is still watched from here. A sweep stops going
    higher after a stage that was not valid, unless ``workloads.latency.past_validity`` says to go on.
    """
    w = study.workloads.latency
    in_cluster = w.client == "in-cluster" and platform.name == "kubernetes"
    if platform.name == "local":
        tokenizer = DirectoryTokenizer(platform.model_dir()[0])
    else:
        tokenizer = ServerTokenizer(endpoint.root_url, endpoint.served_name, endpoint.api_key, endpoint.headers,
                                    endpoint.verify_tls, endpoint.proxy)  # fmt: skip
    target = Target(endpoint.base_url, endpoint.served_name, endpoint.api_key, w.request_timeout_s, w.ignore_eos,
                    headers=tuple(endpoint.headers.items()), verify_tls=endpoint.verify_tls,
                    proxy=endpoint.proxy)  # fmt: skip
    slos = study.slos.goodput.limits() or None
    cpus = platform.client_cpus(endpoint.layer)
    cores = len(cpus) if cpus else len(placement.usable_cores())
    engine_here = ENGINE_PROCESSES if platform.name == "local" and not cpus else 0
    out: list[dict[str, Any]] = []
    stopped: set[str] = set()  # the modes whose sweep stopped at a stage that was not valid
    expected_e2e_s: float | None = None
    for index, planned in enumerate(p for p in planned_stages(study) if p["mode"] in modes):
        if planned["mode"] in stopped:
            continue
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
        stage_id = uuid.uuid4().hex[:12]  # ties the request records to this measurement of the stage
        runs: list[MergedStage] = []
        if in_cluster:
            from .clusterload import client_description, run_in_cluster

            for repeat in range(w.repeats):
                runs.append(run_in_cluster(study, platform, endpoint.layer, run_dir, plan, window, repeat, stage_id))
                if runs[-1].interrupted:
                    break
            extra: dict[str, Any] = {"client_pods": [c | {"repeat": i} for i, run in enumerate(runs) for c in run.clients]}
            client = client_description(study, endpoint.layer)
        else:
            rule = workers_for(w.workers, spec, cores, engine_here, expected_e2e_s)
            for repeat in range(w.repeats):
                writer = records.Writer.to_run(run_dir, records.LATENCY_REQUESTS, {
                    "layer": endpoint.layer, "stage": plan.name, "stage_id": stage_id, "repeat": repeat,
                    "provenance": "measured"})  # fmt: skip
                # Closing the writer (also on Ctrl-C) writes and syncs every record the stage handed to it.
                with writer, placement.client_on(cpus), window:
                    runs.append(run_local(target, plan, writer, slos, rule.workers, cpus))
                if runs[-1].interrupted:
                    break
            extra = {"client_workers": rule.workers, "client_workers_rule": rule.text,
                     "client_cpus": list(cpus) if cpus else None}  # fmt: skip
            client = this_machine()
        record = stage_record(planned, endpoint.layer, seed, client, runs, window, slos, stage_id=stage_id, **extra)
        verdict = record["validity"]["verdict"]
        if verdict != "valid" and not w.past_validity:
            record["stopped_sweep"] = True  # nothing higher is measured: it would only be less valid
            stopped.add(planned["mode"])
        records.append(run_dir, records.LATENCY_STAGES, [record])
        expected_e2e_s = (record["summary"].get("mean_e2el_ms") or 0) / 1000 or expected_e2e_s
        out.append(record)
        if say is not None:
            say(stage_line(record))
        if record["server_alive_after"] is False and w.on_server_death == "stop":
            break
    return out


def stage_line(record: dict[str, Any]) -> str:
    """One line for a stage as it ends: its headline numbers and its validity."""
    line = stage_end_line(record)
    if record.get("stopped_sweep"):
        line += " (the sweep stops here: workloads.latency.past_validity is false)"
    return line


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
            "validity": (stage.get("validity") or {}).get("verdict", "unchecked"),
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
    say: Callable[[str], None] | None = progress.say,
) -> list[dict[str, Any]]:
    """The sweep against every layer the platform hosts (all of the study's when ``layers`` is empty).

    ``deploy_missing`` deploys a layer that is not running (a notebook run on its own); ``say`` gets one line
    per stage as it ends (by default the batch's output, or under the cell outside a batch).
    """
    from .deploy import running_endpoints

    stages = []
    for endpoint in running_endpoints(study, platform, run_dir, layers, deploy_missing):
        stages += run_layer_sweep(study, platform, endpoint, run_dir, modes, say)
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
            "server TTFT p95 (ms)": figure_text(server, "p95_ttft_ms"),
            "client E2E mean (ms)": stage["summary"].get("mean_e2el_ms"),
            "server E2E mean (ms)": server.get("mean_e2el_ms"),
            "server max running": server.get("max_running"), "server max waiting": server.get("max_waiting"),
            "server max KV-cache usage": server.get("max_kv_cache_usage"),
        })  # fmt: skip
    return pd.DataFrame(rows)
