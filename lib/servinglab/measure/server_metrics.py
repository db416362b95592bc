"""The server's own view of a stage: ``/metrics`` of every engine process of the layer before and after,
gauges sampled during, GPU telemetry over the stage's window.

Besides latency histograms and token counters, the scheduler's view: prefix-cache queries and hits (in
tokens, so their ratio is the share of prompt tokens served from the cache), requests finished and
preempted, KV-cache usage, requests running and waiting, queue time.

A layer may run several pods (replicas, or pods behind llm-d's scheduler): each is scraped, and the
layer's figures are merged from them. Counters and histograms are deltas over the stage, summed across
pods (histograms bucket by bucket). Count gauges (requests running and waiting) are summed across pods at
each sample; ratio gauges (KV-cache usage) are taken as their mean and their maximum across pods; every
gauge is also kept per pod. Where the study names a Prometheus server (a DCGM exporter on the cluster),
GPU utilisation and memory over the stage's time window are read from it too.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .outbound import client_options, verify_option

if TYPE_CHECKING:
    from ..config import Telemetry
    from ..platforms.base import Endpoint, MetricsTarget

HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "tpot_legacy": "vllm:time_per_output_token_seconds",
    "e2el": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
}
COUNTERS = {"prompt_tokens": "vllm:prompt_tokens", "generation_tokens": "vllm:generation_tokens",
            # Prompt tokens looked up in the prefix cache, and those found (vLLM V1's names, 0.32.0).
            "prefix_cache_queries": "vllm:prefix_cache_queries", "prefix_cache_hits": "vllm:prefix_cache_hits"}
# The scheduler's counters: requests it finished (every finish reason) and requests it preempted to free KV cache.
COUNTERS |= {"requests": "vllm:request_success", "preemptions": "vllm:num_preemptions"}
# Gauges that count (summed across pods) and gauges that are a share of one pod's capacity (mean and max).
COUNT_GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting"}
RATIO_GAUGES = {"kv_cache_usage": "vllm:kv_cache_usage_perc"}
GAUGES = {**COUNT_GAUGES, **RATIO_GAUGES}


def parse(text: str) -> dict[str, Any]:
    """Prometheus text → {metric: value} for counters and gauges, {metric: histogram} for histograms."""
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            buckets: dict[float, float] = {}
            total = count = 0.0
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
            out[family.name] = {"sum": total, "count": count, "buckets": dict(sorted(buckets.items()))}
        elif family.type in ("counter", "gauge"):
            out[family.name] = sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return out


def _headers(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(extra or {}) | ({"Authorization": f"Bearer {api_key}"} if api_key else {})


def scrape(root_url: str, api_key: str | None = None, timeout_s: float = 10.0, headers: dict[str, str] | None = None,
           verify_tls: bool | str = True) -> dict[str, Any] | None:  # fmt: skip
    """One ``GET /metrics``; None when the server does not answer (the stage records that)."""
    try:
        answer = httpx.get(f"{root_url}/metrics", headers=_headers(api_key, headers), timeout=timeout_s,
                           trust_env=False, verify=verify_option(verify_tls))  # fmt: skip
        answer.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse(answer.text)


# A bucket no wider than this share of its upper bound is narrow enough to interpolate inside: the value read
# is then off by less than this. A wider bucket only bounds the percentile.
NARROW_BUCKET = 0.2


def histogram_quantile(q: float, buckets: dict[float, float]) -> tuple[str, float] | None:
    """Quantile ``q`` of a histogram's cumulative bucket counts, as honestly as the buckets allow:
    ``("value", x)`` interpolated inside a narrow bucket, ``("le", bound)`` when its bucket is wider than
    ``NARROW_BUCKET`` of its upper bound (the quantile is at most that), ``("gt", bound)`` in the +Inf bucket."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    previous_le, previous_count = 0.0, 0.0
    for le, count in items:
        if count >= rank and count > previous_count:
            if math.isinf(le):
                return ("gt", previous_le)
            if le - previous_le > NARROW_BUCKET * le:
                return ("le", le)
            return ("value", previous_le + (le - previous_le) * (rank - previous_count) / (count - previous_count))
        previous_le, previous_count = le, count
    return None


def _empty_histogram() -> dict[str, Any]:
    return {"sum": 0.0, "count": 0.0, "buckets": {}}


def raw_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a stage added to one pod's counters and histograms: {counter: value, histogram: histogram}."""
    out: dict[str, Any] = {}
    for name in COUNTERS.values():
        if name in after:
            out[name] = after[name] - before.get(name, 0.0)
    for name in HISTOGRAMS.values():
        if name in after:
            b, a = before.get(name, _empty_histogram()), after[name]
            out[name] = {"sum": a["sum"] - b["sum"], "count": a["count"] - b["count"],
                         "buckets": {le: a["buckets"][le] - b["buckets"].get(le, 0.0) for le in a["buckets"]}}  # fmt: skip
    return out


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Several pods' deltas as one: counters summed, histograms merged bucket by bucket."""
    out: dict[str, Any] = {}
    for delta in deltas:
        for name, value in delta.items():
            if isinstance(value, dict):
                merged = out.setdefault(name, _empty_histogram())
                merged["sum"] += value["sum"]
                merged["count"] += value["count"]
                for le, count in value["buckets"].items():
                    merged["buckets"][le] = merged["buckets"].get(le, 0.0) + count
            else:
                out[name] = out.get(name, 0.0) + value
    return out


