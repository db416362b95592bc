"""Ensure every layer of a study on its platform and record the outcome per layer."""

from __future__ import annotations

import os
from typing import Any

from . import results
from .config import Study
from .errors import PlatformError, ServinglabError
from .platforms import Deployment, Endpoint, Platform


def deploy_layers(
    study: Study, platform: Platform, run_dir: str | os.PathLike, layers: list[str] | None = None
) -> list[dict[str, Any]]:
    """Ensure each layer (all when ``layers`` is empty) and append one record per layer.

    A layer the platform cannot host is recorded as ``unsupported`` with the reason; a layer that fails
    to start is recorded as ``failed`` with the error, and the remaining layers are still tried. Each
    record is written as soon as its layer is done, so an interruption keeps the ones before it.

    Returns the records; use :func:`assert_deployed` to stop when a hostable layer failed.
    """
    records = []
    for name, layer in study.select_layers(layers).items():
        reason = platform.unsupported_reason(name)
        if reason:
            outcome = Deployment(name, layer.kind, platform.name, "unsupported", reason=reason)
        else:
            try:
                outcome = platform.ensure(name, run_dir)
            except ServinglabError as exc:
                outcome = Deployment(name, layer.kind, platform.name, "failed", reason=str(exc))
        record = outcome.to_record() | {"recorded_at": results.utc_now()}
        results.append_records(run_dir, "deployments", [record])
        records.append(record)
    return records


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
