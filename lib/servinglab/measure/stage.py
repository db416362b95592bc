"""One latency stage, the one way it is run: planned once, sent as one or more slices, merged, recorded.

``servinglab bench``, the sweeps of 30_latency and the in-cluster load Job all go through here:

1. :class:`StagePlan` — the stage's requests and warmups, how they are sent (rate, burstiness, seed,
   concurrency, duration) and every request's send offset, drawn once from the seed;
2. :func:`slice_stage` — the plan split into slices (one per client process or pod) so that their union
   is exactly the planned schedule; one slice when a single client sends it all;
3. :func:`run_slice` — one client sends its slice (in this process, in a worker process, or in a pod)
   and reports its outcome; every record keeps its index in the whole stage;
4. :func:`merge_slices` — the stage's summary from every slice's records: percentiles over the union of
   their requests, never averaged across clients, with warnings for late or missing slices;
5. :func:`stage_record` — the stage's row of ``data/latency_stages.jsonl``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ParamsError
from .client_metrics import summarize, validity
from .intervals import stage_intervals
from .loadgen import StageSpec, Target, run_stage_async
from .schedule import arrival_offsets_s
from .server_metrics import ServerWindow
from .workload import RequestSpec

# A client that starts its slice this much after the common start leaves the others running short-handed.
LATE_START_WARN_S = 1.0


@dataclass(frozen=True)
class StagePlan:
    """One stage, planned once: what every client that sends part of it works from."""

    name: str
    requests: list[RequestSpec]
    warmups: list[RequestSpec]
    spec: StageSpec
    offsets_s: list[float]  # every request's send offset from the stage start

    @classmethod
    def make(cls, name: str, requests: list[RequestSpec], warmups: list[RequestSpec], spec: StageSpec) -> StagePlan:
        """Draw the send offsets from the stage's rate, burstiness and seed."""
        offsets = arrival_offsets_s(len(requests), spec.request_rate, spec.burstiness, spec.seed)
        return cls(name, list(requests), list(warmups), spec, [float(o) for o in offsets])


@dataclass(frozen=True)
class Slice:
    """What one client sends: indices into the stage's requests and warmups, at their offsets."""

    index: int
    requests: list[int]
    offsets_s: list[float]
    max_concurrency: int | None  # None: no cap; 0: the client has nothing to send
    warmups: list[int] = field(default_factory=list)


