"""Ensure every layer of a study on its platform and record the outcome per layer."""

from __future__ import annotations

import os
from typing import Any

from .. import layers as layer_kinds
from .. import records
from ..config import Study
from ..errors import PlatformError, ServinglabError
from ..layers.render import with_model
from ..platforms import Deployment, Endpoint, Platform


def deploy_layers(
    study: Study, platform: Platform, run_dir: str | os.PathLike, layers: list[str] | None = None
) -> list[dict[str, Any]]:
    """Ensure each layer (all when ``layers`` is empty) and append one record per layer.

    A layer the platform cannot host is recorded as ``unsupported`` with the reason; a layer that fails
    to start is recorded as ``failed`` with the error, and the remaining layers are still tried. Each
    record is written as soon as its layer is done, so an interruption keeps the ones before it.

    Before anything starts, every selected layer's manifests are recorded in the run directory
    (:func:`record_manifests`), so the report counts what was applied, or would be on a cluster.

    Returns the records; use :func:`assert_deployed` to stop when a hostable layer failed.
    """
    record_manifests(study, platform, run_dir, layers)
    outcomes = []
    for name, layer in study.select_layers(layers).items():
        reason = platform.unsupported_reason(name)
        if reason:
            outcome = Deployment(name, layer.kind, platform.name, "unsupported", reason=reason)
        else:
            try:
                outcome = platform.ensure(name, run_dir)
            except ServinglabError as exc:
                outcome = Deployment(name, layer.kind, platform.name, "failed", reason=str(exc))
        kind = layer_kinds.of(layer)
        # The kind's cost rule, recorded with the layer, so the report prices what the run deployed.
        outcome.serving_replicas, outcome.idle_replicas = kind.serving_replicas(layer), kind.idle_replicas(layer)
        record = outcome.to_record() | {"recorded_at": records.utc_now()}
        records.append(run_dir, records.DEPLOYMENTS, [record])
        outcomes.append(record)
    return outcomes


def record_manifests(study: Study, platform: Platform, run_dir: str | os.PathLike, layers: list[str] | None = None) -> None:
    """Write each layer's objects into the run directory as the platform applies them (as a cluster would be
    given them, where the platform is not one), and each ``compare_models`` entry's, rendered the same way."""
    for name in study.select_layers(layers):
        for model_name, model in [(None, None), *study.compare_models.items()]:
            try:
                found = platform.manifests(name, None if model is None else with_model(study, model))
            except (ServinglabError, ValueError) as exc:
                records.write_manifest(run_dir, name, None, None, model_name, error=str(exc).splitlines()[0])
                continue
            records.write_manifest(run_dir, name, found.objects, found.assumed, model_name)


def running_endpoints(
    study: Study, platform: Platform, run_dir: str | os.PathLike, layers: list[str] | None = None,
    deploy_missing: bool = False,
) -> list[Endpoint]:
    """Where each layer the platform hosts answers (all of the study's when ``layers`` is empty).

    ``deploy_missing`` deploys a layer that is not running first (a notebook run on its own); the batch
    deploys in 10_deploy and leaves it off, so a layer missing there is an error for the later stages.
    """
    endpoints = []
    for name in study.select_layers(layers):
        if platform.unsupported_reason(name):
            continue
        try:
            endpoints.append(platform.endpoint(name))
        except PlatformError:
            if not deploy_missing:
                raise
            assert_deployed(deploy_layers(study, platform, run_dir, [name]))
            endpoints.append(platform.endpoint(name))
    return endpoints


def assert_deployed(records: list[dict[str, Any]]) -> None:
    """Raise when any layer the platform can host did not become ready."""
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        raise ServinglabError(
            "layers failed to deploy:\n  " + "\n  ".join(f"{r['layer']}: {r['reason']}" for r in failed)
        )


def records_frame(records: list[dict[str, Any]]):
    """The deployment outcomes as a table."""
    import pandas as pd

    columns = ["layer", "kind", "status", "reused", "time_to_ready_s", "base_url", "reason"]
    return pd.DataFrame(records, columns=columns)


def objects_frame(records: list[dict[str, Any]]):
    """Per layer: the objects servinglab wrote and those the platform's controllers created from them."""
    import pandas as pd

    rows = [{"layer": r["layer"], "written": ", ".join(r.get("applied") or []) or "—",
             "created by the platform": ", ".join(r.get("created") or []) or "—"}
            for r in records if r.get("status") == "ready"]  # fmt: skip
    return pd.DataFrame(rows, columns=["layer", "written", "created by the platform"])


def phases_frame(records: list[dict[str, Any]]):
    """Seconds per start-up phase (rows) for each fresh start (columns)."""
    import pandas as pd

    return pd.DataFrame({r["layer"]: r["phases_s"] for r in records if r.get("phases_s")})
