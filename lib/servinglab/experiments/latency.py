"""The latency sweeps of a study: closed-loop concurrency stages, then open-loop rate stages (listed, or
found by a saturation sweep, :mod:`servinglab.measure.sweep`), per layer.

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
from dataclasses import replace
from typing import Any, Callable

from .. import progress, records
from ..config import ConversationWorkload, Study
from ..measure.client import ENGINE_PROCESSES, run_local, workers_for
from ..measure.loadgen import StageSpec, Target
from ..measure.server_metrics import ServerWindow, figure_text
from ..measure import sweep
from ..measure.stage import MergedStage, StagePlan, stage_end_line, stage_record
from ..measure.client_metrics import summarize
from ..measure.conversation import (ConversationPlan, SessionsOutcome, conversation_line, conversations_section,
                                    make_plan, plan_sessions, run_sessions)  # fmt: skip
from ..measure.sharegpt import read_conversations
from ..measure.datasets import dataset_requests
from ..measure.workload import DirectoryTokenizer, ServerTokenizer
from ..platforms import Endpoint, Platform, placement


def planned_stages(study: Study) -> list[dict[str, Any]]:
    """The stages of the sweep, in order: (name, mode, concurrency, rate, prompts).

    A saturation sweep's rate stages are planned with no rate: it is found from its probes' measurements
    when they have run (:func:`servinglab.measure.sweep.sweep_rates`).
    """
    w = study.workloads.latency
    stages = [
        {"stage": f"c={c}", "mode": "closed", "max_concurrency": c, "request_rate": None,
         "num_prompts": max(w.min_prompts, w.prompts_per_concurrency * c)}
        for c in w.concurrency
    ]  # fmt: skip
    stages += [
        {"stage": f"rate={r:g}", "mode": "open", "max_concurrency": w.sweep.max_concurrency, "request_rate": r,
         "num_prompts": w.sweep.num_prompts}
        for r in w.sweep.rates
    ]  # fmt: skip
    return stages + saturation_stages(w.sweep.saturation_rates, w.sweep.num_prompts, w.sweep.max_concurrency)


def saturation_stages(count: int, num_prompts: int, max_concurrency: int | None) -> list[dict[str, Any]]:
    """A saturation sweep's stages as planned: its two probes, then ``count`` rate stages (none when 0).

    Parameters
    ----------
    count : int
        Rate stages after the probes.
    num_prompts : int
        Requests per stage.
    max_concurrency : int or None
        The throughput stage's concurrency and the rate stages' cap (None: the throughput stage sends all
        ``num_prompts`` at once, the rate stages have no cap).
    """
    if not count:
        return []
    common: dict[str, Any] = {"mode": "sweep", "request_rate": None, "num_prompts": num_prompts}
    return [
        common | {"stage": "sweep-sync", "max_concurrency": 1, "sweep": sweep.part_of(sweep.SYNCHRONOUS)},
        common | {"stage": "sweep-throughput", "max_concurrency": max_concurrency or num_prompts,
                  "sweep": sweep.part_of(sweep.THROUGHPUT)},
    ] + [
        common | {"stage": f"sweep-rate-{k}-of-{count}", "max_concurrency": max_concurrency,
                  "sweep": sweep.part_of(sweep.RATE, index=k, count=count)}
        for k in range(1, count + 1)
    ]  # fmt: skip


def _phase(planned: dict[str, Any]) -> str:
    """The part of 30_latency a stage runs in: a saturation sweep finds the open loop's rates, so it runs there."""
    return "closed" if planned["mode"] == "closed" else "open"


