"""Per-request records → the numbers ``vllm bench serve`` reports, under its names, plus client health.

Definitions (those of ``vllm bench serve``; GuideLLM and AIPerf name them differently, see the report):

- TTFT: request sent → first token-bearing chunk. ``vllm bench serve`` stamps the first chunk that has
  ``choices``, which counts a role-only first delta; a vLLM server sends that delta together with the
  first token, other servers may not, and then its TTFT comes out too short. Here the first chunk whose
  ``usage.completion_tokens`` is at least 1 (or, without continuous usage, the first non-role delta).
- E2E latency (``e2el``): request sent → last token-bearing chunk.
- TPOT: (E2E − TTFT) / (output tokens − 1), per request with more than one output token.
- ITL: every gap between consecutive token-bearing chunks, pooled over requests (a chunk may carry
  several tokens; the gap is still one gap, as in ``vllm bench serve``).
- Output tokens: the server's ``usage.completion_tokens``.
- Throughputs divide by the stage's duration: its start to the end of its last request.
- Goodput: requests/s that met every per-request objective given (TTFT, TPOT, E2E).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

PERCENTILES = (90, 95, 99, 99.9)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
# A client whose event loop wakes later than this at p99 was busy enough to distort what it timed.
CLIENT_LAG_WARN_MS = 5.0
# Requests a percentile needs before it says something: a p95 from fewer is one of the few slowest ones.
MIN_SAMPLES_P95 = 20
MIN_SAMPLES_P99 = 100
# A server that packs tokens: its chunks arrive this much further apart than its tokens are generated.
PACKING_RATIO = 1.5
# The verdicts a stage may get, the first that applies being its verdict.
VERDICTS = ("client-limited", "server-burst", "too-few-samples")


def tpot_ms(record: dict[str, Any]) -> float | None:
    tokens = record.get("output_tokens") or record.get("client_tokens") or 0
    if tokens > 1 and record.get("ttft_ms") is not None:
        return (record["e2el_ms"] - record["ttft_ms"]) / (tokens - 1)
    return None


def itl_ms(record: dict[str, Any]) -> list[float]:
    times = record.get("token_ms") or []
    return [b - a for a, b in zip(times, times[1:])]


def _stats(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        out = {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None}
        out |= {f"p{p:g}_{name}_ms": None for p in PERCENTILES}
        return out
    array = np.asarray(values, dtype=float)
    out = {
        f"mean_{name}_ms": float(np.mean(array)),
        f"median_{name}_ms": float(np.median(array)),
        f"std_{name}_ms": float(np.std(array)),
    }
    out |= {f"p{p:g}_{name}_ms": float(np.percentile(array, p)) for p in PERCENTILES}
    return out


def good_request(record: dict[str, Any], slos: dict[str, float]) -> bool:
    """True when a finished request met every objective given (keys ttft_ms, tpot_ms, e2el_ms)."""
    if not record.get("ok"):
        return False
    checks = {"ttft_ms": record.get("ttft_ms"), "tpot_ms": tpot_ms(record), "e2el_ms": record.get("e2el_ms")}
    for key, limit in slos.items():
        value = checks[key]
        if value is not None and value > limit:
            return False
    return True


BURST_WARN_SHARE = 0.05  # warn when at least this share of the streams arrived in one burst


def summarize(
    records: Iterable[dict[str, Any]],
    duration_s: float,
    slos: dict[str, float] | None = None,
    requested_rate: float | None = None,
    send_window_s: float | None = None,
    schedule_lag_ms: list[float] | None = None,
    loop_lag_ms: list[float] | None = None,
) -> dict[str, Any]:
    """The stage's summary under ``vllm bench serve --save-result`` key names, plus client health."""
    measured = [r for r in records if not r.get("warmup")]
    done = [r for r in measured if r.get("ok")]
    failed = [r for r in measured if not r.get("ok")]
    output_tokens = sum(r.get("output_tokens") or 0 for r in done)
    input_tokens = sum(r.get("prompt_tokens") or 0 for r in done)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(failed),
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else 0.0,
    }
    summary |= _stats("ttft", [r["ttft_ms"] for r in done])
    summary |= _stats("tpot", [t for r in done if (t := tpot_ms(r)) is not None])
    summary |= _stats("itl", [gap for r in done for gap in itl_ms(r)])
    summary |= _stats("e2el", [r["e2el_ms"] for r in done])
    if slos:
        good = sum(1 for r in done if good_request(r, slos))
        summary["request_goodput"] = good / duration_s if duration_s > 0 else 0.0
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.get("error_kind") or "unknown"] = errors.get(r.get("error_kind") or "unknown", 0) + 1
    summary["errors"] = dict(sorted(errors.items()))
    summary["token_count_disagreements"] = sum(
        1 for r in done if r.get("output_tokens") is not None and r.get("client_tokens") > r["output_tokens"]
    )
    summary["prompt_length_disagreements"] = sum(
        1 for r in done
        if r.get("prompt_tokens") is not None and (r.get("expected_prompt_tokens") or -1) >= 0
        and r["prompt_tokens"] < r["expected_prompt_tokens"]
    )  # fmt: skip
    summary |= client_health(measured, requested_rate, send_window_s, schedule_lag_ms, loop_lag_ms)
    chunk_tokens = [n for r in done for n in (r.get("chunk_tokens") or [])]
    summary["mean_tokens_per_chunk"] = float(np.mean(chunk_tokens)) if chunk_tokens else None
    summary["p99_tokens_per_chunk"] = float(np.percentile(chunk_tokens, 99)) if chunk_tokens else None
    bursts = sum(1 for r in done if delivered_in_one_burst(r))
    summary["burst_deliveries"] = bursts
    return summary


