"""Routing with shared prefixes: per layer, the same closed-loop load twice, once with prompts that share
prefixes and once with prompts of the same lengths that share nothing (``workloads.routing``).

A router that knows which replica holds a prefix in its KV cache (llm-d's inference scheduler) sends
requests with that prefix there: the layer's prefix-cache hit rate rises and TTFT falls against the
unshared load. A router blind to prefixes (a Service, a plain gateway route) spreads them, and every
replica computes each prefix once. Which replica served a request only the servers know: each pod's
``/metrics`` gives the requests it finished and the prompt tokens it found in its cache (the stage's
``server.per_pod`` and ``server.requests_per_pod``, from :class:`ServerWindow`).

The measurement means something only when the requests take the layer's own routing: the path each stage
took and what routes on it (the layer kind's answer) are recorded with the stage (``routing``), so the
report can say when a port-forward to one pod, or one local process, was measured instead.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any, Callable

from .. import layers as layer_kinds
from .. import records
from ..config import Study
from ..measure.client import ENGINE_PROCESSES, run_local, workers_for
from ..measure.loadgen import StageSpec, Target
from ..measure.server_metrics import ServerWindow
from ..measure.stage import MergedStage, StagePlan, stage_record
from ..measure.workload import (DirectoryTokenizer, RequestSpec, ServerTokenizer, Tokenizer, prefix_repetition_requests,
                                random_requests)
from ..platforms import Endpoint, Platform, placement
from .latency import this_machine

SHARED, UNSHARED = "shared-prefix", "no-prefix"
MODE = "routing"  # the stages' mode: kept apart from the sweeps' closed and open stages


def routing_prompts(tokenizer: Tokenizer, r: Any, seed: int, shared: bool) -> list[RequestSpec]:
    """The routing stages' prompts, built as ``vllm bench serve`` builds its datasets: one shared prefix is the
    random dataset with ``--random-prefix-len``, several are ``prefix_repetition``; without sharing, random
    prompts of the same total length."""
    if not shared:
        return random_requests(tokenizer, r.num_prompts, r.prefix_len + r.input_len, r.output_len, seed)
    if r.num_prefixes == 1:
        return random_requests(tokenizer, r.num_prompts, r.input_len, r.output_len, seed, prefix_len=r.prefix_len)
    return prefix_repetition_requests(tokenizer, r.num_prompts, r.prefix_len, r.input_len, r.num_prefixes,
                                      r.output_len, seed)  # fmt: skip


def planned_stages(study: Study) -> list[dict[str, Any]]:
    """The experiment's two stages, the unshared one first (so the shared prefixes meet cold caches), each
    with its workload and seed; empty when the study sets no ``workloads.routing``."""
    r = study.workloads.routing
    if r is None:
        return []
    return [
        {"stage": f"{workload} c={r.concurrency}", "mode": MODE, "max_concurrency": r.concurrency,
         "request_rate": None, "num_prompts": r.num_prompts, "workload": workload, "seed": seed}
        for workload, seed in ((UNSHARED, r.seed + 1), (SHARED, r.seed))
    ]  # fmt: skip


def path_taken(study: Study, endpoint: Endpoint) -> tuple[str, str]:
    """The path the requests take to the layer (``gateway``, ``in-cluster``, ``port-forward``, ``direct``)
    and its description. The in-cluster load Job reaches the layer at its in-cluster URL."""
    if study.workloads.latency.client == "in-cluster" and study.platform.kind == "kubernetes":
        return "in-cluster", "in-cluster (the load Job's pods, at the layer's in-cluster URL)"
    return endpoint.via.split(" ", 1)[0], endpoint.via


def routing_facts(study: Study, endpoint: Endpoint, workload: str, pods: int) -> dict[str, Any]:
    """The stage record's ``routing``: the workload's shape, the path and what routes on it."""
    r = study.workloads.routing
    assert r is not None
    path, via = path_taken(study, endpoint)
    layer = study.layers[endpoint.layer]
    kind = layer_kinds.of(layer)
    return {
        "workload": workload,
        "prefix_len": r.prefix_len,
        "num_prefixes": r.num_prefixes if workload == SHARED else 0,
        "input_len": r.input_len,
        "output_len": r.output_len,
        "path": path,
        "via": via,
        "routed_by": kind.routing(study, endpoint.layer).get(path),
        "routing_paths": kind.routing(study, endpoint.layer),
        "replicas": kind.serving_replicas(layer),
        "pods": pods,
    }


class _KeptIds:
    """A tokenizer whose prompt ids are found once: through a server that is a request per id, and both
    stages draw from the same ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def prompt_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self._tokenizer.prompt_ids()
        return list(self._ids)


def tokenizer_for(platform: Platform, endpoint: Endpoint) -> Tokenizer:
    """The served model's tokenizer: the model directory here, else the server's /tokenize."""
    if platform.name == "local":
        return _KeptIds(DirectoryTokenizer(platform.model_dir()[0]))
    return _KeptIds(ServerTokenizer(endpoint.root_url, endpoint.served_name, endpoint.api_key, endpoint.headers,
                                    endpoint.verify_tls, endpoint.proxy))  # fmt: skip


