"""The test side's network: a vLLM-like server for every ready pod the test controller brings up, the
cluster's gateway in front of them, and direct connections that stand in for a port-forward.

- Each ready pod gets its own server on 127.0.0.1 (port 0), started before the pod reports Ready and
  stopped (listener closed, open connections reset) when the pod goes: a request sent into a rollout's
  gap really fails. It answers as ``vllm serve`` would with the pod's arguments: ``/health``,
  ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (streamed with ``usage`` chunks,
  ``continuous_usage_stats`` and ``[DONE]``, or whole), ``/metrics``. Its ``model`` field is the first
  value of the engine container's last ``--served-model-name`` (vLLM answers with its first served
  name); a request for a model it does not serve gets vLLM's 404. Pods whose engine runs with
  ``--ssl-certfile`` (llm-d's workload) serve TLS with a self-signed certificate. ``/tokenize`` and
  ``/detokenize`` use one token per word; ``/metrics`` counts prefix-cache queries and hits in prompt words,
  a hit per whole block of ``BLOCK_WORDS`` from the prompt's start that the pod saw before. Nothing routes
  by prefix: the gateway spreads requests in turn, whatever they share.
- The gateway (``gateway_address``, what a study sets as ``platform.gateway_address``) routes by the
  Host header (the ``status.url`` host the controller writes) to the top object's ready pods, splits
  traffic by the current percentages (a seeded random draw per request, as Istio's weighted clusters
  do), streams responses through, holds a request for a Knative revision at zero until the controller
  brought a pod up (503 after ``activation_timeout_s``), answers 404 for an unknown host and 503 when a
  service has no ready pod, and adds a fixed per-request overhead.
- ``connect(pod, port)`` opens a TCP connection to a pod's server, as the API server's port-forward
  would (refused when the pod has no server or nothing listens on that port).

``EmulatedServing`` starts the controller and the network together.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import json
import random
import re
import shlex
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web
from kube_controller import Controller

from servinglab.platforms.kube import Kube

ENGINE_CONTAINERS = ("vllm", "kserve-container", "main")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer",
              "proxy-connection"}  # fmt: skip
WORDS = ("the", "model", "answers", "with", "a", "few", "plain", "words", "and", "then", "stops")
BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds")
# Prompt words a cached block holds: a pod counts prefix-cache hits per whole block from the prompt's start.
BLOCK_WORDS = 16


# --- what a pod runs ---------------------------------------------------------------------------------


def engine_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["spec"]["containers"]
    return next((c for c in containers if c["name"] in ENGINE_CONTAINERS), containers[0])


def engine_argv(container: dict[str, Any]) -> list[str]:
    """The engine's command line: command and args, and for llm-d's ``main`` container the arguments KServe's
    config appends from ``VLLM_ADDITIONAL_ARGS``."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if container["name"] == "main":
        extra = next((e.get("value") for e in container.get("env") or [] if e.get("name") == "VLLM_ADDITIONAL_ARGS"), "")
        argv += shlex.split(extra or "")
    return argv


def served_names(argv: list[str]) -> list[str]:
    """``--served-model-name`` takes one or more values; a later occurrence replaces an earlier one, as
    argparse does. Empty when the engine was given none."""
    names: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--served-model-name":
            i += 1
            names = []
            while i < len(argv) and not argv[i].startswith("-"):
                names.append(argv[i])
                i += 1
            continue
        if argv[i].startswith("--served-model-name="):
            names = [argv[i].split("=", 1)[1]]
        i += 1
    return names