def split_concurrency(max_concurrency: int | None, clients: int) -> list[int | None]:
    """A concurrency cap shared as evenly as possible: client i gets C//N, plus one for the first C%N."""
    if max_concurrency is None:
        return [None] * clients
    return [max_concurrency // clients + (i < max_concurrency % clients) for i in range(clients)]


def slice_stage(
    offsets_s: Sequence[float], clients: int, max_concurrency: int | None, request_rate: float, num_warmups: int = 0
) -> list[Slice]:
    """Split one stage's schedule into ``clients`` slices; every request lands in exactly one.

    Parameters
    ----------
    offsets_s : sequence of float
        Every request's send offset from the stage start.
    clients : int
        Client processes or pods.
    max_concurrency : int or None
        The stage's concurrency (closed loop) or cap (open loop); shared by :func:`split_concurrency`.
    request_rate : float
        Requests/s; inf is a closed loop.
    num_warmups : int
        Warmup requests, dealt round-robin over the clients that send.

    Returns
    -------
    list of Slice
        Open loop: client i takes requests i, i+N, ... (its share of the arrival times, so the merged
        arrivals are exactly the planned ones). Closed loop: request k goes to concurrency slot k mod C,
        slot j to client j mod N, so each client's share of the requests follows its share of the
        concurrency; a client with no concurrency gets nothing.
    """
    if clients < 1:
        raise ParamsError(f"clients {clients}: must be at least 1")
    caps = split_concurrency(max_concurrency, clients)
    active = [i for i, cap in enumerate(caps) if cap != 0]
    if math.isinf(request_rate) and max_concurrency:
        owner = [(k % max_concurrency) % clients for k in range(len(offsets_s))]
    else:
        owner = [active[k % len(active)] for k in range(len(offsets_s))]
    warm_owner = [active[k % len(active)] for k in range(num_warmups)]
    return [
        Slice(
            index=i,
            requests=[k for k, o in enumerate(owner) if o == i],
            offsets_s=[float(offsets_s[k]) for k, o in enumerate(owner) if o == i],
            max_concurrency=caps[i],
            warmups=[k for k, o in enumerate(warm_owner) if o == i],
        )
        for i in range(clients)
    ]


def slices_of(plan: StagePlan, clients: int) -> list[Slice]:
    return slice_stage(plan.offsets_s, clients, plan.spec.max_concurrency, plan.spec.request_rate, len(plan.warmups))


async def run_slice(
    target: Target,
    plan: StagePlan,
    piece: Slice,
    emit: Callable[[dict[str, Any]], None],
    stop: threading.Event | None = None,
    start_at_unix_s: float | None = None,
) -> dict[str, Any]:
    """Send one slice of a stage and return its outcome; each record goes to ``emit`` as its request ends,
    with its ``index`` in the whole stage (warmups counted apart).

    ``start_at_unix_s`` holds the slice's start until that wall-clock time (after its warmups), so that
    clients in several processes or pods start together; without it the slice starts at once.
    """
    requests = [plan.requests[k] for k in piece.requests]
    warmups = [plan.warmups[k] for k in piece.warmups]
    spec = StageSpec(request_rate=plan.spec.request_rate, burstiness=plan.spec.burstiness, seed=plan.spec.seed,
                     max_concurrency=piece.max_concurrency or None, duration_s=plan.spec.duration_s)  # fmt: skip

    def remap(record: dict[str, Any]) -> None:
        positions = piece.warmups if record.get("warmup") else piece.requests
        emit(record | {"index": positions[record["index"]]})

    outcome = await run_stage_async(target, requests, spec, remap, warmups, stop, offsets_s=piece.offsets_s,
                                    start_at_unix_s=start_at_unix_s)  # fmt: skip
    lags = outcome.schedule_lag_ms
    t0 = outcome.started_unix_s or 0.0
    return {
        "slice": piece.index,
        "planned": len(requests),
        "sent": outcome.sent,
        "completed": outcome.completed,
        "failed": outcome.failed,
        "cancelled": outcome.cancelled,
        "t0_unix_s": t0,
        "late_s": round(t0 - start_at_unix_s, 4) if start_at_unix_s is not None else 0.0,
        "duration_s": outcome.duration_s,
        "send_window_s": outcome.send_window_s,
        "interrupted": outcome.interrupted,
        "schedule_lag_ms": {
            "count": len(lags),
            "p50": float(np.percentile(lags, 50)) if lags else None,
            "p99": float(np.percentile(lags, 99)) if lags else None,
            "max": max(lags) if lags else None,
        },
        # The whole series, so the stage's loop-lag percentile is taken over every client's samples.
        "loop_lag_ms": [round(v, 3) for v in outcome.loop_lag_ms],
    }


@dataclass
class SliceResult:
    """What came back from one slice's client (a process of this machine, or a pod)."""

    index: int
    planned: int  # requests in its slice
    pod: str | None = None  # the pod that sent it (in-cluster), for the warnings
    node: str | None = None
    log_found: bool = True  # whether its records could be read back at all
    records: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None  # run_slice's report; None: the client died before its end
    other_lines: list[str] = field(default_factory=list)  # what else it printed (stderr, tracebacks)


@dataclass
class MergedStage:
    records: list[dict[str, Any]]  # every slice's, each with its client slice when there were several
    summary: dict[str, Any]  # client_metrics.summarize over all of them, plus the warnings of the merge
    start_unix_s: float  # the earliest slice start
    duration_s: float
    interrupted: bool  # a slice was stopped before it sent all its requests
    send_window_s: float = 0.0
    schedule_lag_ms: list[float] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)  # each slice's client: who, where, its outcome


