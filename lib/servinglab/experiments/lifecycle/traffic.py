"""The requests the lifecycle experiments send: a steady Poisson load kept up while a layer changes,
batches (canary counting, warm requests), single cold requests, and interleaved pairs over two paths.

Every request is timed by ``loadgen.send_one`` (the latency sweeps' rules) and stamped with wall-clock
send and end times, so it can be placed on the same timeline as the platform's events. Each record goes
to the sink the moment it ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ...measure.loadgen import NS, Target, make_client, send_one
from ...platforms import Endpoint
from ...measure.workload import RequestSpec

Sink = Callable[[dict[str, Any]], None]
KEPT = ("ok", "status", "error_kind", "error", "ttft_ms", "e2el_ms", "output_tokens", "model")


def target_for(endpoint: Endpoint, timeout_s: float) -> Target:
    return Target(endpoint.base_url, endpoint.served_name, endpoint.api_key, timeout_s, ignore_eos=True,
                  headers=tuple(endpoint.headers.items()), verify_tls=endpoint.verify_tls,
                  proxy=endpoint.proxy)  # fmt: skip


def _slim(record: dict[str, Any], t0_unix: float, ended_unix: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The fields a lifecycle table keeps (no per-token arrays), with wall-clock send and end (the last
    token of a success, the moment of the failure otherwise)."""
    sent = t0_unix + record.get("sent_s", 0.0)
    out = {k: record.get(k) for k in KEPT} | extra
    out["sent_at_unix"] = round(sent, 6)
    out["ended_at_unix"] = round(sent + record["e2el_ms"] / 1000 if record.get("ok") else ended_unix, 6)
    return out


async def _send(client, target: Target, spec: RequestSpec, t0_ns: int, t0_unix: float, extra: dict[str, Any],
                sink: Sink) -> dict[str, Any]:  # noqa: ANN001 - openai's client  # fmt: skip
    raw = await send_one(client, target, spec, t0_ns)
    record = _slim(raw, t0_unix, t0_unix + (time.perf_counter_ns() - t0_ns) / NS, extra)
    sink(record)
    return record


def _clock() -> tuple[int, float]:
    return time.perf_counter_ns(), time.time()


def run_async(coroutine_factory: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from synchronous code, also inside a Jupyter cell whose loop runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_factory())
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = asyncio.run(coroutine_factory())
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="servinglab-lifecycle-requests", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def send_batch(endpoint: Endpoint, spec: RequestSpec, count: int, concurrency: int, timeout_s: float,
               sink: Sink, extra: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """``count`` requests, ``concurrency`` at a time; their records in send order."""
    target = target_for(endpoint, timeout_s)

    async def main() -> list[dict[str, Any]]:
        client = make_client(target, concurrency + 4)
        limit = asyncio.Semaphore(concurrency)
        t0_ns, t0_unix = _clock()

        async def one(i: int) -> dict[str, Any]:
            async with limit:
                return await _send(client, target, spec, t0_ns, t0_unix, extra | {"index": i}, sink)

        try:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        finally:
            await client.close()

    return run_async(main)


def send_interleaved(paths: dict[str, Endpoint], spec: RequestSpec, pairs: int, timeout_s: float, sink: Sink,
                     extra: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """One request at a time, alternating between the paths and swapping which goes first every pair, so
    neither path always follows the other; the records per path, pair by pair."""
    names = list(paths)
    targets = {name: target_for(endpoint, timeout_s) for name, endpoint in paths.items()}

    async def main() -> dict[str, list[dict[str, Any]]]:
        clients = {name: make_client(target, 2) for name, target in targets.items()}
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        t0_ns, t0_unix = _clock()
        try:
            for name in names:  # one unrecorded request per path opens its connection first
                await send_one(clients[name], targets[name], spec, t0_ns)
            for pair in range(pairs):
                order = names if pair % 2 == 0 else names[::-1]
                for name in order:
                    record = await _send(clients[name], targets[name], spec, t0_ns, t0_unix,
                                         extra | {"path": name, "pair": pair, "via": paths[name].via}, sink)  # fmt: skip
                    out[name].append(record)
        finally:
            for client in clients.values():
                await client.close()
        return out

    return run_async(main)


class SteadyLoad:
    """Seeded Poisson requests at ``rate`` per second, from a thread, until stopped; every request is
    recorded (also those in flight when the load stops: it waits for them)."""

    def __init__(self, endpoint: Endpoint, spec: RequestSpec, rate: float, timeout_s: float, sink: Sink,
                 extra: dict[str, Any], seed: int = 0) -> None:  # fmt: skip
        self.target = target_for(endpoint, timeout_s)
        self.spec, self.rate, self.sink, self.extra, self.seed = spec, rate, sink, extra, seed
        self.records: list[dict[str, Any]] = []
        self.phase = "before"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="servinglab-steady", daemon=True)

    def _keep(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.sink(record)

    async def _main(self) -> None:
        client = make_client(self.target, 64)
        rng = np.random.default_rng(self.seed)
        tasks: set[asyncio.Task] = set()
        t0_ns, t0_unix = _clock()
        next_s, index = 0.0, 0
        try:
            while not self._stop.is_set():
                delay = next_s - (time.perf_counter_ns() - t0_ns) / NS
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.05))
                    continue
                extra = self.extra | {"index": index, "phase": self.phase}
                task = asyncio.ensure_future(_send(client, self.target, self.spec, t0_ns, t0_unix, extra, self._keep))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
                next_s += float(rng.exponential(1 / self.rate))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, phase: str) -> None:
        """Requests sent from now on carry this phase (before, during, after)."""
        self.phase = phase


def in_window(records: Sequence[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The records of requests sent in [start, end) (unix seconds)."""
    return [r for r in records if start <= r["sent_at_unix"] < end]
