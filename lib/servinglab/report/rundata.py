"""A run directory read back for the report: its context, its tables and its recorded manifests, through
``servinglab.records`` and nothing else. Nothing here asks today's code what the run would have done."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import records


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
    damaged: list[str] = field(default_factory=list)  # one warning per table with lines that could not be read

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

    def kind(self, name: str) -> dict[str, Any]:
        """What the run recorded of a layer kind (title, column, claims, ...); a kind it did not record is
        shown under its own name, with no claim."""
        found = (self.context.get("layer_kinds") or {}).get(name)
        return found or {"title": name, "column": name, "claims": {}, "has_gateway": False}

    def kind_of_layer(self, layer: str) -> dict[str, Any]:
        return self.kind(self.layers.get(layer, {}).get("kind", ""))

    def last_deployment(self, layer: str) -> dict[str, Any] | None:
        found = [d for d in self.deployments if d["layer"] == layer]
        return found[-1] if found else None

    def fresh_starts(self, layer: str) -> list[dict[str, Any]]:
        """Deployments of a layer that started a server in this run (not reuses)."""
        return [d for d in self.deployments if d["layer"] == layer and d["status"] == "ready" and not d["reused"]]

    def lifecycle_of(self, layer: str, experiment: str) -> list[dict[str, Any]]:
        """The lifecycle records of one experiment on one layer, in the order they were written."""
        return [r for r in self.lifecycle if r["layer"] == layer and r["experiment"] == experiment]

    def smoke_of(self, layer: str) -> list[dict[str, Any]]:
        """The latest smoke checks of a layer (the last run of each check)."""
        latest: dict[str, dict] = {}
        for row in self.smoke:
            if row["layer"] == layer:
                latest[row["check"]] = row
        return list(latest.values())


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read everything the report may show from ``run_dir``; every line that could not be read is named."""
    run_dir = Path(run_dir).resolve()
    context = records.read_context(run_dir)
    tables = {name: records.read(run_dir, table) for name, table in records.TABLES.items()}
    damaged = [w for t in tables.values() if (w := t.warning())]
    return RunData(run_dir=run_dir, context=context, damaged=damaged,
                   **{name: read.rows for name, read in tables.items()})  # fmt: skip
