"""The estimates the lifecycle experiments and the cost tables report, on inputs whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servinglab import cost, layers, records
from servinglab.api import run_context
from servinglab.platforms import Deployment
from servinglab.config import load_study
from servinglab.experiments.lifecycle.stats import paired_difference, split_estimate, wilson_interval

REPO = Path(__file__).resolve().parents[1]


def test_wilson_interval_matches_the_textbook_values():
    # 20 of 100 at 95 %: (0.1333, 0.2888), as tabulated by Newcombe (1998) for the score method.
    low, high = wilson_interval(20, 100, 0.95)
    assert low == pytest.approx(0.1333, abs=1e-4) and high == pytest.approx(0.2888, abs=1e-4)
    # At the edges the interval stays inside [0, 1] and is not empty.
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(0, 50)[1] > 0.05
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(50, 50)[0] < 0.95
    # A higher level gives a wider interval.
    assert wilson_interval(20, 100, 0.99)[0] < low
    with pytest.raises(ValueError):
        wilson_interval(5, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_split_estimate_counts_answers_and_leaves_unanswered_out():
    answers = ["m:canary"] * 40 + ["m"] * 160 + [None] * 7
    split = split_estimate(answers, "m:canary", 20, 0.95)
    assert split["answered"] == 200 and split["unanswered"] == 7
    assert split["observed_percent"] == 20.0
    assert split["ci_low_percent"] < 20 < split["ci_high_percent"] and split["requested_within_ci"]
    # A split far from the request falls outside the interval.
    skewed = split_estimate(["m:canary"] * 90 + ["m"] * 110, "m:canary", 20)
    assert skewed["observed_percent"] == 45.0 and not skewed["requested_within_ci"]


def test_paired_difference_finds_a_constant_shift_and_is_deterministic():
    direct = [10.0, 12.0, 11.0, 30.0, 10.5, 11.5, 12.5, 10.0]
    gateway = [d + 2.0 for d in direct]
    shift = paired_difference(gateway, direct, 0.95, seed=3)
    assert shift["median_difference"] == 2.0 and shift["ci_low"] == 2.0 and shift["ci_high"] == 2.0
    assert shift["pairs"] == 8
    noisy_gateway = [d + 2.0 + (0.5 if i % 2 else -0.5) for i, d in enumerate(direct)]
    a = paired_difference(noisy_gateway, direct, 0.95, seed=3)
    assert a == paired_difference(noisy_gateway, direct, 0.95, seed=3)
    assert a["ci_low"] <= 2.0 <= a["ci_high"] and a["ci_low"] >= 1.5 and a["ci_high"] <= 2.5
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [2.0])


def test_cost_per_1000_requests_on_known_prices():
    # One L4 at 0.70 an hour serving 2 requests/s: 7,200 requests cost 0.70, so 1,000 cost 0.0972.
    assert cost.cost_per_1k_requests(0.70, 1, 2.0) == pytest.approx(0.09722, abs=1e-5)
    assert cost.cost_per_1k_requests(0.70, 2, 2.0) == pytest.approx(2 * 0.09722, abs=1e-5)
    assert cost.cost_per_1k_requests(0.70, 1, 0.0) is None


def _stage(layer, stage, throughput):
    return {"layer": layer, "stage": stage, "mode": "closed", "source": "servinglab",
            "summary": {"request_throughput": throughput}}  # fmt: skip


def _run(tmp_path, study) -> Path:
    """A run directory of ``study`` with its layers deployed (or refused) as deploy_layers records them."""
    run_dir = records.create_run(tmp_path / "runs", study.study, run_context(study))
    for name, layer in study.layers.items():
        kind = layers.of(layer)
        records.append(run_dir, records.DEPLOYMENTS, [Deployment(name, layer.kind, "kubernetes", "ready",
                       serving_replicas=kind.serving_replicas(layer), idle_replicas=kind.idle_replicas(layer)).to_record()])  # fmt: skip
    return run_dir


def test_load_point_and_idle_costs_from_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)  # the cluster study as written, not the CI one
    study = load_study(REPO / "params" / "cluster-example.yaml", ["costs.gpu_hourly=2.0", "platform.gpus=2"])
    run_dir = _run(tmp_path, study)
    stages = [_stage("raw", "c=1", 1.0), _stage("raw", "c=32", 20.0), _stage("kserve-knative", "c=1", 0.0)]
    records.append(run_dir, records.LATENCY_STAGES, stages)
    load_points, idle_rows = cost.run_costs(run_dir)
    rows = {(r["layer"], r["stage"]): r for r in load_points}
    # A replica holds 2 GPUs at 2.0 each: 4.0 an hour.
    assert rows[("raw", "c=1")]["price_per_replica_hour"] == 4.0
    assert rows[("raw", "c=1")]["cost_per_1k_requests"] == pytest.approx(4.0 / 3.6, abs=1e-6)
    assert rows[("raw", "c=32")]["cost_per_1k_requests"] == pytest.approx(4.0 / 72, abs=1e-6)
    assert rows[("kserve-knative", "c=1")]["cost_per_1k_requests"] is None
    idle = {r["layer"]: r for r in idle_rows}
    assert idle["kserve-knative"]["idle_replicas"] == 0 and idle["kserve-knative"]["idle_cost_per_hour"] == 0
    assert idle["kserve-standard"]["idle_replicas"] == 1 and idle["raw"]["idle_cost_per_hour"] == 4.0
    assert idle["raw"]["idle_cost_per_month"] == 4.0 * 730
    # No price: no load-point cost, idle replicas still counted.
    unpriced = load_study(REPO / "params" / "cluster-example.yaml", ["costs.gpu_hourly=null"])
    bare_run = _run(tmp_path / "unpriced", unpriced)
    records.append(bare_run, records.LATENCY_STAGES, stages)
    load_points, idle_rows = cost.run_costs(bare_run)
    assert load_points == [] and {r["idle_cost_per_hour"] for r in idle_rows} == {None}


def test_a_cpu_replica_is_priced_whole(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    study = load_study(REPO / "params" / "local.yaml")
    assert cost.replica_price(study.resolved()) == (0.07, "USD")
    bare = load_study(REPO / "params" / "local.yaml", ["costs.replica_hourly=null", "costs.gpu_hourly=1.0"])
    assert cost.replica_price(bare.resolved()) is None  # no GPU to price
