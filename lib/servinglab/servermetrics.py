"""The server's own view of a stage: ``/metrics`` before and after, gauges sampled during, GPU telemetry.

Counters and histograms are stored as deltas over the stage (requests, tokens, the TTFT / ITL / E2E /
queue-time histograms), gauges as their peak and mean while the stage ran (requests running and
waiting, KV-cache usage). Where the study names a Prometheus server (a DCGM exporter on the cluster),
GPU utilisation and memory over the stage's time window are read from it too.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "tpot_legacy": "vllm:time_per_output_token_seconds",
    "e2el": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
}
COUNTERS = {"prompt_tokens": "vllm:prompt_tokens", "generation_tokens": "vllm:generation_tokens"}
GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
}


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


def scrape(root_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """One ``GET /metrics``; None when the server does not answer (the stage records that)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{root_url}/metrics", headers=headers, timeout=timeout_s, trust_env=False)
        answer.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse(answer.text)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' linear interpolation inside the bucket holding quantile ``q`` of cumulative counts."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    previous_le, previous_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            if count == previous_count:
                return le
            return previous_le + (le - previous_le) * (rank - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return None


def delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """What the stage added to the server's counters and histograms (means and quantiles in ms)."""
    if before is None or after is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    for key, name in COUNTERS.items():
        if name in after:
            out[f"{key}_total"] = after[name] - before.get(name, 0.0)
    for key, name in HISTOGRAMS.items():
        if name not in after:
            continue
        b = before.get(name, {"sum": 0.0, "count": 0.0, "buckets": {}})
        a = after[name]
        count = a["count"] - b["count"]
        buckets = {le: a["buckets"][le] - b["buckets"].get(le, 0.0) for le in a["buckets"]}
        out[f"{key}_count"] = count
        if count > 0:
            out[f"mean_{key}_ms"] = (a["sum"] - b["sum"]) / count * 1000
            for q in (0.5, 0.95, 0.99):
                value = histogram_quantile(q, buckets)
                out[f"p{q * 100:g}_{key}_ms"] = value * 1000 if value is not None else None
    return out


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


class GaugeSampler:
    """Samples the server's gauges once a second in a thread while a stage runs."""

    def __init__(self, root_url: str, api_key: str | None = None, period_s: float = 1.0) -> None:
        self.root_url, self.api_key, self.period_s = root_url, api_key, period_s
        self.samples: dict[str, list[float]] = {key: [] for key in GAUGES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="servinglab-gauges", daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(headers=headers, timeout=2.0, trust_env=False) as http:
            while not self._stop.wait(self.period_s):
                try:
                    text = http.get(f"{self.root_url}/metrics").text
                except httpx.HTTPError:
                    continue
                for key, value in gauge_values(text).items():
                    self.samples[key].append(value)

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, values in self.samples.items():
            out[f"max_{key}"] = max(values) if values else None
            out[f"mean_{key}"] = sum(values) / len(values) if values else None
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