def _option(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def container_port(container: dict[str, Any], argv: list[str]) -> int:
    ports = [p["containerPort"] for p in container.get("ports") or [] if "containerPort" in p]
    return ports[0] if ports else int(_option(argv, "--port") or 8000)


def _tls_context() -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1, as llm-d's workload serves its own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = Path(folder) / "tls.crt", Path(folder) / "tls.key"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
    return context


# --- one pod's server ----------------------------------------------------------------------------------


class PodServer:
    """One pod's engine: answers as ``vllm serve`` does with the pod's arguments, until the pod goes."""

    def __init__(self, network: Network, pod: dict[str, Any], revision: str, service: str) -> None:
        container = engine_container(pod)
        argv = engine_argv(container)
        self.network, self.revision, self.service = network, revision, service
        self.pod_name = pod["metadata"]["name"]
        self.served = served_names(argv)
        self.container_port = container_port(container, argv)
        self.tls = "--ssl-certfile" in argv or any(a.startswith("--ssl-certfile=") for a in argv)
        self.max_model_len = int(_option(argv, "--max-model-len") or 4096)
        tag = (container.get("image") or "").rpartition(":")[2]
        self.version = m.group(1) if (m := re.match(r"v?(\d+\.\d+(\.\d+)?)", tag)) else "0.0.0"
        self.port = 0
        self.running = 0
        self.totals = Counter()  # request_success, prompt_tokens, generation_tokens, prefix_cache_queries, _hits
        self.cached_blocks: set[int] = set()  # the chained hashes of the prompt blocks this pod has seen
        self.histograms = {name: [0] * len(BUCKETS_S) + [0.0, 0] for name in HISTOGRAMS}  # buckets…, sum, count
        self._open: set[asyncio.Transport] = set()  # connections with a request being answered

    def model(self, body: dict[str, Any]) -> str:
        return self.served[0] if self.served else str(body.get("model", ""))

    async def start(self) -> None:
        app = web.Application(middlewares=[self._track])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/version", self._version)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.network.tls if self.tls else None)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """The pod is gone: nothing listens any more, and connections being answered are reset."""
        await self._site.stop()
        for transport in list(self._open):
            transport.abort()
        await self._runner.cleanup()

    @web.middleware
    async def _track(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        counted = request.path not in ("/health", "/metrics")
        if request.transport is not None:
            self._open.add(request.transport)
        if counted:  # what Knative's queue-proxy reports to the autoscaler
            self.network.controller.request_started(self.revision)
        try:
            return await handler(request)
        finally:
            self._open.discard(request.transport)
            if counted:
                self.network.controller.request_ended(self.revision)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def _models(self, request: web.Request) -> web.Response:
        names = self.served or ["/mnt/models"]
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": names[0],
             "parent": None, "max_model_len": self.max_model_len} for n in names]})  # fmt: skip

    async def _tokenize(self, request: web.Request) -> web.Response:
        tokens = self.network.tokenize((await request.json()).get("prompt", ""))
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len})

    async def _detokenize(self, request: web.Request) -> web.Response:
        return web.json_response({"prompt": self.network.detokenize((await request.json()).get("tokens", []))})

    def _look_up_prefix(self, words: list[str]) -> int:
        """Prompt words found in this pod's cache: whole blocks from the start, each block's hash chained to
        the ones before it (as vLLM's are), up to the first block not cached; then every block is cached."""
        hits, chain, found = 0, 0, True
        for start in range(0, len(words) - BLOCK_WORDS + 1, BLOCK_WORDS):
            chain = hash((chain, *words[start:start + BLOCK_WORDS]))
            found = found and chain in self.cached_blocks
            hits += BLOCK_WORDS if found else 0
            self.cached_blocks.add(chain)
        return hits

    async def _metrics(self, request: web.Request) -> web.Response:
        label = f'model_name="{self.served[0] if self.served else "/mnt/models"}"'
        lines = [
            "# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{{{label}}} {self.running}",
            "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{{{label}}} 0",
            "# TYPE vllm:kv_cache_usage_perc gauge", f"vllm:kv_cache_usage_perc{{{label}}} 0.0",
            "# TYPE vllm:prompt_tokens_total counter", f"vllm:prompt_tokens_total{{{label}}} {self.totals['prompt_tokens']}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {self.totals['generation_tokens']}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{finished_reason="length",{label}}} {self.totals["request_success"]}',
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{label}}} {self.totals['prefix_cache_queries']}",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{label}}} {self.totals['prefix_cache_hits']}",
            "# TYPE vllm:num_preemptions_total counter", f"vllm:num_preemptions_total{{{label}}} 0",
        ]  # fmt: skip
        for name, values in self.histograms.items():
            lines.append(f"# TYPE {name} histogram")
            for bound, count in zip(BUCKETS_S, values):
                lines.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else bound}",{label}}} {count}')
            lines += [f"{name}_sum{{{label}}} {values[-2]}", f"{name}_count{{{label}}} {values[-1]}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        """A chat or text completion of ``max_tokens`` tokens, one per ``token_delay_s`` (the first too)."""
        body = await request.json()
        if self.served and body.get("model") not in self.served:
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                "type": "NotFoundError", "param": "model", "code": 404}}, status=404)  # fmt: skip
        chat = request.path.endswith("/chat/completions")
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        prompt = json.dumps(body.get("messages") if chat else body.get("prompt"))
        prompt_tokens = max(1, len(prompt.split()))
        self.totals.update(prefix_cache_queries=prompt_tokens, prefix_cache_hits=self._look_up_prefix(prompt.split()))
        model, delay = self.model(body), self.network.token_delay_s
        self.network.count(self, model)
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
                "system_fingerprint": f"vllm-{self.version}-{self.revision[-5:]}"}  # fmt: skip
        words = [f" {WORDS[i % len(WORDS)]}" for i in range(n)]
        started = time.perf_counter()
        self.running += 1
        try:
            if not body.get("stream"):
                await asyncio.sleep(delay * n)
                self._observe("vllm:time_to_first_token_seconds", time.perf_counter() - started)
                text = "".join(words).strip()
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})  # fmt: skip
                self._done(prompt_tokens, n, started)
                return web.json_response({**base, "object": "chat.completion" if chat else "text_completion",
                                          "choices": [choice], "usage": self._usage(prompt_tokens, n)})  # fmt: skip
            options = body.get("stream_options") or {}
            continuous = bool(options.get("continuous_usage_stats"))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)

            def event(choices: list[dict[str, Any]], tokens: int) -> bytes:
                data = {**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": choices}
                if continuous or (not choices and options.get("include_usage")):
                    data["usage"] = self._usage(prompt_tokens, tokens)
                return b"data: " + json.dumps(data).encode() + b"\n\n"

            await asyncio.sleep(delay)  # the prefill
            if chat:  # vLLM's role-only first chunk, sent with the first token's
                await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], 0))  # fmt: skip
            previous = time.perf_counter()
            self._observe("vllm:time_to_first_token_seconds", previous - started)
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(delay)
                    now = time.perf_counter()
                    self._observe("vllm:inter_token_latency_seconds", now - previous)
                    previous = now
                last = "length" if i == n - 1 else None
                choice = ({"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": last} if chat
                          else {"index": 0, "text": word, "logprobs": None, "finish_reason": last})  # fmt: skip
                await response.write(event([choice], i + 1))
            if options.get("include_usage"):
                await response.write(event([], n))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self._done(prompt_tokens, n, started)
            return response
        except ConnectionResetError:  # the client, the gateway or the pod's end cut the stream
            return response
        finally:
            self.running -= 1

    def _observe(self, name: str, seconds: float) -> None:
        values = self.histograms[name]
        for i, bound in enumerate(BUCKETS_S):
            if seconds <= bound:
                values[i] += 1
        values[-2] += seconds
        values[-1] += 1

    @staticmethod
    def _usage(prompt_tokens: int, tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}

    def _done(self, prompt_tokens: int, tokens: int, started: float) -> None:
        self.totals.update(request_success=1, prompt_tokens=prompt_tokens, generation_tokens=tokens)
        self._observe("vllm:e2e_request_latency_seconds", time.perf_counter() - started)


# --- the network -----------------------------------------------------------------------------------


class Network:
    """Pod servers, the gateway and direct connections, on one event loop in a thread.

    Parameters
    ----------
    token_delay_s: each server's time per generated token (the first one too), so latencies are non-zero.
    gateway_overhead_ms: what the gateway adds to every request it forwards.
    activation_timeout_s: how long the gateway holds a request for a Knative revision at zero.
    seed: of the gateway's traffic split.
    """

    def __init__(self, token_delay_s: float = 0.001, gateway_overhead_ms: float = 2.0,
                 activation_timeout_s: float = 10.0, seed: int = 0) -> None:  # fmt: skip
        self.token_delay_s = token_delay_s
        self.gateway_overhead_s = gateway_overhead_ms / 1000
        self.activation_timeout_s = activation_timeout_s
        self.controller: Controller | None = None
        self.servers: dict[str, PodServer] = {}  # pod name → its server, while the pod is ready
        self.requests_seen: Counter = Counter()  # revision → inference requests its pods answered
        self.requests_by_model: Counter = Counter()  # the model the answers named → count
        self.requests_by_pod: Counter = Counter()
        self.gateway_answers: Counter = Counter()  # (host, HTTP status) → count, as the gateway answered
        self.vocabulary: dict[str, int] = {}  # the tokenizer's words, grown as texts are tokenized
        self.gateway_address = ""
        self.tls = _tls_context()
        self._rng = random.Random(seed)
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-network", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{path:.*}", self._gateway)
            self._gateway_runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
            await self._gateway_runner.setup()
            site = web.TCPSite(self._gateway_runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            self.gateway_address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            # A new connection per forwarded request: a pod that went leaves no pooled connection behind.
            self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))  # fmt: skip

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> Network:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test network did not start")
        return self

    def close(self) -> None:
        async def stop() -> None:
            for server in list(self.servers.values()):
                await server.stop()
            self.servers.clear()
            await self._client.close()
            await self._gateway_runner.cleanup()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # --- what the controller tells ---------------------------------------------------------------------

    def pod_ready(self, pod: dict[str, Any], revision: str, service: str) -> None:
        """Start the pod's server; returns once it listens."""

        async def start() -> None:
            server = PodServer(self, pod, revision, service)
            await server.start()
            self.servers[server.pod_name] = server

        if self._loop.is_running():  # a controller step finishing after the network closed starts nothing
            asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def pod_gone(self, pod_name: str) -> None:
        """Stop the pod's server (nothing happens for a pod that had none); returns once it is down."""

        async def stop() -> None:
            server = self.servers.pop(pod_name, None)
            if server is not None:
                await server.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)

    def tokenize(self, text: str) -> list[int]:
        """The emulated model's tokenizer, shared by every pod: one token per whitespace-separated word."""
        return [self.vocabulary.setdefault(word, len(self.vocabulary)) for word in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocabulary.items()}
        return "".join(f" {words.get(i, '?')}" for i in ids)

    def count(self, server: PodServer, model: str) -> None:
        self.requests_seen[server.revision] += 1
        self.requests_by_model[model] += 1
        self.requests_by_pod[server.pod_name] += 1

    # --- direct connections --------------------------------------------------------------------------

    def connect(self, pod_name: str, port: int) -> socket.socket:
        """A TCP connection to ``pod_name:port``, as a port-forward opens one; refused when the pod has no
        server or its engine does not listen on ``port``."""
        server = self.servers.get(pod_name)
        if server is None or server.container_port != int(port):
            raise ConnectionRefusedError(f"pod {pod_name} does not listen on port {port}")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on relayed small writes
        sock.settimeout(None)
        return sock

    def connector(self, pod_name: str, port: int) -> Callable[[], socket.socket]:
        """What ``KubernetesPlatform.pod_connector`` returns: opens one connection per call."""
        return lambda: self.connect(pod_name, port)

    # --- the gateway ---------------------------------------------------------------------------------

    def _servers_of(self, service: str) -> list[PodServer]:
        return [s for s in self.servers.values() if s.service == service]

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        host = (request.headers.get("Host") or "").split(":")[0].lower()
        answer = await self._route(request, host)
        self.gateway_answers[(host, answer.status)] += 1
        return answer

    async def _route(self, request: web.Request, host: str) -> web.StreamResponse:
        route = self.controller.route(host) if self.controller else None
        if not route:
            return web.Response(status=404, headers={"server": "istio-envoy"})
        services = [s for s, _ in route]
        weights = [p for _, p in route]
        service = self._rng.choices(services, weights=weights)[0] if sum(weights) > 0 else services[0]
        await asyncio.sleep(self.gateway_overhead_s)
        servers = self._servers_of(service)
        if not servers and self.controller.activate(service):
            # The activator holds the request until the revision has a pod again.
            deadline = time.monotonic() + self.activation_timeout_s
            while not servers and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                servers = self._servers_of(service)
            if not servers:
                return web.Response(status=503, text=f"activator: revision {service} did not become ready within "
                                                     f"{self.activation_timeout_s:g} s", headers={"server": "istio-envoy"})  # fmt: skip
        if not servers:
            return web.Response(status=503, text="no healthy upstream", headers={"server": "istio-envoy"})
        server = servers[next(self._turn) % len(servers)]
        return await self._forward(request, server)

    async def _forward(self, request: web.Request, server: PodServer) -> web.StreamResponse:
        """Send the request to the pod and stream its answer back; a pod that resets mid-stream resets the
        client's stream too."""
        scheme = "https" if server.tls else "http"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        started = time.perf_counter()
        try:
            upstream = await self._client.request(request.method, f"{scheme}://127.0.0.1:{server.port}{request.rel_url}",
                                                  headers=headers, data=body, ssl=False if server.tls else True)  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:
            return web.Response(status=503, headers={"server": "istio-envoy"}, text="upstream connect error or "
                                f"disconnect/reset before headers. reset reason: connection failure ({type(exc).__name__})")  # fmt: skip
        try:
            answer = web.StreamResponse(status=upstream.status, headers={
                **{k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
                "server": "istio-envoy", "x-envoy-upstream-service-time": str(int((time.perf_counter() - started) * 1000))})  # fmt: skip
            await answer.prepare(request)
            try:
                async for data in upstream.content.iter_any():
                    await answer.write(data)
            except (aiohttp.ClientError, OSError):
                if request.transport is not None:
                    request.transport.abort()
                return answer
            await answer.write_eof()
            return answer
        finally:
            upstream.release()


class EmulatedServing:
    """The test controller and the network together, for a test (a context manager).

    ``gateway_address`` is what a study sets as ``platform.gateway_address``; ``connect(pod, port)`` and
    ``connector(pod, port)`` stand in for the port-forward (monkeypatch ``KubernetesPlatform.pod_connector``
    with ``lambda platform, pod, port: serving.connector(pod, port)``); ``requests_seen`` counts inference
    requests per revision (Knative revision or ReplicaSet), ``requests_by_model`` per answered model name.
    Other arguments are the ``Controller``'s and the ``Network``'s.
    """

    def __init__(self, kube: Kube, namespace: str, scenario: str = "ok", step_s: float = 0.05, idle_s: float = 0.5,
                 gateway_overhead_ms: float = 2.0, token_delay_s: float = 0.001, activation_timeout_s: float = 10.0,
                 seed: int = 0, emulator: Any = None) -> None:  # fmt: skip
        self.network = Network(token_delay_s, gateway_overhead_ms, activation_timeout_s, seed)
        self.controller = Controller(kube, namespace, scenario=scenario, step_s=step_s, emulator=emulator,
                                     idle_s=idle_s, network=self.network)  # fmt: skip
        self.network.controller = self.controller

    def __enter__(self) -> EmulatedServing:
        self.network.start()
        try:
            self.controller.__enter__()
        except BaseException:
            self.network.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.controller.__exit__(*exc)
        finally:
            self.network.close()

    @property
    def gateway_address(self) -> str:
        return self.network.gateway_address

    @property
    def requests_seen(self) -> Counter:
        return self.network.requests_seen

    @property
    def requests_by_model(self) -> Counter:
        return self.network.requests_by_model

    def connect(self, pod_name: str, port: int) -> socket.socket:
        return self.network.connect(pod_name, port)

    def connector(self, pod_name: str, port: int) -> Callable[[], socket.socket]:
        return self.network.connector(pod_name, port)