def _with_rate(planned: dict[str, Any], probes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A saturation sweep's rate stage with its rate, from the probes measured before it; None: no range."""
    found = sweep.rate_range(probes[sweep.SYNCHRONOUS], [probes[sweep.SYNCHRONOUS], probes[sweep.THROUGHPUT]])
    if found is None:
        return None
    low, high, top = found
    place = planned["sweep"]
    rate = sweep.sweep_rates(low, high, place["count"])[place["index"] - 1]
    between = {"between_req_s": [round(low, 6), round(high, 6)],
               "between_stages": [probes[sweep.SYNCHRONOUS]["stage"], top]}  # fmt: skip
    return planned | {"request_rate": rate, "sweep": place | between}


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
    if w.dataset is not None and w.dataset.conversation is not None:
        return run_layer_sessions(study, platform, endpoint, run_dir, modes, say)
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
    dataset = w.dataset_spec(study.resolve_path)
    out: list[dict[str, Any]] = []
    stopped: set[str] = set()  # the modes whose sweep stopped at a stage that was not valid
    expected_e2e_s: float | None = None
    probes: dict[str, dict[str, Any]] = {}  # a saturation sweep's probe stages, by part, as measured
    for index, planned in enumerate(p for p in planned_stages(study) if _phase(p) in modes):
        if planned["mode"] in stopped:
            continue
        if (planned.get("sweep") or {}).get("part") == sweep.RATE:
            placed = _with_rate(planned, probes)
            if placed is None:
                stopped.add(planned["mode"])
                if say is not None:
                    why = sweep.no_range_text(probes[sweep.SYNCHRONOUS], probes[sweep.THROUGHPUT])
                    say(f"{endpoint.layer} sweep: {why}")
                continue
            planned = placed
        # Seeded per stage, so a stage's prompts do not depend on which stages ran before it.
        seed = w.seed + index
        count = planned["num_prompts"] + w.num_warmups
        specs = dataset_requests(dataset, tokenizer, count, seed, say)
        rate = planned["request_rate"] or math.inf
        spec = StageSpec(request_rate=rate, max_concurrency=planned["max_concurrency"], seed=seed,
                         burstiness=w.sweep.burstiness, duration_s=w.stage_duration_s)  # fmt: skip
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
        part = (planned.get("sweep") or {}).get("part")
        if part in (sweep.SYNCHRONOUS, sweep.THROUGHPUT):
            # The probes run whatever their verdict: they find the range; only a valid one may bound it.
            probes[part] = record
        elif verdict != "valid" and not w.past_validity:
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


# Why a stage of sessions has one client process, in its record.
SESSIONS_WORKERS_RULE = "1 worker: a session's turns follow each other, so its sessions share one event loop"


def run_layer_sessions(
    study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike, modes: tuple[str, ...] = ("closed", "open"),
    say: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every closed-loop stage against one layer as multi-turn sessions (``workloads.latency.dataset.conversation``);
    returns the stage records.

    A stage of concurrency c keeps c sessions in flight, each a conversation of the ShareGPT file sent turn by
    turn with the server's own answers (:mod:`servinglab.measure.conversation`). Each turn's record goes to
    ``data/conversation_turns.jsonl`` as it ends; the stage's record to ``data/latency_stages.jsonl``, its
    summary over every turn under ``vllm bench serve``'s names, as ``servinglab bench --multi-turn`` gives it,
    and a ``conversations`` field with TTFT by turn index and the sessions' durations. The study's checks allow
    no open-loop stage here, so only the closed part of 30_latency sends anything.
    """
    if "closed" not in modes:
        return []
    w = study.workloads.latency
    conversations = read_conversations(study.resolve_path(w.dataset.path))
    out: list[dict[str, Any]] = []
    for index, planned in enumerate(planned_stages(study)):
        # Seeded per stage, as a stage of single requests is, so its sessions do not depend on earlier stages.
        record = _session_stage(study, platform, endpoint, run_dir, planned, conversations, w.seed + index)
        verdict = record["validity"]["verdict"]
        if verdict != "valid" and not w.past_validity:
            record["stopped_sweep"] = True  # more sessions in flight would only be less valid
        records.append(run_dir, records.LATENCY_STAGES, [record])
        out.append(record)
        if say is not None:
            say(f"{stage_line(record)}; {conversation_line(record['conversations'])}")
        if record.get("stopped_sweep") or (record["server_alive_after"] is False and w.on_server_death == "stop"):
            break
    return out


def _session_stage(study: Study, platform: Platform, endpoint: Endpoint, run_dir: str | os.PathLike,
                   planned: dict[str, Any], conversations: list[Any], seed: int) -> dict[str, Any]:  # fmt: skip
    """One closed-loop stage of sessions, measured ``repeats`` times inside one server window; its stage record."""
    w = study.workloads.latency
    workload = w.dataset.conversation
    sessions = plan_sessions(conversations, workload, seed, w.dataset.path)
    spec = StageSpec(request_rate=math.inf, max_concurrency=planned["max_concurrency"], seed=seed,
                     duration_s=w.stage_duration_s)  # fmt: skip
    plan = make_plan(planned["stage"], sessions, w.dataset.sharegpt_output_len or w.output_len, spec)
    target = Target(endpoint.base_url, endpoint.served_name, endpoint.api_key, w.request_timeout_s, w.ignore_eos,
                    headers=tuple(endpoint.headers.items()), verify_tls=endpoint.verify_tls,
                    proxy=endpoint.proxy)  # fmt: skip
    cpus = platform.client_cpus(endpoint.layer)
    window = ServerWindow(platform.metrics_targets(endpoint.layer), endpoint, study.telemetry)
    stage_id = uuid.uuid4().hex[:12]  # ties the turn records to this measurement of the stage
    outcomes: list[SessionsOutcome] = []
    for repeat in range(w.repeats):
        writer = records.Writer.to_run(run_dir, records.CONVERSATION_TURNS, {
            "layer": endpoint.layer, "stage": plan.name, "stage_id": stage_id, "repeat": repeat,
            "provenance": "measured"})  # fmt: skip
        with writer, placement.client_on(cpus), window:
            outcomes.append(run_sessions(target, plan, writer))
        if outcomes[-1].interrupted:
            break
    slos = study.slos.goodput.limits() or None
    planned = planned | {"num_prompts": sum(len(s.user_turns) for s in sessions)}  # turns, as the summary counts
    return stage_record(planned, endpoint.layer, seed, this_machine(), [_merged(o, slos) for o in outcomes], window,
                        slos, stage_id=stage_id, client_workers=1, client_cpus=list(cpus) if cpus else None,
                        client_workers_rule=SESSIONS_WORKERS_RULE,
                        conversations=_sessions_section(plan, outcomes, w.dataset.path, workload))  # fmt: skip


def _merged(outcome: SessionsOutcome, slos: dict[str, float] | None) -> MergedStage:
    """One repeat of sessions as the stage machinery takes a repeat: summarized per turn as ``servinglab bench
    --multi-turn`` does (no send window or achieved rate: they would compare turns with sessions/s; how late each
    session started stands for the schedule lag)."""
    summary = summarize(outcome.records, outcome.duration_s, slos, None, None, outcome.session_lag_ms,
                        outcome.loop_lag_ms)  # fmt: skip
    return MergedStage(outcome.records, summary, outcome.started_unix_s, outcome.duration_s, outcome.interrupted,
                       0.0, list(outcome.session_lag_ms), list(outcome.loop_lag_ms))  # fmt: skip


def _sessions_section(plan: ConversationPlan, outcomes: list[SessionsOutcome], source: str,
                      workload: ConversationWorkload) -> dict[str, Any]:  # fmt: skip
    """The stage record's ``conversations`` field over every repeat: each repeat sends the same sessions again,
    so they are all counted, each session tagged with its repeat."""
    every = SessionsOutcome(
        sum(o.duration_s for o in outcomes), outcomes[0].started_unix_s,
        [s | {"repeat": i} for i, o in enumerate(outcomes) for s in o.sessions],
        [v for o in outcomes for v in o.session_lag_ms], [v for o in outcomes for v in o.loop_lag_ms],
        any(o.interrupted for o in outcomes), [r for o in outcomes for r in o.records],
    )  # fmt: skip
    section = conversations_section(replace(plan, sessions=plan.sessions * len(outcomes)), every, source, workload)
    return section | {"repeats": len(outcomes)}


def stage_line(record: dict[str, Any]) -> str:
    """One line for a stage as it ends: its headline numbers and its validity."""
    line = stage_end_line(record)
    if record.get("sweep") and record.get("request_rate"):
        line += f" (requested {record['request_rate']:.3g} req/s)"
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
            "TTFT p50 (ms)": s.get("median_ttft_ms"), "TTFT p95 (ms)": s.get("p95_ttft_ms"),
            "TPOT p50 (ms)": s.get("median_tpot_ms"), "ITL p50 (ms)": s.get("median_itl_ms"),
            "ITL p95 (ms)": s.get("p95_itl_ms"), "E2E p50 (ms)": s.get("median_e2el_ms"),
            "E2E p95 (ms)": s.get("p95_e2el_ms"), "server TTFT mean (ms)": (stage.get("server") or {}).get("mean_ttft_ms"),
            "validity": (stage.get("validity") or {}).get("verdict", "unchecked"),
            "warnings": list(s.get("warnings", [])),  # each its own line under the table (report.show)
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