def run_layer_routing(
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike,
    say: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Both stages of the routing experiment against one layer; returns their records (also appended to
    ``data/latency_stages.jsonl``, with ``mode: routing``)."""
    r, w = study.workloads.routing, study.workloads.latency
    if r is None:
        return []
    tokenizer = tokenizer_for(platform, endpoint)
    target = Target(endpoint.base_url, endpoint.served_name, endpoint.api_key, w.request_timeout_s, w.ignore_eos,
                    headers=tuple(endpoint.headers.items()), verify_tls=endpoint.verify_tls,
                    proxy=endpoint.proxy)  # fmt: skip
    slos = study.slos.goodput.limits() or None
    out = []
    for planned in planned_stages(study):
        workload, seed = planned.pop("workload"), planned.pop("seed")
        specs = routing_prompts(tokenizer, r, seed, shared=workload == SHARED)
        spec = StageSpec(request_rate=math.inf, max_concurrency=r.concurrency, seed=seed)
        plan = StagePlan.make(planned["stage"], specs, [], spec)
        window = ServerWindow(platform.metrics_targets(endpoint.layer), endpoint, study.telemetry)
        facts = routing_facts(study, endpoint, workload, len(window.targets))
        stage_id = uuid.uuid4().hex[:12]
        runs, client, extra = _measure(study, platform, endpoint, run_dir, plan, window, target, slos, stage_id)
        record = stage_record(planned, endpoint.layer, seed, client, runs, window, slos, stage_id=stage_id,
                              routing=facts, **extra)  # fmt: skip
        records.append(run_dir, records.LATENCY_STAGES, [record])
        out.append(record)
        if say is not None:
            say(stage_line(record))
        if record["server_alive_after"] is False or record["interrupted"]:
            break
    return out


def _measure(study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, plan: StagePlan,
             window: ServerWindow, target: Target, slos: dict[str, float] | None,
             stage_id: str) -> tuple[list[MergedStage], str, dict[str, Any]]:  # fmt: skip
    """One measurement of a stage from where the study's load runs: this machine, or the in-cluster Job."""
    w = study.workloads.latency
    if w.client == "in-cluster" and platform.name == "kubernetes":
        from .clusterload import client_description, run_in_cluster

        run = run_in_cluster(study, platform, endpoint.layer, run_dir, plan, window, 0, stage_id)  # type: ignore[arg-type]
        return [run], client_description(study, endpoint.layer), {"client_pods": [c | {"repeat": 0} for c in run.clients]}
    cpus = platform.client_cpus(endpoint.layer)
    cores = len(cpus) if cpus else len(placement.usable_cores())
    engine_here = ENGINE_PROCESSES if platform.name == "local" and not cpus else 0
    rule = workers_for(w.workers, plan.spec, cores, engine_here)
    writer = records.Writer.to_run(run_dir, records.LATENCY_REQUESTS, {
        "layer": endpoint.layer, "stage": plan.name, "stage_id": stage_id, "repeat": 0, "provenance": "measured"})  # fmt: skip
    # Closing the writer (also on Ctrl-C) writes and syncs every record the stage handed to it.
    with writer, placement.client_on(cpus), window:
        run = run_local(target, plan, writer, slos, rule.workers, cpus)
    extra = {"client_workers": rule.workers, "client_workers_rule": rule.text, "client_cpus": list(cpus) if cpus else None}
    return [run], this_machine(), extra


def hit_rate_text(server: dict[str, Any] | None) -> str:
    rate = (server or {}).get("prefix_cache_hit_rate")
    return "–" if rate is None else f"{100 * rate:.1f} %"


def stage_line(record: dict[str, Any]) -> str:
    """One line for a routing stage as it ends: requests per pod, hit rate, TTFT, validity."""
    server, s = record.get("server") or {}, record["summary"]
    per_pod = server.get("requests_per_pod") or {}
    spread = ", ".join(f"{pod} {n}" for pod, n in per_pod.items()) or "no pod's /metrics"
    ttft = "–" if s.get("median_ttft_ms") is None else f"{s['median_ttft_ms']:.1f} ms"
    return (f"{record['layer']} {record['stage']} via {record['routing']['path']}: {s['completed']} done, "
            f"{s['failed']} failed; requests per pod: {spread}; prefix-cache hit rate {hit_rate_text(server)}; "
            f"TTFT p50 {ttft}; {record['validity']['verdict']}")  # fmt: skip


def run_routing(
    study: Study,
    platform: Platform,
    run_dir: str | os.PathLike,
    layers: list[str] | None = None,
    deploy_missing: bool = False,
    say: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """The routing experiment against every layer the platform hosts (all of the study's when ``layers`` is
    empty); nothing when the study sets no ``workloads.routing``.

    ``deploy_missing`` deploys a layer that is not running (a notebook run on its own); ``say`` gets one line
    per stage as it ends, or why nothing runs.
    """
    from .deploy import running_endpoints

    if study.workloads.routing is None:
        if say is not None:
            say("no routing experiment: the study sets no workloads.routing")
        return []
    stages = []
    for endpoint in running_endpoints(study, platform, run_dir, layers, deploy_missing):
        stages += run_layer_routing(study, platform, endpoint, run_dir, say)
    return stages


def routing_frame(run_dir: str | os.PathLike):
    """The routing stages of a run, one row each: path, requests per pod, hit rate, TTFT."""
    import pandas as pd

    rows = []
    for stage in records.read(run_dir, records.LATENCY_STAGES).rows:
        if stage.get("mode") != MODE:
            continue
        server, s, facts = stage.get("server") or {}, stage["summary"], stage.get("routing") or {}
        rows.append({
            "layer": stage["layer"], "stage": stage["stage"], "path": facts.get("path"),
            "routed by": facts.get("routed_by") or "nothing of the layer's (the path bypasses its routing)",
            "requests per pod": ", ".join(f"{p} {n}" for p, n in (server.get("requests_per_pod") or {}).items()),
            "prefix-cache hit rate": server.get("prefix_cache_hit_rate"), "preemptions": server.get("preemptions_total"),
            "TTFT p50": s.get("median_ttft_ms"), "TTFT p95": s.get("p95_ttft_ms"),
            "validity": (stage.get("validity") or {}).get("verdict", "unchecked"),
        })  # fmt: skip
    return pd.DataFrame(rows)
