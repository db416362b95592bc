"""Metric definitions on hand-made chunk timelines, and the arrival schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servinglab.measure.loadgen import TokenClock
from servinglab.measure.client_metrics import good_request, summarize, validity
from servinglab.measure.schedule import arrival_offsets_s

MS = 1_000_000


def chunk(content=None, role=None, completion_tokens=None, prompt_tokens=10, choices=True):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    out = {"choices": [{"index": 0, "delta": delta}] if choices else []}
    if completion_tokens is not None:
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return out


def timeline(events):
    clock = TokenClock(sent_ns=0)
    for at_ms, c in events:
        clock.feed(int(at_ms * MS), c)
    return clock


def test_role_only_first_delta_is_not_the_first_token():
    # Another server's stream: the role arrives alone at 5 ms, the first token at 40 ms.
    clock = timeline([(5, chunk(role="assistant", content="")), (40, chunk("Hel")), (50, chunk("lo")), (60, chunk(choices=False, completion_tokens=2))])
    assert [t / MS for t in clock.token_ns] == [40, 50]
    assert clock.usage["completion_tokens"] == 2 and clock.tokens == 2


def test_continuous_usage_counts_tokens_not_text():
    # A token that decodes to nothing (content "") still bears a token; one chunk may carry several.
    clock = timeline([
        (5, chunk(role="assistant", content="", completion_tokens=0)),
        (20, chunk("", completion_tokens=1)),
        (30, chunk("ab", completion_tokens=3)),
        (31, chunk("", completion_tokens=3)),  # no new token: not a token-bearing chunk
        (45, chunk("c", completion_tokens=4)),
        (46, chunk(choices=False, completion_tokens=4)),
    ])  # fmt: skip
    assert [t / MS for t in clock.token_ns] == [20, 30, 45]
    assert clock.tokens == 4


def record(ttft, times, output_tokens, ok=True, warmup=False, prompt=10):
    return {"ok": ok, "warmup": warmup, "ttft_ms": ttft, "e2el_ms": times[-1] if times else None,
            "token_ms": times, "output_tokens": output_tokens, "client_tokens": output_tokens,
            "prompt_tokens": prompt, "expected_prompt_tokens": prompt, "error_kind": None if ok else "http_500"}  # fmt: skip


def test_vllm_bench_definitions():
    records = [
        record(10, [10, 20, 30, 40], 4),  # TPOT (40-10)/3 = 10; ITL 10,10,10
        record(20, [20, 60], 2),  # TPOT 40; ITL 40
        record(5, [5], 1),  # one token: no TPOT, no ITL
        record(None, [], None, ok=False),
        record(1, [1, 2], 2, warmup=True),  # warm-up: not counted
    ]
    s = summarize(records, duration_s=2.0, slos={"ttft_ms": 15})
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"http_500": 1}
    assert s["total_output_tokens"] == 7 and s["output_throughput"] == 3.5 and s["request_throughput"] == 1.5
    assert s["median_ttft_ms"] == 10 and s["mean_ttft_ms"] == pytest.approx(35 / 3)
    assert s["mean_tpot_ms"] == 25 and s["median_tpot_ms"] == 25
    assert s["mean_itl_ms"] == 17.5 and s["median_itl_ms"] == 10  # gaps 10, 10, 10, 40 pooled
    assert s["median_e2el_ms"] == 40 and s["p99_e2el_ms"] == pytest.approx(np.percentile([40, 60, 5], 99))
    assert s["std_ttft_ms"] == pytest.approx(np.std([10, 20, 5]))
    assert s["request_goodput"] == 1.0  # TTFT 10 and 5 meet 15 ms; 20 does not


def test_empty_usage_and_no_finished_request():
    s = summarize([record(None, [], None, ok=False)], duration_s=1.0)
    assert s["completed"] == 0 and s["median_ttft_ms"] is None and s["output_throughput"] == 0
    no_usage = record(10, [10, 20], None)
    no_usage["client_tokens"] = 2
    s = summarize([no_usage], duration_s=1.0)
    assert s["mean_tpot_ms"] == 10  # falls back to the client's token count


def test_goodput_needs_every_objective():
    r = record(10, [10, 110], 2)  # TPOT 100 ms
    assert good_request(r, {"ttft_ms": 20})
    assert not good_request(r, {"ttft_ms": 20, "tpot_ms": 50})
    assert not good_request(r | {"ok": False}, {})


def test_client_health_judges_the_loop_lag():
    s = summarize([record(10, [10, 20], 2)], 1.0, loop_lag_ms=[0.1] * 99 + [50.0] * 2)
    assert s["p99_loop_lag_ms"] > 5 and validity(s)["verdict"] == "client-limited"
    assert "latencies include the client's own delay" in validity(s)["reasons"][0]["text"]
    assert s["warnings"] == []  # the verdict says it, once
    quiet = summarize([record(10, [10, 20], 2)], 1.0, loop_lag_ms=[0.1] * 100)
    assert "client-limited" not in [r["verdict"] for r in validity(quiet)["reasons"]]


def test_streams_delivered_in_one_burst_are_counted_and_flagged():
    streamed = [record(10, [10 + i for i in range(0, 100, 10)], 10) for _ in range(9)]
    burst = record(99, [99.0, 99.1, 99.2, 100.0], 4)  # first token after half the request's time
    s = summarize(streamed + [burst], 1.0)
    assert s["burst_deliveries"] == 1 and validity(s)["verdict"] == "server-burst"
    clean = summarize(streamed, 1.0)
    assert clean["burst_deliveries"] == 0 and "server-burst" not in [r["verdict"] for r in validity(clean)["reasons"]]
    short = summarize([record(50, [50, 60], 2)], 1.0)  # two tokens: too short to call it a burst
    assert short["burst_deliveries"] == 0


def test_closed_loop_schedule_is_all_at_once():
    assert list(arrival_offsets_s(5, math.inf)) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_seeded_arrivals_match_their_rate(burstiness):
    offsets = arrival_offsets_s(20000, rate=50.0, burstiness=burstiness, seed=42)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    # Gamma with shape k has a coefficient of variation of 1/sqrt(k): 1 for Poisson.
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert np.array_equal(offsets, arrival_offsets_s(20000, 50.0, burstiness, seed=42))
    assert not np.array_equal(offsets, arrival_offsets_s(20000, 50.0, burstiness, seed=43))
