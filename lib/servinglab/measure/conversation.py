"""Multi-turn sessions: each conversation of a ShareGPT file sent turn by turn, with the server's own answers.

A session is one conversation. Its user turns (from the file) are sent in order, each as chat messages that
carry the whole history: the earlier user turns and the assistant texts *this server returned* for them,
never the file's answers, so each turn's prompt grows with what the server really said, as in a chat. The
next turn is sent once the previous answer has arrived, after a think time drawn as AIPerf draws its turn
delay (a normal of mean ``turn_delay_mean_ms`` and deviation ``turn_delay_stddev_ms`` truncated at 0, in
whole milliseconds, times ``turn_delay_ratio``). A turn that fails ends its session: there is no answer to
carry on with.

Sessions start as the load generator's requests do (:mod:`servinglab.measure.schedule`): all at once, a
concurrency cap counting *sessions* making it a closed loop of N conversations (a session holds its slot
through its think times), or arriving at a rate (Poisson or gamma). Every turn is timed by the project's
streaming client (:func:`servinglab.measure.loadgen.send_one`) and its record goes to the sink as it ends;
the server's ``usage.prompt_tokens`` per turn shows the history growing, TTFT by turn index what it costs.
The sessions are sent from one event loop (one client process), whose lag is watched as a stage's is.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np

from .. import records
from ..config import ConversationWorkload
from ..errors import ParamsError
from ..platforms.base import MetricsTarget
from .client_metrics import summarize, tpot_ms, validity
from .loadgen import NS, LoopLagProbe, StageSpec, Target, gather_until_stopped, make_client, run_in_thread, send_one
from .schedule import arrival_offsets_s
from .server_metrics import ServerWindow
from .sharegpt import USER_ROLES, read_conversations
from .workload import RequestSpec

# A normal truncated at 0 is drawn again until it lands there; past this many draws its mean is taken.
DELAY_DRAWS = 100


@dataclass(frozen=True)
class Session:
    """One conversation as it will be sent."""

    session: int  # its position among the stage's sessions
    conversation: int  # its index in the file
    user_turns: tuple[str, ...]
    think_times_ms: tuple[float, ...]  # before each turn, after the previous answer (0 before the first)


@dataclass(frozen=True)
class ConversationPlan:
    """The sessions of one stage, how they start, and what each turn asks for."""

    name: str
    sessions: list[Session]
    max_tokens: int  # of every turn
    spec: StageSpec  # request_rate: sessions/s; max_concurrency: sessions in flight
    offsets_s: list[float]  # each session's start from the stage start


@dataclass
class SessionsOutcome:
    """What the sessions did, beyond their per-turn records."""

    duration_s: float  # the stage start to the end of its last turn
    started_unix_s: float
    sessions: list[dict[str, Any]]  # per session: turns planned, sent, completed, duration, how it ended
    session_lag_ms: list[float]  # how late each session started against its plan
    loop_lag_ms: list[float]
    interrupted: bool
    records: list[dict[str, Any]] = field(default_factory=list)


def think_time_ms(rng: np.random.Generator, mean_ms: float, stddev_ms: float, ratio: float) -> float:
    """One think time as AIPerf draws a turn delay: none when the mean is 0; otherwise the mean (deviation 0) or a
    normal truncated at 0, rounded up to a whole millisecond and at least 1, then times ``ratio``."""
    if mean_ms <= 0:
        return 0.0
    if stddev_ms <= 0:
        return max(1, round(mean_ms)) * ratio
    for _ in range(DELAY_DRAWS):
        drawn = rng.normal(mean_ms, stddev_ms)
        if drawn >= 0:
            return max(1, math.ceil(drawn)) * ratio
    return max(1, round(mean_ms)) * ratio


def plan_sessions(conversations: Sequence[Sequence[tuple[str, str]]], workload: ConversationWorkload, seed: int,
                  source: str = "the ShareGPT file") -> list[Session]:  # fmt: skip
    """The sessions to send: conversations with at least one user turn, in an order drawn from ``seed``.

    Parameters
    ----------
    conversations : list of list of (role, text)
        As :func:`servinglab.measure.sharegpt.read_conversations` returns them; only the user turns are sent.
    workload : ConversationWorkload
        How many sessions, how many turns at most, and the think time between turns.
    seed : int
        Seed of the order and of the think times: the same seed plans the same sessions.
    source : str
        The file, to name in an error.
    """
    usable = [(index, tuple(text for role, text in turns if role in USER_ROLES)) for index, turns in enumerate(conversations)]
    usable = [(index, turns[: workload.max_turns]) for index, turns in usable if turns]
    if not usable:
        raise ParamsError(f"{source}: no conversation has a human turn to send")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(usable))
    count = workload.num or len(usable)
    sessions = []
    for k in range(count):
        index, turns = usable[int(order[k % len(usable)])]  # reused from the start when the file has fewer
        delays = [0.0] + [think_time_ms(rng, workload.turn_delay_mean_ms, workload.turn_delay_stddev_ms,
                                        workload.turn_delay_ratio) for _ in turns[1:]]  # fmt: skip
        sessions.append(Session(k, index, turns, tuple(delays)))
    return sessions


def make_plan(name: str, sessions: list[Session], max_tokens: int, spec: StageSpec) -> ConversationPlan:
    """Draw each session's start from the stage's rate, burstiness and seed (as a stage draws its requests')."""
    offsets = arrival_offsets_s(len(sessions), spec.request_rate, spec.burstiness, spec.seed)
    return ConversationPlan(name, list(sessions), max_tokens, spec, [float(o) for o in offsets])


async def run_sessions_async(target: Target, plan: ConversationPlan, sink: Callable[[dict[str, Any]], None],
                             stop: threading.Event | None = None) -> SessionsOutcome:  # fmt: skip
    """Send every session of ``plan``; each turn's record goes to ``sink`` as the turn ends.

    ``stop`` (set from another thread) cancels what is in flight: those turns are recorded as cancelled.
    """
    spec = plan.spec
    client = make_client(target, (spec.max_concurrency or len(plan.sessions) or 1) + 8)
    limit = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    probe = LoopLagProbe()
    lags: list[float] = []
    ended: list[dict[str, Any]] = []
    t0 = time.perf_counter_ns()
    t0_unix_s = time.time()
    last_end = [t0]

    def over_time() -> bool:
        return spec.duration_s is not None and (time.perf_counter_ns() - t0) / NS > spec.duration_s

    async def start(session: Session, at_s: float) -> None:
        due_ns = t0 + int(at_s * NS)
        if (wait_ns := due_ns - time.perf_counter_ns()) > 0:
            await asyncio.sleep(wait_ns / NS)
        # Lag: how late the session woke for its slot; a wait for a concurrency slot is the closed loop's design.
        lag_ms = max(0.0, (time.perf_counter_ns() - due_ns) / 1e6)
        if limit:
            await limit.acquire()
        try:
            if over_time():
                return
            lags.append(lag_ms)
            await _converse(client, target, plan, session, t0, sink, over_time, ended.append)
            last_end[0] = time.perf_counter_ns()
        finally:
            if limit:
                limit.release()

    probe.start()
    tasks = [asyncio.ensure_future(start(s, at)) for s, at in zip(plan.sessions, plan.offsets_s)]
    try:
        results = await gather_until_stopped(tasks, stop)
    finally:
        await probe.stop()
        await client.close()
    interrupted = any(isinstance(r, asyncio.CancelledError) for r in results) or bool(stop is not None and stop.is_set())
    return SessionsOutcome((last_end[0] - t0) / NS, t0_unix_s, sorted(ended, key=lambda s: s["session"]), lags,
                           probe.lags_ms, interrupted)  # fmt: skip


async def _converse(client: Any, target: Target, plan: ConversationPlan, session: Session, t0_ns: int,
                    sink: Callable[[dict[str, Any]], None], over_time: Callable[[], bool],
                    ended: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
    """One session, turn after turn, the history holding the server's answers verbatim; its summary goes to
    ``ended`` however it ends (cancelled included)."""
    messages: list[dict[str, str]] = []
    began_ns = time.perf_counter_ns()
    outcome: dict[str, Any] = {"session": session.session, "conversation": session.conversation,
                               "turns_planned": len(session.user_turns), "turns_sent": 0, "turns_completed": 0,
                               "ended_by": "done"}  # fmt: skip
    try:
        for turn, (text, think_ms) in enumerate(zip(session.user_turns, session.think_times_ms)):
            if think_ms:
                await asyncio.sleep(think_ms / 1000)
            if over_time():
                outcome["ended_by"] = "duration"
                return
            messages.append({"role": "user", "content": text})
            outcome["turns_sent"] += 1
            fields = {"session": session.session, "conversation": session.conversation, "turn": turn,
                      "turns_planned": len(session.user_turns), "messages": len(messages), "think_time_ms": think_ms}  # fmt: skip
            record, answer = await _send_turn(client, target, plan.max_tokens, messages, t0_ns, fields, sink)
            if not record["ok"]:
                outcome["ended_by"] = record["error_kind"] or "failed"  # no answer to carry on with
                return
            outcome["turns_completed"] += 1
            messages.append({"role": "assistant", "content": answer})
    except asyncio.CancelledError:
        outcome["ended_by"] = "cancelled"
        raise
    finally:
        outcome["duration_s"] = (time.perf_counter_ns() - began_ns) / NS
        ended(outcome)


async def _send_turn(client: Any, target: Target, max_tokens: int, messages: list[dict[str, str]], t0_ns: int,
                     fields: dict[str, Any], sink: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], str]:  # fmt: skip
    """Send one turn with its history; its record goes to ``sink`` (a cancelled one too). (record, answer text)"""
    spec = RequestSpec(messages[-1]["content"], -1, max_tokens)
    try:
        record = await send_one(client, target, spec, t0_ns, messages=list(messages), keep_text=True)
    except asyncio.CancelledError:
        sink(fields | {"ok": False, "error_kind": "cancelled"})
        raise
    except Exception as exc:  # noqa: BLE001 - an unforeseen error still leaves its record, and ends the session
        record = {"ok": False, "error_kind": type(exc).__name__, "error": str(exc)[:300], "token_ms": [],
                  "ttft_ms": None, "e2el_ms": None}  # fmt: skip
    answer = record.pop("text", "")
    record.pop("expected_prompt_tokens", None)  # the file's text is not counted before it is sent
    sink(fields | record | {"tpot_ms": tpot_ms(record)})
    return record, answer


def run_sessions(target: Target, plan: ConversationPlan, sink: Callable[[dict[str, Any]], None]) -> SessionsOutcome:
    """Run :func:`run_sessions_async` from synchronous code (a script, or a Jupyter cell whose loop runs);
    Ctrl-C stops it and what was recorded stays."""
    kept: list[dict[str, Any]] = []

    def keep(record: dict[str, Any]) -> None:
        kept.append(record)
        sink(record)

    outcome = run_in_thread(lambda stop: asyncio.run(run_sessions_async(target, plan, keep, stop)))
    outcome.records = kept
    return outcome


def _stats(values: list[float], unit: str, name: str) -> dict[str, float | None]:
    array = np.asarray(values, dtype=float)
    keys = (f"mean_{name}_{unit}", f"median_{name}_{unit}", f"p99_{name}_{unit}")
    if not len(array):
        return dict.fromkeys(keys)
    return dict(zip(keys, (float(np.mean(array)), float(np.median(array)), float(np.percentile(array, 99)))))


def by_turn(turn_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn index (0: the first turn of every session): completed and failed turns, the server's mean prompt
    tokens, and TTFT mean, median and p99 over the completed ones: how TTFT grows with the history."""
    out = []
    for turn in sorted({r["turn"] for r in turn_records}):
        rows = [r for r in turn_records if r["turn"] == turn]
        done = [r for r in rows if r.get("ok")]
        prompts = [r["prompt_tokens"] for r in done if r.get("prompt_tokens") is not None]
        out.append({"turn": turn, "completed": len(done), "failed": len(rows) - len(done),
                    "mean_prompt_tokens": float(np.mean(prompts)) if prompts else None,
                    **_stats([r["ttft_ms"] for r in done], "ms", "ttft"),
                    "median_tpot_ms": _stats([t for r in done if (t := r.get("tpot_ms")) is not None], "ms", "tpot")["median_tpot_ms"]})  # fmt: skip
    return out


def conversations_section(plan: ConversationPlan, outcome: SessionsOutcome, source: str,
                          workload: ConversationWorkload) -> dict[str, Any]:  # fmt: skip
    """The ``conversations`` section of a result: sessions and turns planned, sent and completed, session
    duration (sessions whose every turn completed, think times included), and TTFT by turn index."""
    sessions = outcome.sessions
    whole = [s for s in sessions if s["turns_completed"] == s["turns_planned"]]
    turns = [r for r in outcome.records if "turn" in r]
    return {
        "dataset_path": source,
        "sessions": len(plan.sessions),
        "sessions_started": len(sessions),
        "sessions_completed": len(whole),
        "max_concurrency_sessions": plan.spec.max_concurrency,
        "session_rate": None if math.isinf(plan.spec.request_rate) else plan.spec.request_rate,
        "max_turns": workload.max_turns,
        "turn_delay_mean_ms": workload.turn_delay_mean_ms,
        "turn_delay_stddev_ms": workload.turn_delay_stddev_ms,
        "turn_delay_ratio": workload.turn_delay_ratio,
        "turns_planned": sum(len(s.user_turns) for s in plan.sessions),
        "turns_sent": sum(s["turns_sent"] for s in sessions),
        "turns_completed": sum(s["turns_completed"] for s in sessions),
        **_stats([s["duration_s"] for s in whole], "s", "session_duration"),
        "mean_turns_completed_per_session": float(np.mean([s["turns_completed"] for s in sessions])) if sessions else None,
        "p99_session_start_lag_ms": float(np.percentile(outcome.session_lag_ms, 99)) if outcome.session_lag_ms else None,
        "by_turn": by_turn(turns),
        "per_session": sessions,
    }


def bench_conversations(
    root: str,
    model: str,
    dataset_path: str,
    workload: ConversationWorkload,
    output_len: int,
    seed: int = 0,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    api_key: str | None = None,
    slos: dict[str, float] | None = None,
    records_path: Any = None,
    labels: dict[str, Any] | None = None,
    duration_s: float | None = None,
    allow_plain_http_key: bool = False,
) -> dict[str, Any]:
    """Run the sessions of a ShareGPT file against one endpoint and return ``servinglab bench``'s result.

    Parameters
    ----------
    root : str
        The endpoint's ``http://host:port``.
    model : str
        The served model name.
    dataset_path : str
        The ShareGPT file.
    workload : ConversationWorkload
        Sessions, turns at most, think time.
    output_len : int
        ``max_tokens`` of every turn.
    request_rate, burstiness, max_concurrency :
        Sessions/s (inf: all at once), the gamma shape of their arrivals, and sessions in flight at most
        (with ``request_rate`` inf, a closed loop of that many conversations).
    records_path : path, optional
        One record per turn (``records.CONVERSATION_TURNS``), appended as each turn ends.

    The other parameters mean what :func:`servinglab.measure.bench.run_bench`'s do. The result has the
    top-level keys of a single-turn bench (``vllm bench serve``'s names, over every turn) and a
    ``conversations`` section.
    """
    sessions = plan_sessions(read_conversations(dataset_path), workload, seed, dataset_path)
    spec = StageSpec(request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
                     duration_s=duration_s)  # fmt: skip
    name = f"c={max_concurrency}" if math.isinf(request_rate) and max_concurrency else f"rate={request_rate:g}"
    plan = make_plan(name, sessions, output_len, spec)
    target = Target(f"{root}/v1", model, api_key=api_key, ignore_eos=ignore_eos)
    writer = records.Writer(records_path, records.CONVERSATION_TURNS, {"layer": "bench", "stage": name} | (labels or {}))
    with writer:
        server = MetricsTarget("server", root, api_key, plain_http_key_allowed=allow_plain_http_key)
        with ServerWindow([server]) as window:
            outcome = run_sessions(target, plan, writer)
    # Per turn, not per session: the send window and achieved rate would compare turns with sessions/s.
    summary = summarize(outcome.records, outcome.duration_s, slos, None, None, outcome.session_lag_ms,
                        outcome.loop_lag_ms)  # fmt: skip
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "client": "servinglab",
        "backend": "openai-chat",
        "model_id": model,
        "base_url": root,
        "dataset_name": "sharegpt",
        "multi_turn": True,
        "num_prompts": summary["completed"] + summary["failed"],
        "output_len": output_len,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "started_at_unix": window.fields["started_at_unix"],
        "interrupted": outcome.interrupted,
        **summary,
        "validity": validity(summary),
        "client_workers": 1,
        "client_workers_rule": "1 worker: a session's turns follow each other, so its sessions share one event loop",
        "server": window.fields["server"],
        "conversations": conversations_section(plan, outcome, dataset_path, workload),
    }


def conversation_line(section: dict[str, Any], shown_turns: int = 8) -> str:
    """One line for a terminal: sessions completed, turns, TTFT median by turn index, session duration."""
    medians = [t["median_ttft_ms"] for t in section["by_turn"][:shown_turns]]
    ttft = ", ".join("-" if m is None else f"{m:.1f}" for m in medians) + (", ..." if len(section["by_turn"]) > shown_turns else "")
    duration = section["median_session_duration_s"]
    return (f"sessions: {section['sessions_completed']} of {section['sessions']} completed, {section['turns_completed']} "
            f"turns; TTFT median by turn: {ttft or '-'} ms; session duration median "
            f"{'-' if duration is None else f'{duration:.2f}'} s")  # fmt: skip
