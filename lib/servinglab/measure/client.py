"""The client on this machine: one stage sent from this process, or from several client processes when one
event loop would run out of time (past a few dozen streams: benchmarks/README.md), each its slice.

The stage is planned once (``stage.StagePlan``) and sliced as the in-cluster Job slices it, so the merged
arrivals are exactly the planned ones. The processes are started, each reports ready once its imports
are done, and then all get one common start time (the start barrier). Every record goes back to this
process as its request ends, through one queue, to the one writer; each keeps its index in the stage.
Ctrl-C here stops every process; what they sent is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .loadgen import StageSpec, Target, run_in_thread
from .stage import (MergedStage, Slice, SliceResult, StagePlan, merge_slices, plan_to_dict, run_slice, slices_of,
                    target_to_dict)  # fmt: skip

# One event loop keeps its p99 lag under 5 ms up to about 4,000 token chunks a second; a GPU server streams
# a token every 2-4 ms, so about 8 streams a loop (benchmarks/README.md, "The client on a GPU").
STREAMS_PER_WORKER = 8
# Processes a local vLLM server runs beside the client (API server, EngineCore, Worker): cores they need.
ENGINE_PROCESSES = 3


@dataclass(frozen=True)
class WorkerRule:
    """How many client processes a stage gets, and why, in words a reader can check."""

    workers: int
    text: str


def workers_for(setting: int | str, spec: StageSpec, cores: int, engine_processes: int = 0,
                expected_e2e_s: float | None = None) -> WorkerRule:  # fmt: skip
    """Client processes for a stage: ``setting`` when a number; ``auto``: one per 8 concurrent streams (an open
    loop: per 8 requests expected in flight, its rate times the expected E2E, capped by its concurrency
    cap), at most the cores left by the engine's processes on this machine, at least one."""
    room = max(1, cores - engine_processes)
    if setting != "auto":
        return WorkerRule(int(setting), f"{int(setting)} worker{'s' if int(setting) != 1 else ''}, as the study sets")
    if math.isinf(spec.request_rate):
        streams = float(spec.max_concurrency or 1)
        basis = f"{spec.max_concurrency} concurrent streams"
    else:
        e2e = expected_e2e_s if expected_e2e_s else 1.0
        streams = spec.request_rate * e2e
        if spec.max_concurrency:
            streams = min(streams, spec.max_concurrency)
        basis = f"about {streams:.0f} requests in flight ({spec.request_rate:g} req/s × {e2e:.2f} s expected E2E)"
    wanted = max(1, math.ceil(streams / STREAMS_PER_WORKER))
    workers = min(wanted, room)
    room_text = f"{cores} cores" + (f" less {engine_processes} engine processes" if engine_processes else "")
    text = (f"{workers} worker{'s' if workers != 1 else ''}: one per {STREAMS_PER_WORKER} of {basis}"
            + (f", at most {room} ({room_text})" if wanted > room else f"; room for {room} ({room_text})"))  # fmt: skip
    return WorkerRule(workers, text)


def run_local(target: Target, plan: StagePlan, sink: Callable[[dict[str, Any]], None],
              slos: dict[str, float] | None = None, workers: int = 1,
              client_cpus: tuple[int, ...] | None = None) -> MergedStage:  # fmt: skip
    """Send the whole stage from this machine and merge it; each record goes to ``sink`` (in this process,
    whatever sent it). One worker sends from this process; several are processes of their own, each a slice
    of the stage, started together, every record sent back here to the one writer."""
    if workers > 1:
        results, start = run_workers(target, plan, slices_of(plan, workers), sink, client_cpus)
        return merge_slices(results, start, slos, plan.spec.request_rate, what="worker", tag="client_worker")
    [piece] = slices_of(plan, 1)
    result = SliceResult(0, len(piece.requests))

    def keep(record: dict[str, Any]) -> None:
        result.records.append(record)
        sink(record)

    def work(stop: threading.Event) -> dict[str, Any]:
        return asyncio.run(run_slice(target, plan, piece, keep, stop))

    result.outcome = run_in_thread(work)
    start = result.outcome["t0_unix_s"]
    return merge_slices([result], start, slos, plan.spec.request_rate, what="client")