def merge_slices(
    slices: list[SliceResult],
    start_at_unix_s: float,
    slos: dict[str, float] | None = None,
    requested_rate: float | None = None,
    what: str = "pod",
    tag: str | None = None,
) -> MergedStage:
    """One stage's summary from its slices: percentiles over the union of their requests, never averaged.

    Each client times its requests from its own start (``t0``); its outcome gives that start as Unix time,
    which places its requests on the stage's common time line. The stage's duration runs from the earliest
    start to the end of the last request of any slice. A client that returned no outcome (it died) is
    placed at the common start. Warnings name missing records and late clients (``what`` names them);
    ``tag`` is the record field that names each record's slice (none when None).
    """
    t0 = {p.index: (p.outcome or {}).get("t0_unix_s") or start_at_unix_s for p in slices}
    records = [r | {tag: p.index} if tag else r for p in slices for r in p.records]
    starts = [t0[p.index] for p in slices if p.planned]
    start = min(starts) if starts else start_at_unix_s
    ends, sends, schedule_lag, loop_lag = [], [], [], []
    for p in slices:
        if p.outcome:
            ends.append(t0[p.index] + p.outcome["duration_s"])
            loop_lag += p.outcome.get("loop_lag_ms") or []
        for r in p.records:
            if r.get("warmup"):
                continue
            if r.get("sent_s") is not None:
                sends.append(t0[p.index] + r["sent_s"])
                ends.append(t0[p.index] + r["sent_s"] + (r.get("e2el_ms") or 0.0) / 1000)
            if r.get("error_kind") != "cancelled" and r.get("schedule_lag_ms") is not None:
                schedule_lag.append(r["schedule_lag_ms"])
    duration = max(ends) - start if ends else 0.0
    window = max(sends) - min(sends) if sends else 0.0
    summary = summarize(records, duration, slos or None, requested_rate, window, schedule_lag, loop_lag)
    warnings = summary["warnings"]
    for p in slices:
        measured = [r for r in p.records if not r.get("warmup")]
        who = f"{what} {p.pod}" if p.pod else what
        if not p.log_found:
            warnings.append(f"slice {p.index} ({p.planned} requests): nothing came back from its {what} "
                            f"{p.pod or '(none found)'}; its requests are missing from the stage")  # fmt: skip
        elif p.outcome is None:
            warnings.append(f"slice {p.index}: {who} ended before its slice did; its {len(measured)} of "
                            f"{p.planned} records are kept, placed from the common start")  # fmt: skip
        else:
            expected = p.outcome["completed"] + p.outcome["failed"] + p.outcome["cancelled"]
            if len(measured) < expected:
                warnings.append(f"slice {p.index}: {len(measured)} of the {expected} records {who} wrote reached "
                                "servinglab")  # fmt: skip
            late = p.outcome.get("late_s") or 0.0
            if p.planned and late > LATE_START_WARN_S:
                warnings.append(f"slice {p.index} started {late:.1f} s after the common start ({who}): the "
                                "slices did not fully overlap, so the load was lower than planned for that long")  # fmt: skip
    interrupted = any((p.outcome or {}).get("interrupted") for p in slices)
    clients = [{"slice": p.index, "pod": p.pod, "node": p.node, "planned": p.planned,
                "records": sum(1 for r in p.records if not r.get("warmup")),
                **{k: (p.outcome or {}).get(k) for k in ("sent", "completed", "failed", "late_s", "duration_s")},
                "p99_schedule_lag_ms": ((p.outcome or {}).get("schedule_lag_ms") or {}).get("p99")}
               for p in slices]  # fmt: skip
    return MergedStage(records, summary, start, duration, interrupted, window, schedule_lag, loop_lag, clients)