def summarize_delta(raw: dict[str, Any]) -> dict[str, Any]:
    """A (merged) delta in the stage record's terms: token totals, and per histogram its count, its mean and its
    quantiles in ms: ``p50_ttft_ms`` where the buckets allow a value, else ``p50_ttft_ms_le`` (at most) or
    ``p50_ttft_ms_gt`` (more than the last finite bound)."""
    out: dict[str, Any] = {}
    for key, name in COUNTERS.items():
        if name in raw:
            out[f"{key}_total"] = raw[name]
    queries = out.get("prefix_cache_queries_total")
    if queries:  # no lookup in the stage (or no prefix cache): no rate rather than a made-up 0
        out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits_total", 0.0) / queries
    for key, name in HISTOGRAMS.items():
        if name not in raw:
            continue
        histogram = raw[name]
        count = histogram["count"]
        out[f"{key}_count"] = count
        if count > 0:
            out[f"mean_{key}_ms"] = histogram["sum"] / count * 1000  # exact: from the sum and the count
            buckets = dict(sorted(histogram["buckets"].items()))
            for q in (0.5, 0.95, 0.99):
                found = histogram_quantile(q, buckets)
                if found is not None:
                    how, value = found
                    out[f"p{q * 100:g}_{key}_ms" + ("" if how == "value" else f"_{how}")] = value * 1000
    return out


def requests_served(summary: dict[str, Any]) -> int | None:
    """Requests one pod finished over a stage, from its summarized delta: vLLM's ``request_success`` counter,
    else the count of its E2E histogram (an engine without the counter); None when it exposes neither.

    Which replica served a request is known only to the server: the client sees one address (a gateway, a
    Service), so this is how the load's spread over the pods is measured.
    """
    for key in ("requests_total", "e2el_count"):
        if summary.get(key) is not None:
            return int(round(summary[key]))
    return None


def figure_text(server: dict[str, Any] | None, key: str) -> str:
    """A server-side figure of a stage record as recorded: a mean, a percentile read in a narrow bucket, or the
    bound of the coarse bucket the percentile lies in (``≤ 300``, ``> 10000``); ``–`` when absent."""
    server = server or {}
    if server.get(key) is not None:
        return f"{server[key]:.1f}"
    if server.get(f"{key}_le") is not None:
        return f"≤ {server[f'{key}_le']:g}"
    if server.get(f"{key}_gt") is not None:
        return f"> {server[f'{key}_gt']:g}"
    return "–"


def delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """What the stage added to one server's counters and histograms (means and quantiles in ms)."""
    if before is None or after is None:
        return {"available": False}
    return {"available": True} | summarize_delta(raw_delta(before, after))


def gauge_values(text: str) -> dict[str, float]:
    """The gauges of GAUGES from Prometheus text, summed over labels, by plain line scanning.

    This runs in a thread beside the load generator: a full parse holds the interpreter lock long
    enough to delay the chunks the client is timing, a scan of the few lines needed does not.
    """
    wanted = {name: key for key, name in GAUGES.items()}
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = wanted.get(name)
        if key is not None:
            try:
                found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return found


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    return (max(values), sum(values) / len(values)) if values else (None, None)


class GaugeSampler:
    """Samples the gauges of every target once a second in a thread while a stage runs."""

    def __init__(self, targets: list[MetricsTarget], period_s: float = 1.0) -> None:
        self.targets, self.period_s = targets, period_s
        self.ticks: list[dict[str, dict[str, float]]] = []  # per sample: {pod: gauges}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="servinglab-gauges", daemon=True)

    def _run(self) -> None:
        clients = {t.name: httpx.Client(headers=_headers(t.api_key, t.headers), timeout=2.0, trust_env=False,
                                        verify=verify_option(t.verify_tls)) for t in self.targets}  # fmt: skip
        try:
            while not self._stop.wait(self.period_s):
                tick = {}
                for t in self.targets:
                    try:
                        tick[t.name] = gauge_values(clients[t.name].get(f"{t.root_url}/metrics").text)
                    except httpx.HTTPError:
                        continue
                if tick:
                    self.ticks.append(tick)
        finally:
            for client in clients.values():
                client.close()

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Peak and mean per gauge over the stage: count gauges summed across pods, ratio gauges as their
        mean (``mean_``/``max_``) and their maximum across pods (``max_pod_``); and every gauge per pod."""
        out: dict[str, Any] = {}
        for key in COUNT_GAUGES:
            out[f"max_{key}"], out[f"mean_{key}"] = _stats([sum(g.get(key, 0.0) for g in tick.values())
                                                           for tick in self.ticks if any(key in g for g in tick.values())])  # fmt: skip
        for key in RATIO_GAUGES:
            means = [sum(g[key] for g in tick.values() if key in g) / n for tick in self.ticks
                     if (n := sum(1 for g in tick.values() if key in g))]  # fmt: skip
            highs = [max(g[key] for g in tick.values() if key in g) for tick in self.ticks
                     if any(key in g for g in tick.values())]  # fmt: skip
            out[f"max_{key}"], out[f"mean_{key}"] = _stats(means)
            out[f"max_pod_{key}"] = max(highs) if highs else None
        per_pod: dict[str, dict[str, float | None]] = {}
        for t in self.targets:
            own = [tick[t.name] for tick in self.ticks if t.name in tick]
            per_pod[t.name] = {}
            for key in GAUGES:
                high, mean = _stats([g[key] for g in own if key in g])
                per_pod[t.name] |= {f"max_{key}": high, f"mean_{key}": mean}
        out["gauges_per_pod"] = per_pod
        return out


def prometheus_window(url: str, queries: dict[str, str], start_s: float, end_s: float) -> dict[str, Any]:
    """Mean and max of each PromQL query over [start, end] (Unix seconds), from Prometheus' HTTP API."""
    out: dict[str, Any] = {}
    step = max(1.0, (end_s - start_s) / 200)
    for key, query in queries.items():
        try:
            answer = httpx.get(
                f"{url.rstrip('/')}/api/v1/query_range",
                params={"query": query, "start": start_s, "end": max(end_s, start_s + step), "step": step},
                timeout=10,
                trust_env=False,
            )
            answer.raise_for_status()
            series = answer.json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            out[f"{key}_error"] = str(exc)[:200]
            continue
        values = [float(v) for s in series for _, v in s.get("values", []) if v not in ("NaN", "+Inf", "-Inf")]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
        out[f"max_{key}"] = max(values) if values else None
    return out


