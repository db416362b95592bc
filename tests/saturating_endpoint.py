"""An OpenAI-style streaming endpoint with a capacity, for the saturation sweep's tests.

Like ``streaming_endpoint`` it streams ``max_tokens`` one-token chunks and a usage chunk, but each token
waits one engine step, and a step takes ``base_ms + per_stream_ms × streams in flight``, as a batching
engine's step grows with its batch. One stream at a time is fast; many at once share the steps, so the
request rate levels off near ``1000 / (tokens × per_stream_ms)`` requests/s however many are sent: the
server saturates, and its tokens keep flowing evenly (no burst at the end of a stream).

Run it in its own process (``python tests/saturating_endpoint.py BASE_MS PER_STREAM_MS``): it prints its
port, then serves until killed, so that the client under test has its own interpreter.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


def make_app(base_ms: float, per_stream_ms: float) -> web.Application:
    in_flight = [0]

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(choices: list, done: int) -> bytes:
            data = {"id": "x", "object": "chat.completion.chunk", "model": body["model"], "choices": choices,
                    "usage": {"prompt_tokens": 7, "completion_tokens": done, "total_tokens": 7 + done}}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        in_flight[0] += 1
        try:
            for i in range(tokens):
                await asyncio.sleep((base_ms + per_stream_ms * in_flight[0]) / 1000)
                delta = {"role": "assistant", "content": "t"} if i == 0 else {"content": "t"}
                finish = None if i < tokens - 1 else "length"
                await response.write(event([{"index": 0, "delta": delta, "finish_reason": finish}], i + 1))
        finally:
            in_flight[0] -= 1
        await response.write(event([], tokens))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


async def _serve(base_ms: float, per_stream_ms: float) -> None:
    runner = web.AppRunner(make_app(base_ms, per_stream_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(float(sys.argv[1]), float(sys.argv[2])))
