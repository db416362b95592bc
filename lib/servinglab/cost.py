"""Cost: the study's prices turned into cost per 1,000 requests at each measured load point, and the cost
of keeping each layer's minimum replicas when nothing is asked of it.

Everything is computed from what the run recorded: the prices in its study (run.json), the replicas each
layer serves and idles with (its deployment records, by its kind's cost rule when it was deployed) and
the throughput of its latency stages. The 40_lifecycle notebook and the report read the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

from . import records
from .measure import intervals

HOURS_PER_MONTH = 730  # 365 × 24 / 12, the usual cloud-billing month


def cost_per_1k_requests(price_per_replica_hour: float, replicas: int, requests_per_s: float) -> float | None:
    """What 1,000 requests cost when ``replicas`` serve them at ``requests_per_s`` (None at no throughput)."""
    if requests_per_s <= 0:
        return None
    return price_per_replica_hour * replicas / (requests_per_s * 3600) * 1000


def replica_price(params: dict[str, Any]) -> tuple[float, str] | None:
    """What one replica costs an hour under a study's prices, and the currency; None when no price applies
    (``replica_hourly``, else ``gpu_hourly`` × the GPUs a cluster replica holds; a local replica has none)."""
    costs = params.get("costs") or {}
    currency = costs.get("currency", "USD")
    if costs.get("replica_hourly") is not None:
        return float(costs["replica_hourly"]), currency
    platform = params.get("platform") or {}
    gpus = platform.get("gpus", 1) if platform.get("kind") == "kubernetes" else 0
    if costs.get("gpu_hourly") is not None and gpus:
        return float(costs["gpu_hourly"]) * gpus, currency
    return None


def _replicas(deployments: list[dict[str, Any]], field: str) -> dict[str, int]:
    """Per layer, the replicas its last deployment record gives (``serving_replicas`` or ``idle_replicas``)."""
    out: dict[str, int] = {}
    for d in deployments:
        if d.get(field) is not None:
            out[d["layer"]] = int(d[field])
    return out


def load_point_costs(params: dict[str, Any], deployments: list[dict[str, Any]],
                     stages: list[dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """Cost per 1,000 requests at every latency stage (empty when the study sets no price that applies)."""
    price = replica_price(params)
    if price is None:
        return []
    replicas = _replicas(deployments, "serving_replicas")
    rows = []
    for stage in stages:
        layer = stage["layer"]
        serving = replicas.get(layer, 1)  # an imported stage of a layer the run did not deploy: one replica
        throughput = stage["summary"].get("request_throughput") or 0.0
        per_1k = cost_per_1k_requests(price[0], serving, throughput)
        # The throughput's recorded 95 % interval gives the cost's: the fastest end is the cheapest.
        bounds = intervals.recorded(stage, "request_throughput")
        ends = [cost_per_1k_requests(price[0], serving, t) for t in reversed(bounds or [])]
        rows.append({
            "layer": layer, "stage": stage["stage"], "request_throughput": throughput, "replicas": serving,
            "price_per_replica_hour": price[0], "currency": price[1],
            "cost_per_1k_requests": None if per_1k is None else round(per_1k, 6),
            "cost_interval": [round(e, 6) for e in ends] if len(ends) == 2 and None not in ends else None,
        })  # fmt: skip
    return rows


def idle_costs(params: dict[str, Any], deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer of the study: the replicas kept with no traffic and what they cost an hour and a month."""
    price = replica_price(params)
    idle = _replicas(deployments, "idle_replicas")
    rows = []
    for layer, spec in (params.get("layers") or {}).items():
        if layer not in idle:
            continue  # never deployed nor refused in this run: nothing says what it would keep
        kept = idle[layer]
        rows.append({
            "layer": layer, "kind": spec.get("kind"), "idle_replicas": kept,
            "currency": price[1] if price else (params.get("costs") or {}).get("currency", "USD"),
            "idle_cost_per_hour": None if price is None else round(kept * price[0], 4),
            "idle_cost_per_month": None if price is None else round(kept * price[0] * HOURS_PER_MONTH, 2),
        })  # fmt: skip
    return rows


def run_costs(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(load-point costs, idle costs) of a run, from its run directory."""
    params = records.read_context(run_dir).get("params", {})
    deployments = records.read(run_dir, records.DEPLOYMENTS).rows
    stages = records.read(run_dir, records.LATENCY_STAGES).rows
    return load_point_costs(params, deployments, stages), idle_costs(params, deployments)


def frame(rows: list[dict[str, Any]]) -> Any:
    """Cost rows as a table (an empty one says so: the study sets no price)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame({"cost": ["no price in the study: set costs.gpu_hourly or costs.replica_hourly"]})
    return table