def now_unix_s() -> float:
    return time.time()


def alive(endpoint: Endpoint) -> bool:
    """Whether the layer answers ``/health`` through the path the client used."""
    try:
        answer = httpx.get(f"{endpoint.root_url}/health", timeout=5, headers=endpoint.headers,
                           **client_options(endpoint.verify_tls, endpoint.proxy))  # fmt: skip
        return answer.status_code == 200
    except httpx.HTTPError:
        return False


class ServerWindow:
    """The server's side of a stage, seen from this machine: every pod's ``/metrics`` before and after, their
    gauges while the stage runs, the layer's health after, and GPU telemetry over the window.

    Entered once per measured period (a stage measured several times is entered for each repeat): the
    deltas and gauge samples of every period add up, and ``fields`` always holds the sum so far. Without
    targets (a server this machine cannot reach) only the time window is recorded.
    """

    def __init__(self, targets: list[MetricsTarget], health: Endpoint | None = None,
                 telemetry: Telemetry | None = None) -> None:  # fmt: skip
        self.targets, self.health, self.telemetry = list(targets), health, telemetry
        self.gauges: GaugeSampler | None = None
        self.before: dict[str, dict[str, Any] | None] = {}
        self.deltas: dict[str, list[dict[str, Any]]] = {}  # pod → one delta per period
        self.missing: set[str] = set()
        self.ticks: list[dict[str, dict[str, float]]] = []
        self.periods = 0
        self.fields: dict[str, Any] = {}

    def _scrape_all(self) -> dict[str, dict[str, Any] | None]:
        return {t.name: scrape(t.root_url, t.api_key, headers=t.headers, verify_tls=t.verify_tls) for t in self.targets}

    def __enter__(self) -> ServerWindow:
        if self.targets:
            self.before = self._scrape_all()
            self.gauges = GaugeSampler(self.targets).__enter__()
        self.fields.setdefault("started_at_unix", now_unix_s())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.gauges is not None:
            self.gauges.__exit__(*exc)
            self.ticks += self.gauges.ticks
        if exc[0] is not None:
            return
        self.periods += 1
        self.fields["ended_at_unix"] = now_unix_s()
        self.fields["server_alive_after"] = alive(self.health) if self.health is not None else None
        if not self.targets:
            self.fields["server"] = {"available": False}
        else:
            after = self._scrape_all()
            for name, b in self.before.items():
                if b is not None and after.get(name) is not None:
                    self.deltas.setdefault(name, []).append(raw_delta(b, after[name]))
                else:
                    self.missing.add(name)
            per_pod = {name: merge_deltas(d) for name, d in self.deltas.items()}
            server: dict[str, Any] = {"available": bool(per_pod), "pods": len(self.targets)}
            server |= summarize_delta(merge_deltas(list(per_pod.values())))
            sampler = GaugeSampler(self.targets)
            sampler.ticks = self.ticks
            server |= sampler.summary()
            server["per_pod"] = {name: summarize_delta(d) for name, d in per_pod.items()}
            server["requests_per_pod"] = {name: requests_served(pod) for name, pod in server["per_pod"].items()}
            if self.missing:
                server["unavailable_pods"] = sorted(self.missing)
            self.fields["server"] = server
        if self.telemetry is not None and self.telemetry.prometheus_url:
            self.fields["gpu"] = prometheus_window(self.telemetry.prometheus_url, self.telemetry.queries,
                                                   self.fields["started_at_unix"], self.fields["ended_at_unix"])  # fmt: skip
