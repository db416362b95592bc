"""A run directory read back for the report: context and tables, nothing else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import results
from ..config import Study
from ..errors import RunDirError


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
    _study: Study | RunDirError | None = field(default=None, init=False, repr=False, compare=False)

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

    def resolved_study(self) -> Study:
        """The study the run was made from, rebuilt from run.json's params (for rendering and pricing).

        Raises RunDirError when the params no longer validate (a run from an older servinglab).
        """
        if self._study is None:
            try:
                self._study = Study.model_validate(self.params)
            except Exception as exc:  # noqa: BLE001 - pydantic's error, kept as the reason
                first = str(exc).splitlines()
                self._study = RunDirError(f"{self.run_dir}: run.json's params do not validate as a study now: "
                                          f"{' '.join(first[:3])}")  # fmt: skip
        if isinstance(self._study, RunDirError):
            raise self._study
        return self._study

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
