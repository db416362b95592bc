"""The load generator: streaming chat completions through ``openai.AsyncOpenAI``, timed chunk by chunk.

The hot path is kept lean because client capacity decides what can be measured: the SDK runs on its
aiohttp transport, responses are read as raw server-sent-event lines (``with_streaming_response``), each
line is stamped with ``time.perf_counter_ns()`` on arrival and decoded once with orjson, and only what the
metrics need is kept. The SDK's typed stream objects and its default httpx transport cost several times
the client's capacity on a small machine.

Token-bearing chunks are found by the token count in ``usage`` when the server streams it with
``continuous_usage_stats`` (vLLM does), otherwise by the first delta that is not role-only; never by
non-empty text, since a token can decode to nothing.

A stage appends one record per request to its sink as the request ends, so an interruption or a dead
server keeps everything measured before it.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import aiohttp
import httpx2
import openai
import orjson

from .outbound import client_options
from .schedule import arrival_offsets_s
from .workload import RequestSpec

NS = 1_000_000_000


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible endpoint and how to talk to it."""

    base_url: str  # ends in /v1
    model: str
    api_key: str | None = field(default=None, repr=False)
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    continuous_usage: bool = True  # ask for usage in every chunk (vLLM's continuous_usage_stats)
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (a gateway's Host header)
    verify_tls: bool | str = True  # True: the system's CAs; a path: that CA file; False: not checked
    proxy: str | None = None  # only the study's; the environment's proxy settings are ignored


@dataclass(frozen=True)
class StageSpec:
    """How one stage sends its requests."""

    request_rate: float = math.inf  # requests/s; inf sends all at once (bounded by max_concurrency)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    duration_s: float | None = None  # stop sending after this long (the requests in flight finish)


def make_client(target: Target, pool_size: int) -> openai.AsyncOpenAI:
    """One client per stage: no retries, an explicit timeout, a connection pool larger than needed, and
    no proxy or CA taken from the environment (:mod:`servinglab.measure.outbound`)."""
    http_client = openai.DefaultAioHttpClient(
        **client_options(target.verify_tls, target.proxy),
        limits=httpx2.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
        timeout=httpx2.Timeout(target.request_timeout_s, connect=min(30.0, target.request_timeout_s)),
    )
    return openai.AsyncOpenAI(
        base_url=target.base_url,
        api_key=target.api_key or "no-key",
        max_retries=0,  # a retried request would hide the failure being measured
        timeout=target.request_timeout_s,
        http_client=http_client,
        default_headers=dict(target.headers) or None,
    )


class TokenClock:
    """Finds the token-bearing chunks of one stream and when they arrived.

    With ``usage.completion_tokens`` in every chunk (continuous usage), a chunk bears tokens when that
    count grows, however many tokens it carries and whatever their text. Without it, the first chunk
    that is not a role-only delta bears the first token, and every later chunk with a delta bears one.
    """

    __slots__ = ("chunk_tokens", "model", "sent_ns", "token_ns", "tokens", "usage")

    def __init__(self, sent_ns: int) -> None:
        self.sent_ns = sent_ns
        self.token_ns: list[int] = []
        self.chunk_tokens: list[int] = []  # tokens each token-bearing chunk carried (a server may pack several)
        self.tokens = 0  # counted on the client side
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None  # the name the server answered as: which revision served the request

    def feed(self, now_ns: int, chunk: dict[str, Any]) -> None:
        if self.model is None:
            self.model = chunk.get("model")
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:
            return  # the usage-only chunk at the end carries no token
        if usage and usage.get("completion_tokens") is not None:
            if usage["completion_tokens"] > self.tokens:
                self.chunk_tokens.append(usage["completion_tokens"] - self.tokens)
                self.tokens = usage["completion_tokens"]
                self.token_ns.append(now_ns - self.sent_ns)
            return
        delta = choices[0].get("delta") or {}
        role_only = "role" in delta and not delta.get("content") and not self.token_ns
        if not role_only and ("content" in delta or "reasoning_content" in delta):
            self.tokens += 1
            self.chunk_tokens.append(1)
            self.token_ns.append(now_ns - self.sent_ns)


def _refused(exc: BaseException) -> bool:
    """Whether a failure was a refused connection (nothing listening: a server restarting or gone), which
    the aiohttp transport reports as a connect timeout."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or "Connect call failed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _error_kind(exc: BaseException) -> str:
    if _refused(exc):
        return "connection_refused"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError, aiohttp.ClientPayloadError,
                        aiohttp.ServerDisconnectedError)):  # fmt: skip
        return "disconnect"
    return type(exc).__name__


def _body_chunks(response: httpx2.Response):
    """The response body as it arrives.

    On the client's aiohttp transport with an uncompressed body, read the aiohttp stream under the
    httpx response directly: each token chunk otherwise passes three more async generators (and their
    exception mapping) before the client can stamp it. Anything else goes through httpx.
    """
    inner = getattr(getattr(response, "stream", None), "_stream", None)
    raw = getattr(inner, "_aiohttp_response", None)
    if raw is not None and response.headers.get("content-encoding", "identity") == "identity":
        return raw.content.iter_any()
    return response.aiter_bytes()


async def gather_until_stopped(tasks: list[asyncio.Future], stop: threading.Event | None) -> list[Any]:
    """Every task's result (an exception or ``CancelledError`` as its result), the tasks cancelled as soon as
    ``stop`` is set: how a stage or a set of sessions ends early on Ctrl-C or a deadline."""

    async def watch(event: threading.Event) -> None:
        while not event.is_set():
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()

    watcher = asyncio.ensure_future(watch(stop)) if stop is not None else None
    try:
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if watcher:
            watcher.cancel()


async def send_one(client: openai.AsyncOpenAI, target: Target, spec: RequestSpec, t0_ns: int,
                   messages: list[dict[str, str]] | None = None, keep_text: bool = False) -> dict[str, Any]:  # fmt: skip
    """Send one streaming request and time it; returns its record (never raises for HTTP trouble).

    ``messages`` replaces the single user message of ``spec.prompt`` (a conversation's history and its next
    turn); with ``keep_text`` the record's ``text`` holds the answer's content as it streamed, to be sent back
    as history.
    """
    stream_options: dict[str, Any] = {"include_usage": True}
    if target.continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body: dict[str, Any] = {
        "model": target.model,
        "messages": messages if messages is not None else [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": stream_options,
    }
    if target.ignore_eos:
        body["ignore_eos"] = True  # vLLM's field; a top-level key of the request
    chunks = 0
    status: int | None = None
    error_kind = error = None
    done = False
    text: list[str] | None = [] if keep_text else None
    sent_ns = time.perf_counter_ns()
    clock = TokenClock(sent_ns)
    try:
        # The client's own request path with the body as plain bytes: the typed create() spends a
        # quarter of the client's time transforming its parameters, and its stream objects more.
        response = await client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=orjson.dumps(body),  # encoded once here, not deep-copied and re-encoded per attempt
            options={"headers": {"Content-Type": "application/json"}},
            stream=True,
        )
        status = response.status_code
        try:
            pending = b""
            async for data in _body_chunks(response):
                now = time.perf_counter_ns()  # every event in this read arrived now
                pending += data
                while (end := pending.find(b"\n\n")) >= 0:
                    event, pending = pending[:end], pending[end + 2 :]
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        chunks += 1
                        chunk = orjson.loads(payload)
                        clock.feed(now, chunk)
                        if text is not None:
                            text.append(_content(chunk))
        finally:
            await response.aclose()
    except (openai.APIError, httpx2.HTTPError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        error_kind, error = _error_kind(exc), str(exc)[:300]
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
        elapsed_s = (time.perf_counter_ns() - sent_ns) / NS
        if error_kind == "timeout" and elapsed_s < 0.9 * target.request_timeout_s:
            # The aiohttp transport reports a connection closed before any answer as a timeout too.
            error_kind = "connection_error"
    if error_kind is None and not done:
        error_kind, error = "disconnect", "the stream ended without [DONE]"
    token_ns, usage = clock.token_ns, clock.usage
    output_tokens = (usage or {}).get("completion_tokens")
    ok = error_kind is None and bool(token_ns)
    if error_kind is None and not token_ns:
        error_kind, error = "no_tokens", "the stream carried no token"
    record = {
        "ok": ok,
        "status": status,
        "error_kind": error_kind,
        "error": error,
        "sent_s": (sent_ns - t0_ns) / NS,
        "ttft_ms": token_ns[0] / 1e6 if token_ns else None,
        "e2el_ms": token_ns[-1] / 1e6 if token_ns else None,
        # Arrival of every token-bearing chunk after the send, for ITL and timelines.
        "token_ms": [round(t / 1e6, 4) for t in token_ns],
        "chunk_tokens": clock.chunk_tokens,
        "output_tokens": output_tokens,
        "client_tokens": clock.tokens,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "expected_prompt_tokens": spec.prompt_len,
        "max_tokens": spec.max_tokens,
        "chunks": chunks,
        "model": clock.model,
    }
    if text is not None:
        record["text"] = "".join(text)
    return record


def _content(chunk: dict[str, Any]) -> str:
    """The answer text a chunk carries (its reasoning, if any, is not part of the answer sent back as history)."""
    choices = chunk.get("choices")
    return ((choices[0].get("delta") or {}).get("content") or "") if choices else ""


class LoopLagProbe:
    """How late the event loop wakes a 10 ms ticker: a busy client shows here before anywhere else."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.lags_ms: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lags_ms.append((time.perf_counter() - t - self.period_s) * 1000)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


@dataclass
class StageOutcome:
    """What a stage did, beyond its per-request records."""

    duration_s: float  # t0 → last request finished
    sent: int
    completed: int
    failed: int
    cancelled: int
    send_window_s: float  # first send → last send
    schedule_lag_ms: list[float]
    loop_lag_ms: list[float]
    interrupted: bool
    started_unix_s: float | None = None  # wall-clock time of t0, to place the stage beside other clients'


async def run_stage_async(
    target: Target,
    requests: list[RequestSpec],
    stage: StageSpec,
    sink: Callable[[dict[str, Any]], None],
    warmups: list[RequestSpec] = (),
    stop: threading.Event | None = None,
    offsets_s: Sequence[float] | None = None,
    start_at_unix_s: float | None = None,
) -> StageOutcome:
    """Send ``warmups`` (recorded, marked, not timed into the stage), then ``requests`` per ``stage``.

    ``sink`` receives each request's record the moment it ends. ``stop`` (set from another thread)
    cancels what is in flight; those requests are recorded as cancelled. ``offsets_s`` gives each
    request's send time from the stage start instead of drawing them from ``stage`` (a slice of a
    schedule computed for several clients); ``start_at_unix_s`` holds the stage start until that
    wall-clock time (after the warmups), so clients on several machines start together.
    """
    pool = (stage.max_concurrency or len(requests) or 1) + 8
    client = make_client(target, pool)
    try:
        if warmups:
            limit = asyncio.Semaphore(stage.max_concurrency or len(warmups))
            t_w = time.perf_counter_ns()

            async def warm(i: int, spec: RequestSpec) -> None:
                async with limit:
                    record = await send_one(client, target, spec, t_w)
                sink(record | {"index": i, "warmup": True, "scheduled_s": 0.0, "schedule_lag_ms": 0.0})

            await asyncio.gather(*(warm(i, s) for i, s in enumerate(warmups)))

        if offsets_s is None:
            offsets = arrival_offsets_s(len(requests), stage.request_rate, stage.burstiness, stage.seed)
        elif len(offsets_s) != len(requests):
            raise ValueError(f"{len(offsets_s)} send offsets for {len(requests)} requests")
        else:
            offsets = offsets_s
        # A full collection walks every object the process holds (transformers and torch hold millions)
        # and stops the event loop for 100 ms or more: move what exists now out of the collector's
        # reach for the stage, as vllm bench serve does.
        gc.collect()
        gc.freeze()
        limit = asyncio.Semaphore(stage.max_concurrency) if stage.max_concurrency else None
        if start_at_unix_s is not None:
            while (wait_s := start_at_unix_s - time.time()) > 0 and not (stop is not None and stop.is_set()):
                await asyncio.sleep(min(wait_s, 0.05))
        probe = LoopLagProbe()
        probe.start()
        schedule_lag: list[float] = []
        sends: list[float] = []
        counts = {"completed": 0, "failed": 0, "cancelled": 0}
        t0 = time.perf_counter_ns()
        t0_unix_s = time.time()
        last_end = [t0]

        def over_time() -> bool:
            return stage.duration_s is not None and (time.perf_counter_ns() - t0) / NS > stage.duration_s

        async def fire(i: int, spec: RequestSpec, at_s: float) -> None:
            target_ns = t0 + int(at_s * NS)
            delay = target_ns - time.perf_counter_ns()
            if delay > 0:
                await asyncio.sleep(delay / NS)
            if over_time():
                return
            # Lag: how late the request woke for its slot in the schedule (a wait for a concurrency
            # slot is the design of a capped stage, not lag).
            lag_ms = max(0.0, (time.perf_counter_ns() - target_ns) / 1e6)
            if limit:
                await limit.acquire()
            try:
                if over_time():  # checked again: the wait for a slot may have outlasted the stage
                    return
                schedule_lag.append(lag_ms)
                sends.append((time.perf_counter_ns() - t0) / NS)
                try:
                    record = await send_one(client, target, spec, t0)
                except asyncio.CancelledError:
                    counts["cancelled"] += 1
                    sink({"index": i, "warmup": False, "ok": False, "error_kind": "cancelled",
                          "scheduled_s": at_s, "schedule_lag_ms": lag_ms})  # fmt: skip
                    raise
                except Exception as exc:  # noqa: BLE001 - an unforeseen error still leaves its record
                    record = {"ok": False, "error_kind": type(exc).__name__, "error": str(exc)[:300],
                              "token_ms": [], "ttft_ms": None, "e2el_ms": None}  # fmt: skip
            finally:
                if limit:
                    limit.release()
            counts["completed" if record["ok"] else "failed"] += 1
            last_end[0] = time.perf_counter_ns()
            sink(record | {"index": i, "warmup": False, "scheduled_s": at_s, "schedule_lag_ms": round(lag_ms, 4)})

        tasks = [asyncio.ensure_future(fire(i, s, float(at))) for i, (s, at) in enumerate(zip(requests, offsets))]
        try:
            results = await gather_until_stopped(tasks, stop)
            interrupted = any(isinstance(r, asyncio.CancelledError) for r in results)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            await probe.stop()
            gc.unfreeze()
        return StageOutcome(
            duration_s=(last_end[0] - t0) / NS,
            sent=len(sends),
            completed=counts["completed"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
            send_window_s=(max(sends) - min(sends)) if sends else 0.0,
            schedule_lag_ms=schedule_lag,
            loop_lag_ms=probe.lags_ms,
            interrupted=interrupted or bool(stop is not None and stop.is_set()),
            started_unix_s=t0_unix_s,
        )
    finally:
        await client.close()


def run_in_thread(work: Callable[[threading.Event], Any]) -> Any:
    """Run ``work(stop)`` to completion from synchronous code: at once in a plain script, in a worker thread
    with its own event loop inside a running one (a Jupyter cell). Ctrl-C in the calling thread sets
    ``stop`` and waits for the work to end, so what it recorded stays."""
    stop = threading.Event()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return work(stop)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = work(stop)
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc

    worker = threading.Thread(target=body, name="servinglab-stage", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        worker.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_stage(
    target: Target,
    requests: list[RequestSpec],
    stage: StageSpec,
    sink: Callable[[dict[str, Any]], None],
    warmups: list[RequestSpec] = (),
    offsets_s: Sequence[float] | None = None,
) -> StageOutcome:
    """Run a stage from synchronous code: a plain script, or a Jupyter cell whose loop already runs.

    Inside a running event loop (Jupyter) the stage gets its own loop in a worker thread; Ctrl-C
    (KeyboardInterrupt in the calling thread) stops it, and the records written so far stay.
    ``offsets_s`` as in :func:`run_stage_async`.
    """
    return run_in_thread(lambda stop: asyncio.run(run_stage_async(target, requests, stage, sink, warmups, stop, offsets_s)))