READY_TIMEOUT_S = 120.0  # a process importing the client on a loaded machine
START_LEAD_S = 0.5  # from the last process ready to the common start
STOP_GRACE_S = 10.0


def _worker(index: int, target_data: dict[str, Any], plan_data: dict[str, Any], piece_data: dict[str, Any],
            api_key: str | None, cpus: tuple[int, ...] | None, records: Any, control: Any) -> None:  # fmt: skip
    """A client process: its slice of the stage, every record sent back as it ends, then its outcome."""
    import asyncio

    from .stage import plan_from_dict, run_slice, target_from_dict

    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)  # threads it starts later inherit these cores
    target = target_from_dict(target_data, api_key)
    plan, piece = plan_from_dict(plan_data), Slice(**piece_data)
    stop = threading.Event()
    control.send(("ready", index))
    message = control.recv()
    if message[0] != "go":
        return

    def listen() -> None:
        with contextlib.suppress(EOFError, OSError):
            while control.recv()[0] != "stop":
                pass
        stop.set()

    threading.Thread(target=listen, name="servinglab-worker-control", daemon=True).start()
    try:
        report = asyncio.run(run_slice(target, plan, piece, lambda r: records.put(("record", index, r)), stop,
                                       start_at_unix_s=message[1]))  # fmt: skip
        records.put(("outcome", index, report))
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which keeps what came before
        records.put(("error", index, f"{type(exc).__name__}: {exc}"))


def run_workers(target: Target, plan: StagePlan, slices: list[Slice], sink: Callable[[dict[str, Any]], None],
                cpus: tuple[int, ...] | None = None) -> tuple[list[SliceResult], float]:  # fmt: skip
    """Run each slice in a process of its own, from one common start; (what came back per slice, the start).

    ``sink`` gets every record in this process as it arrives. The API key travels to the processes through
    the pipe that starts them, never on a command line.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or loops copied from here
    records = context.Queue()
    target_data, plan_data = target_to_dict(target), plan_to_dict(plan)
    processes, controls = [], []
    results = {s.index: SliceResult(s.index, len(s.requests)) for s in slices}
    start_at = time.time()
    try:
        for piece in slices:
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, name=f"servinglab-client-{piece.index}", daemon=True,
                                      args=(piece.index, target_data, plan_data, asdict(piece), target.api_key, cpus,
                                            records, theirs))  # fmt: skip
            process.start()
            processes.append(process)
            controls.append(mine)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for index, control in enumerate(controls):
            if not control.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client process {index} was not ready within {READY_TIMEOUT_S:g} s")
            control.recv()
        start_at = time.time() + START_LEAD_S
        for control in controls:
            control.send(("go", start_at))
        _collect(records, processes, results, sink)
    except KeyboardInterrupt:
        for control in controls:
            with contextlib.suppress(OSError):
                control.send(("stop",))
        with contextlib.suppress(KeyboardInterrupt):  # what the processes sent until they stopped is kept
            _collect(records, processes, results, sink, deadline_s=STOP_GRACE_S)
        raise
    finally:
        for process in processes:
            process.join(timeout=STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        records.close()
    return [results[s.index] for s in slices], start_at


def _collect(records: Any, processes: list[Any], results: dict[int, SliceResult], sink: Callable[[dict[str, Any]], None],
             deadline_s: float | None = None) -> None:  # fmt: skip
    """Take every message until each slice has ended (its outcome, its error, or its process gone)."""
    ended: set[int] = set()
    until = None if deadline_s is None else time.monotonic() + deadline_s
    while len(ended) < len(results):
        if until is not None and time.monotonic() > until:
            return
        try:
            kind, index, payload = records.get(timeout=0.2)
        except queue.Empty:
            ended |= {i for i, p in zip(results, processes) if not p.is_alive()}  # gone without an outcome
            continue
        if kind == "record":
            payload["client_worker"] = index
            results[index].records.append(payload)
            sink(payload)
        elif kind == "outcome":
            results[index].outcome = payload
            ended.add(index)
        else:
            results[index].other_lines.append(payload)
            ended.add(index)
    while True:  # what a process that died without its outcome had queued before it died
        try:
            kind, index, payload = records.get(timeout=0.05)
        except queue.Empty:
            return
        if kind == "record":
            payload["client_worker"] = index
            results[index].records.append(payload)
            sink(payload)