def stage_record(
    planned: dict[str, Any],
    layer: str,
    seed: int,
    client: str,
    runs: list[MergedStage],
    window: ServerWindow,
    slos: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A stage's row of ``data/latency_stages.jsonl``: what was planned, where its client ran, what it measured
    over every repeat, how valid that was and how sure.

    Parameters
    ----------
    planned : dict
        The stage as the sweep plans it: stage, mode, max_concurrency, request_rate, num_prompts.
    layer : str
        The layer measured.
    seed : int
        The seed of the stage's prompts and arrivals, and of its intervals' resampling.
    client : str
        Where the load generator ran (this machine's name, or the in-cluster Job and its pods).
    runs : list of MergedStage
        Each repeat of the stage, in order.
    window : ServerWindow
        The server's side of the stage, over every repeat.
    slos : dict, optional
        Per-request objectives for goodput.
    extra :
        Further fields of the record (client_cpus, client_workers, ...).
    """
    requests = [r for run in runs for r in run.records]
    duration = sum(run.duration_s for run in runs)
    rate = math.inf if planned.get("request_rate") is None else planned["request_rate"]
    summary = summarize(requests, duration, slos or None, rate, sum(run.send_window_s for run in runs),
                        [v for run in runs for v in run.schedule_lag_ms], [v for run in runs for v in run.loop_lag_ms])  # fmt: skip
    for run in runs:  # the merge's own warnings (late or missing clients), each once
        summary["warnings"] += [w for w in run.summary["warnings"] if w not in summary["warnings"]]
    done = [[r for r in run.records if r.get("ok") and not r.get("warmup")] for run in runs]
    throughputs = [run.summary["request_throughput"] for run in runs]
    fields = window.fields
    record = planned | {
        "layer": layer,
        "source": "servinglab",
        "provenance": "measured",
        "seed": seed,
        "client": client,
        "started_at_unix": fields["started_at_unix"],
        "ended_at_unix": fields["ended_at_unix"],
        "interrupted": any(run.interrupted for run in runs),
        "server_alive_after": fields["server_alive_after"],
        "repeats": len(runs),
        "summary": summary,
        "validity": validity(summary),
        "uncertainty": stage_intervals(done, seed, throughputs, closed_loop=math.isinf(rate)),
        "repeat_summaries": [
            {"repeat": i, "duration": run.duration_s, "completed": run.summary["completed"],
             "request_throughput": run.summary["request_throughput"], "p99_loop_lag_ms": run.summary["p99_loop_lag_ms"],
             "burst_deliveries": run.summary["burst_deliveries"], "validity": validity(run.summary)["verdict"]}
            for i, run in enumerate(runs)
        ],  # fmt: skip
        "server": fields["server"],
    } | extra
    if "gpu" in fields:
        record["gpu"] = fields["gpu"]
    return record


def stage_end_line(record: dict[str, Any]) -> str:
    """One line for a stage as it ends: its layer and name, its headline numbers and its validity.

    Parameters
    ----------
    record : dict
        The stage's row of ``data/latency_stages.jsonl`` (:func:`stage_record`).

    Returns
    -------
    str
        e.g. ``stage raw c=4: 3.21 req/s, TTFT mean 45.2 ms, TPOT mean 12.1 ms, 6 done, 0 failed; invalid:
        too-few-samples (6 requests, limit 20)``.
    """
    s = record["summary"]

    def mean_ms(key: str) -> str:
        return "–" if s.get(key) is None else f"{s[key]:.1f} ms"

    throughput = s.get("request_throughput")
    rate = "–" if throughput is None else f"{throughput:.2f}"
    checked = record.get("validity") or {}
    verdict = checked.get("verdict", "unchecked")
    if verdict not in ("valid", "unchecked"):
        first = next((r for r in checked.get("reasons", []) if r.get("verdict") == verdict), {})
        unit = f" {first['unit']}" if first.get("unit") else ""
        verdict = f"invalid: {verdict}" + (f" ({first['value']}{unit}, limit {first['limit']})" if first else "")
    return (f"stage {record['layer']} {record['stage']}: {rate} req/s, TTFT mean {mean_ms('mean_ttft_ms')}, "
            f"TPOT mean {mean_ms('mean_tpot_ms')}, {s.get('completed', 0)} done, {s.get('failed', 0)} failed; {verdict}")  # fmt: skip


def plan_to_dict(plan: StagePlan) -> dict[str, Any]:
    """The plan as JSON-ready data (for a worker process or a pod)."""
    spec = plan.spec
    return {
        "stage": plan.name,
        "request_rate": None if math.isinf(spec.request_rate) else spec.request_rate,
        "burstiness": spec.burstiness,
        "seed": spec.seed,
        "max_concurrency": spec.max_concurrency,
        "duration_s": spec.duration_s,
        "requests": [asdict(r) for r in plan.requests],
        "warmups": [asdict(r) for r in plan.warmups],
        "offsets_s": list(plan.offsets_s),
    }


def plan_from_dict(data: dict[str, Any]) -> StagePlan:
    rate = math.inf if data["request_rate"] is None else data["request_rate"]
    spec = StageSpec(request_rate=rate, burstiness=data["burstiness"], seed=data["seed"],
                     max_concurrency=data["max_concurrency"], duration_s=data["duration_s"])  # fmt: skip
    return StagePlan(data["stage"], [RequestSpec(**r) for r in data["requests"]],
                     [RequestSpec(**r) for r in data["warmups"]], spec, list(data["offsets_s"]))  # fmt: skip


def target_to_dict(target: Target) -> dict[str, Any]:
    """A target without its API key (a worker reads the key from its own environment)."""
    return {"base_url": target.base_url, "model": target.model, "request_timeout_s": target.request_timeout_s,
            "ignore_eos": target.ignore_eos, "continuous_usage": target.continuous_usage,
            "headers": [list(h) for h in target.headers], "verify_tls": target.verify_tls} \
        | ({"proxy": target.proxy} if target.proxy else {})  # fmt: skip


def target_from_dict(data: dict[str, Any], api_key: str | None) -> Target:
    return Target(data["base_url"], data["model"], api_key, data["request_timeout_s"], data["ignore_eos"],
                  data["continuous_usage"], headers=tuple(tuple(h) for h in data["headers"]),  # type: ignore[misc]
                  verify_tls=data["verify_tls"], proxy=data.get("proxy"))  # fmt: skip
