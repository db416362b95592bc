"""The server's side of a stage from every engine process of a layer: scraped pod by pod, merged as one
layer (counters summed, histograms bucket by bucket, count gauges summed, ratio gauges as mean and max),
and kept per pod."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from kube_network import EmulatedServing
from test_kube_network import ask, platform_for

from servinglab.measure.server_metrics import GaugeSampler, ServerWindow, merge_deltas, summarize_delta
from servinglab.platforms.base import MetricsTarget
from servinglab.platforms.kubernetes import KubernetesPlatform

TTFT = "vllm:time_to_first_token_seconds"


def histogram(counts: list[float], total: float) -> dict:
    return {"sum": total, "count": counts[-1], "buckets": dict(zip((0.01, 0.1, float("inf")), counts))}


def test_counters_and_histograms_merge_over_pods():
    a = {"vllm:prompt_tokens": 100.0, TTFT: histogram([1, 3, 4], 0.2)}
    b = {"vllm:prompt_tokens": 50.0, TTFT: histogram([0, 1, 2], 0.5)}
    merged = merge_deltas([a, b])
    assert merged["vllm:prompt_tokens"] == 150.0
    assert merged[TTFT] == histogram([1, 4, 6], 0.7)
    summary = summarize_delta(merged)
    assert summary["ttft_count"] == 6 and summary["mean_ttft_ms"] == pytest.approx(700 / 6)


def test_count_gauges_sum_across_pods_ratio_gauges_are_mean_and_max_and_each_pod_is_kept():
    sampler = GaugeSampler([MetricsTarget("a", "http://a"), MetricsTarget("b", "http://b")])
    sampler.ticks = [
        {"a": {"running": 2, "waiting": 0, "kv_cache_usage": 0.2}, "b": {"running": 3, "waiting": 1, "kv_cache_usage": 0.6}},
        {"a": {"running": 4, "waiting": 2, "kv_cache_usage": 0.4}, "b": {"running": 1, "waiting": 0, "kv_cache_usage": 0.8}},
    ]  # fmt: skip
    out = sampler.summary()
    assert (out["max_running"], out["mean_running"]) == (5, 5) and (out["max_waiting"], out["mean_waiting"]) == (2, 1.5)
    assert out["max_kv_cache_usage"] == pytest.approx(0.6) and out["mean_kv_cache_usage"] == pytest.approx(0.5)
    assert out["max_pod_kv_cache_usage"] == pytest.approx(0.8)
    assert out["gauges_per_pod"]["a"]["max_running"] == 4 and out["gauges_per_pod"]["b"]["mean_kv_cache_usage"] == 0.7


@pytest.fixture
def serving(cluster, monkeypatch):
    with EmulatedServing(cluster.kube, "servinglab", step_s=0.05) as emulated:
        monkeypatch.setattr(KubernetesPlatform, "pod_connector", lambda self, pod, port: emulated.connector(pod, port))
        yield emulated


@pytest.mark.timeout(120)
def test_a_layer_of_two_replicas_is_measured_from_both_pods(serving, tmp_path: Path):
    platform = platform_for(serving, "layers.raw.replicas=2", "platform.gpus=0", "platform.image=vllm/vllm-openai-cpu:v0.32.0")
    platform.ensure("raw", str(tmp_path))
    targets = platform.metrics_targets("raw")
    assert len(targets) == 2 and len({t.name for t in targets}) == 2
    window = ServerWindow(targets, platform.endpoint("raw"))
    sent = {targets[0].name: 3, targets[1].name: 5}
    with window, httpx.Client(timeout=10, trust_env=False) as client:
        for target in targets:  # each pod asked directly, as a router in front of them would share the load
            for _ in range(sent[target.name]):
                assert ask(client, f"{target.root_url}/v1")[0] == 200
    server = window.fields["server"]
    assert server["available"] and server["pods"] == 2 and "unavailable_pods" not in server
    assert {pod: d["generation_tokens_total"] for pod, d in server["per_pod"].items()} == {
        name: 3.0 * n for name, n in sent.items()}  # three tokens a request
    assert server["generation_tokens_total"] == 24.0 and server["e2el_count"] == 8
    assert set(server["gauges_per_pod"]) == set(sent)
    assert window.fields["server_alive_after"] is True
    platform.teardown()


# --- the scheduler's counters: prefix cache, requests, preemptions ------------------------------------------

# /metrics of vLLM 0.32.0's CPU build serving the small model, after four chat requests whose prompts began with
# the same 300 words of servinglab's corpus (373 tokens each): the first computed every block, the other three
# found the first two 128-token blocks in the cache.
REAL_METRICS = Path(__file__).parent / "fixtures" / "vllm-metrics" / "prefix-cache.txt"


def test_prefix_cache_requests_and_preemptions_from_a_real_vllm():
    from servinglab.measure.server_metrics import parse, raw_delta

    summary = summarize_delta(raw_delta({}, parse(REAL_METRICS.read_text())))  # a fresh engine: before is zero
    assert summary["prefix_cache_queries_total"] == 1492 and summary["prefix_cache_hits_total"] == 3 * 256
    assert summary["prefix_cache_hit_rate"] == pytest.approx(768 / 1492)
    assert summary["requests_total"] == 4  # request_success, summed over its finish reasons
    assert summary["preemptions_total"] == 0 and summary["queue_count"] == 4


def test_the_layer_hit_rate_weighs_pods_by_their_queries():
    busy = {"vllm:prefix_cache_queries": 900.0, "vllm:prefix_cache_hits": 810.0, "vllm:request_success": 9.0}
    idle = {"vllm:prefix_cache_queries": 100.0, "vllm:prefix_cache_hits": 0.0, "vllm:request_success": 1.0}
    layer = summarize_delta(merge_deltas([busy, idle]))
    assert layer["prefix_cache_hit_rate"] == pytest.approx(0.81)  # 810 of 1000 tokens, not the mean of 90 % and 0 %
    assert layer["requests_total"] == 10
    assert "prefix_cache_hit_rate" not in summarize_delta({"vllm:prefix_cache_queries": 0.0})  # no query: no rate


@pytest.mark.timeout(120)
def test_each_pod_of_two_replicas_reports_its_requests_and_prefix_hits(serving, tmp_path: Path):
    platform = platform_for(serving, "layers.raw.replicas=2", "platform.gpus=0", "platform.image=vllm/vllm-openai-cpu:v0.32.0")
    platform.ensure("raw", str(tmp_path))
    targets = platform.metrics_targets("raw")
    window = ServerWindow(targets, platform.endpoint("raw"))
    shared = " ".join(f"w{i}" for i in range(64))  # four whole blocks of the emulated pods' cache
    sent = {targets[0].name: 4, targets[1].name: 1}
    with window, httpx.Client(timeout=10, trust_env=False) as client:
        for target in targets:
            for n in range(sent[target.name]):
                body = {"model": "qwen2.5-0.5b", "max_tokens": 2, "messages": [{"role": "user", "content": f"{shared} q{n}"}]}
                assert client.post(f"{target.root_url}/v1/chat/completions", json=body).status_code == 200
    server = window.fields["server"]
    assert server["requests_per_pod"] == sent
    busy, once = server["per_pod"][targets[0].name], server["per_pod"][targets[1].name]
    assert busy["prefix_cache_hits_total"] == 3 * 64 and once["prefix_cache_hits_total"] == 0  # the first request misses
    assert busy["prefix_cache_hit_rate"] > 0.7 and once["prefix_cache_hit_rate"] == 0
    assert server["prefix_cache_hits_total"] == 3 * 64 and server["preemptions_total"] == 0
    platform.teardown()
