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

    def stage_requests(self) -> list[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """Every latency stage with the request records it was computed from (warm-ups left out), or None
        when it has none (an import, or records that cannot be told apart).

        A stage record names its measurement (``stage_id``) and so does each of its requests. A run that
        did not record one has its records matched by layer and stage name; a stage measured twice in it (a
        notebook run again) has its records split in the order they were written, by its request count.
        """
        by_id: dict[str, list[dict[str, Any]]] = {}
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for record in self.latency_requests:
            if record.get("warmup"):
                continue
            if record.get("stage_id"):
                by_id.setdefault(record["stage_id"], []).append(record)
            else:
                by_key.setdefault((record.get("layer"), record.get("stage")), []).append(record)  # type: ignore[arg-type]
        legacy = [s for s in self.latency_stages if not s.get("stage_id") and s.get("provenance") != "imported"]
        same_key: dict[tuple[str, str], int] = {}
        for stage in legacy:
            key = (stage["layer"], stage["stage"])
            same_key[key] = same_key.get(key, 0) + 1
        taken: dict[tuple[str, str], int] = {}
        out: list[tuple[dict[str, Any], list[dict[str, Any]] | None]] = []
        for stage in self.latency_stages:
            if stage.get("provenance") == "imported":
                out.append((stage, None))
            elif stage.get("stage_id"):
                out.append((stage, by_id.get(stage["stage_id"]) or None))
            else:
                key = (stage["layer"], stage["stage"])
                found = by_key.get(key, [])
                if same_key[key] == 1:
                    out.append((stage, found or None))
                    continue
                count = (stage["summary"].get("completed") or 0) + (stage["summary"].get("failed") or 0)
                start = taken.get(key, 0)
                part = found[start : start + count]
                taken[key] = start + count
                out.append((stage, part if len(part) == count and count else None))
        return out

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
