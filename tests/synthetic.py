"""Latency stages made by a script for the report's tests: request records first, then the stage's
summary, verdict and provenance computed from them by servinglab's own code, as a measured stage's are."""

from __future__ import annotations

from servinglab.measure.client_metrics import summarize, validity


def closed_stage(layer: str, c: int, ttft_p50: float, output_throughput: float, p95_factor: float = 1.5,
                 tokens: int = 16, lag_ms: float = 0.5, requests: int | None = None,
                 gap_ms: float | None = None) -> tuple[dict, list[dict]]:  # fmt: skip
    """A closed-loop stage at concurrency ``c`` whose TTFTs spread evenly from ``ttft_p50 × (2 − p95_factor)``
    to ``ttft_p50 × p95_factor`` (so their median is ``ttft_p50``), each request ``tokens`` tokens a
    ``gap_ms`` apart (default: ``c`` ms), sent at ``output_throughput`` tokens/s; and its request records."""
    n = requests or max(20, 10 * c)
    low, high = ttft_p50 * (2 - p95_factor), ttft_p50 * p95_factor
    stage_id = f"{layer}-c{c}"
    rows = []
    for i in range(n):
        ttft = round(low + (high - low) * i / (n - 1), 4)
        times = [round(ttft + (gap_ms or c) * k, 4) for k in range(tokens)]
        rows.append({"layer": layer, "stage": f"c={c}", "stage_id": stage_id, "repeat": 0, "index": i, "ok": True,
                     "warmup": False, "ttft_ms": ttft, "e2el_ms": times[-1], "token_ms": times, "output_tokens": tokens,
                     "client_tokens": tokens, "prompt_tokens": 64, "expected_prompt_tokens": 64, "status": 200,
                     "provenance": "synthetic"})  # fmt: skip
    summary = summarize(rows, n * tokens / output_throughput, slos={"ttft_ms": 2000.0}, loop_lag_ms=[lag_ms] * 10)
    stage = {"layer": layer, "source": "servinglab", "provenance": "synthetic", "stage": f"c={c}", "stage_id": stage_id,
             "mode": "closed", "max_concurrency": c, "request_rate": None, "num_prompts": n, "seed": 42,
             "client": "this machine (test)", "repeats": 1, "summary": summary, "validity": validity(summary),
             "server": {"available": True, "mean_ttft_ms": round(ttft_p50 * 0.8, 3)}}  # fmt: skip
    return stage, rows
