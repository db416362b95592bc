"""A zero-latency OpenAI-style streaming endpoint on loopback, for tests and the client benchmark.

It answers ``POST /v1/chat/completions`` with ``max_tokens`` one-token chunks and a usage chunk, as vLLM
streams them (usage in every chunk when ``continuous_usage_stats`` is asked), as fast as it can. Modes
set by the prompt's first word make it misbehave on purpose: ``fail`` answers 500, ``cut`` closes the
stream half-way, ``roleonly`` sends the role in a chunk of its own first, ``slow`` waits 50 ms a token.
``echo`` answers with text derived from the whole conversation it was sent (so a test can tell which
history came with which turn), counts every word of every message as a prompt token, waits 20 ms per
message before the first token (a longer history, a longer TTFT), and keeps each (messages, answer) it saw
in ``StreamingEndpoint.conversations``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import zlib

from aiohttp import web

CONVERSATIONS = web.AppKey("conversations", list)  # echo mode: (messages received, answer sent)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body["messages"][-1]["content"]
    if isinstance(prompt, list):  # content parts, as vllm bench serve sends them
        prompt = " ".join(part.get("text", "") for part in prompt)
    mode = prompt.split(" ", 1)[0]
    if mode == "fail":
        return web.json_response({"error": "planted failure"}, status=500)
    n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
    prompt_tokens, pieces = 7, ["t"] * n
    if mode == "echo":
        prompt_tokens, pieces = _echo(request.app, body["messages"], n)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    def event(choices, tokens):
        data = {"id": "x", "object": "chat.completion.chunk", "model": body["model"], "choices": choices}
        if continuous or not choices:
            data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                             "total_tokens": prompt_tokens + tokens}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    if mode == "roleonly":
        await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""}}], 0))
        await asyncio.sleep(0.02)
    if mode == "echo":
        await asyncio.sleep(0.02 * len(body["messages"]))
    for i in range(n):
        if mode == "cut" and i == n // 2:
            request.transport.close()
            return response
        delta = {"content": pieces[i]}
        if i == 0 and mode != "roleonly":
            delta["role"] = "assistant"
        await response.write(event([{"index": 0, "delta": delta, "finish_reason": None if i < n - 1 else "length"}], i + 1))
        if mode == "slow":
            await asyncio.sleep(0.05)
    await response.write(event([], n))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _echo(app: web.Application, messages: list[dict], n: int) -> tuple[int, list[str]]:
    """(prompt tokens, answer pieces) for a conversation: words of every message; n pieces naming the
    message count and a checksum of the messages, so no two histories get the same answer."""
    text = json.dumps(messages, sort_keys=True)
    tag = f"a{len(messages)}x{zlib.crc32(text.encode()):08x}"
    pieces = [f"{tag}.{i} " for i in range(n)]
    app[CONVERSATIONS].append((messages, "".join(pieces)))
    return sum(len(str(m.get("content", "")).split()) for m in messages), pieces


async def prometheus(request: web.Request) -> web.Response:
    """A Prometheus ``query_range`` answer: two series whose values depend on the query's length."""
    query = request.query["query"]
    start, end = float(request.query["start"]), float(request.query["end"])
    values = [[start, str(len(query))], [end, str(2 * len(query))]]
    return web.json_response({"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": values}]}})


class StreamingEndpoint:
    """Runs the endpoint in a thread with its own loop; ``url`` is the root (add /v1).

    It also answers ``/health`` while ``healthy`` is true, and Prometheus' ``/api/v1/query_range``.
    """

    def __init__(self) -> None:
        self.url = ""
        self.healthy = True
        self.conversations: list[tuple[list[dict], str]] = []  # echo mode: (messages received, answer sent)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app[CONVERSATIONS] = self.conversations
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/api/v1/query_range", prometheus)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    def __enter__(self) -> StreamingEndpoint:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def serve_forever(port: int = 0) -> None:  # for benchmarks in their own process
    app = web.Application()
    app[CONVERSATIONS] = []
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda *a: None, backlog=4096)


if __name__ == "__main__":
    import sys

    serve_forever(int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