def validity(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether a stage measured what it claims, from its numbers alone: ``verdict`` (``valid``, or the first of
    ``client-limited``, ``server-burst``, ``too-few-samples`` that applies), every reason with its number and
    the limit it broke, and annotations that do not make the stage invalid (token packing, a p99 from fewer
    than 100 requests).

    The same rules read a stage of any servinglab version: they need only ``p99_loop_lag_ms``,
    ``burst_deliveries``, ``completed`` and the TPOT/ITL means.
    """
    reasons, notes = [], []
    completed = summary.get("completed") or 0
    lag = summary.get("p99_loop_lag_ms")
    if lag is not None and lag > CLIENT_LAG_WARN_MS:
        reasons.append({"verdict": "client-limited", "value": round(lag, 3), "limit": CLIENT_LAG_WARN_MS, "unit": "ms",
                        "text": f"the client's event loop woke {lag:.1f} ms late at p99 (limit {CLIENT_LAG_WARN_MS:g} ms): its "
                        "latencies include the client's own delay"})  # fmt: skip
    bursts = summary.get("burst_deliveries")
    if bursts and completed and bursts >= BURST_WARN_SHARE * completed:
        reasons.append({"verdict": "server-burst", "value": bursts, "limit": round(BURST_WARN_SHARE * completed, 2),
                        "unit": "streams", "text": f"{bursts} of {completed} streams reached the client in one burst at the "
                        f"end (limit {BURST_WARN_SHARE:.0%} of them): TTFT and ITL describe the server's delivery, not "
                        "its generation"})  # fmt: skip
    if completed < MIN_SAMPLES_P95:
        reasons.append({"verdict": "too-few-samples", "value": completed, "limit": MIN_SAMPLES_P95, "unit": "requests",
                        "text": f"{completed} requests, fewer than the {MIN_SAMPLES_P95} a p95 needs"})  # fmt: skip
    elif completed < MIN_SAMPLES_P99:
        notes.append({"note": "p99-few-samples", "value": completed, "limit": MIN_SAMPLES_P99,
                      "text": f"its p99 comes from {completed} requests, fewer than the {MIN_SAMPLES_P99} it needs"})  # fmt: skip
    itl, tpot = summary.get("mean_itl_ms"), summary.get("mean_tpot_ms")
    if itl and tpot and itl > PACKING_RATIO * tpot:
        per_chunk = summary.get("mean_tokens_per_chunk")
        notes.append({"note": "token-packing", "value": round(itl / tpot, 2), "limit": PACKING_RATIO,
                      "text": f"the server packed tokens: chunks came {itl:.2f} ms apart for {tpot:.2f} ms a token"
                      + (f" ({per_chunk:.2f} tokens a chunk)" if per_chunk else "")})  # fmt: skip
    verdict = next((v for v in VERDICTS if any(r["verdict"] == v for r in reasons)), "valid")
    return {"verdict": verdict, "reasons": reasons, "annotations": notes}


def delivered_in_one_burst(record: dict[str, Any]) -> bool:
    """A stream of several tokens whose first token arrived after half of the request's time."""
    ttft, e2el, tokens = record.get("ttft_ms"), record.get("e2el_ms"), record.get("token_ms") or []
    return len(tokens) > 2 and ttft is not None and e2el is not None and ttft > 0.5 * e2el


def client_health(
    measured: list[dict[str, Any]],
    requested_rate: float | None,
    send_window_s: float | None,
    schedule_lag_ms: list[float] | None,
    loop_lag_ms: list[float] | None,
) -> dict[str, Any]:
    """Achieved vs requested rate, schedule and event-loop lag, and a warning when it sent slower than asked
    (the event-loop lag is judged by ``validity``)."""
    sent = len([r for r in measured if r.get("error_kind") != "cancelled"])
    achieved = (sent - 1) / send_window_s if send_window_s and sent > 1 else None
    out: dict[str, Any] = {
        "requested_rate": requested_rate if requested_rate is not None and np.isfinite(requested_rate) else None,
        "achieved_rate": achieved,
        "p50_schedule_lag_ms": float(np.percentile(schedule_lag_ms, 50)) if schedule_lag_ms else None,
        "p99_schedule_lag_ms": float(np.percentile(schedule_lag_ms, 99)) if schedule_lag_ms else None,
        "p99_loop_lag_ms": float(np.percentile(loop_lag_ms, 99)) if loop_lag_ms else None,
    }
    warnings = []
    if out["requested_rate"] and achieved and achieved < 0.9 * out["requested_rate"]:
        warnings.append(f"achieved {achieved:.2f} req/s of the {out['requested_rate']:.2f} requested")
    out["warnings"] = warnings
    return out
