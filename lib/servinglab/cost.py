"""Cost: the study's prices turned into cost per 1,000 requests at each measured load point, and the cost
of keeping each layer's minimum replicas when nothing is asked of it."""

from __future__ import annotations

import os
from typing import Any

from . import results
from .bench import STAGES_TABLE
from .config import Study

HOURS_PER_MONTH = 730  # 365 × 24 / 12, the usual cloud-billing month


def cost_per_1k_requests(price_per_replica_hour: float, replicas: int, requests_per_s: float) -> float | None:
    """What 1,000 requests cost when ``replicas`` serve them at ``requests_per_s`` (None at no throughput)."""
    if requests_per_s <= 0:
        return None
    return price_per_replica_hour * replicas / (requests_per_s * 3600) * 1000


def gpus_per_replica(study: Study) -> int:
    """GPUs one replica holds: the cluster setting; none on the local platform."""
    return getattr(study.platform, "gpus", 0)


def serving_replicas(study: Study, layer_name: str) -> int:
    """Replicas that serve a load point: the fixed count, or the autoscaler's floor (at least one)."""
    layer = study.layers[layer_name]
    if layer.kind == "kserve":
        return max(1, layer.min_replicas)
    return getattr(layer, "replicas", 1)


def idle_replicas(study: Study, layer_name: str) -> int:
    """Replicas a layer keeps when no request comes: Knative scales to its minimum; Standard mode's HPA
    never goes below one; raw vLLM and llm-d keep what they were given."""
    layer = study.layers[layer_name]
    if layer.kind == "kserve":
        return layer.min_replicas if layer.mode == "Knative" else max(1, layer.min_replicas)
    return getattr(layer, "replicas", 1)


def load_point_costs(study: Study, run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Cost per 1,000 requests at every latency stage of the run (empty when the study sets no price)."""
    price = study.costs.replica_price_per_hour(gpus_per_replica(study))
    if price is None:
        return []
    rows = []
    for stage in results.read_records(run_dir, STAGES_TABLE):
        layer = stage["layer"]
        replicas = serving_replicas(study, layer) if layer in study.layers else 1
        throughput = stage["summary"].get("request_throughput") or 0.0
        per_1k = cost_per_1k_requests(price, replicas, throughput)
        rows.append({
            "layer": layer, "stage": stage["stage"], "request_throughput": throughput, "replicas": replicas,
            "price_per_replica_hour": price, "currency": study.costs.currency,
            "cost_per_1k_requests": None if per_1k is None else round(per_1k, 6),
        })  # fmt: skip
    return rows


def idle_costs(study: Study) -> list[dict[str, Any]]:
    """Per layer: the replicas kept with no traffic and what they cost an hour and a month."""
    price = study.costs.replica_price_per_hour(gpus_per_replica(study))
    rows = []
    for layer in study.layers:
        idle = idle_replicas(study, layer)
        rows.append({
            "layer": layer, "kind": study.layers[layer].kind, "idle_replicas": idle, "currency": study.costs.currency,
            "idle_cost_per_hour": None if price is None else round(idle * price, 4),
            "idle_cost_per_month": None if price is None else round(idle * price * HOURS_PER_MONTH, 2),
        })  # fmt: skip
    return rows


def frame(rows: list[dict[str, Any]]):
    """Cost rows as a table (an empty one says so: the study sets no price)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame({"cost": ["no price in the study: set costs.gpu_hourly or costs.replica_hourly"]})
    return table
