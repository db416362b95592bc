"""A run directory read back for the report: context and tables, nothing else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import results


@dataclass
class RunData:
    run_dir: Path
    context: dict[str, Any]
    deployments: list[dict[str, Any]]
    smoke: list[dict[str, Any]]
    preflight: list[dict[str, Any]]
    latency_stages: list[dict[str, Any]]
    latency_requests: list[dict[str, Any]]
    lifecycle: list[dict[str, Any]]
    lifecycle_requests: list[dict[str, Any]]

    @property
    def study(self) -> str:
        return self.context["study"]

    @property
    def run_id(self) -> str:
        return self.context["run_id"]

    @property
    def params(self) -> dict[str, Any]:
        return self.context.get("params", {})

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.params.get("layers", {})

    def last_deployment(self, layer: str) -> dict[str, Any] | None:
        found = [d for d in self.deployments if d["layer"] == layer]
        return found[-1] if found else None

    def fresh_starts(self, layer: str) -> list[dict[str, Any]]:
        """Deployments of a layer that started a server in this run (not reuses)."""
        return [d for d in self.deployments if d["layer"] == layer and d["status"] == "ready" and not d["reused"]]

    def smoke_of(self, layer: str) -> list[dict[str, Any]]:
        """The latest smoke checks of a layer (the last run of each check)."""
        latest: dict[str, dict] = {}
        for row in self.smoke:
            if row["layer"] == layer:
                latest[row["check"]] = row
        return list(latest.values())


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read everything the report may show from ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    return RunData(
        run_dir=run_dir,
        context=results.read_context(run_dir),
        deployments=results.read_records(run_dir, "deployments"),
        smoke=results.read_records(run_dir, "smoke"),
        preflight=results.read_records(run_dir, "preflight"),
        latency_stages=results.read_records(run_dir, "latency_stages"),
        latency_requests=results.read_records(run_dir, "latency_requests"),
        lifecycle=results.read_records(run_dir, "lifecycle"),
        lifecycle_requests=results.read_records(run_dir, "lifecycle_requests"),
    )
