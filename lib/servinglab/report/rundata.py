"""A run directory read back for the report: its context, its tables and its recorded manifests, through
``servinglab.records`` and nothing else. Nothing here asks today's code what the run would have done.

Latency stages measured under parameters other than the run's own (``servinglab run --only 30_latency
--run-dir RUN --set ...`` adds a params segment whose study differs from run.json's) are set apart
(:func:`split_stages_by_segment`): the report's tables, figures and verdicts read the stages measured with
the run's parameters, and shows the others separately, each group labelled with what was changed. To judge
by other parameters, make a run with them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import records
from ..errors import RunDirError

# A run id as records.new_run_id makes it (a second run in the same second gets -2, -3, ...): it becomes
# part of file names, so nothing else is accepted from run.json.
RUN_ID_PATTERN = r"\d{8}T\d{6}Z(?:-\d+)?"
# The parts of the recorded study the report reads as mappings (each only when present: an older run may
# lack some); the values inside them are shown as they were recorded.
# A group's label names at most this many changed parameters, then how many more.
CHANGES_IN_LABEL = 4
PARAMS_MAPPINGS = ("platform", "model", "model.source", "model.engine_args", "layers", "compare_models",
                   "workloads", "workloads.smoke", "workloads.latency", "workloads.lifecycle", "slos",
                   "slos.goodput", "costs", "telemetry", "auth", "run", "paths")  # fmt: skip


@dataclass
class SegmentStages:
    """Latency stages measured under another params segment than the run's own parameters."""

    segment: int  # the params/<n>.json they were recorded under
    changes: list[str]  # "dotted.key=value" for each parameter that differs from run.json's
    stages: list[dict[str, Any]]

    @property
    def label(self) -> str:
        shown = ", ".join(self.changes[:CHANGES_IN_LABEL])
        more = len(self.changes) - CHANGES_IN_LABEL
        return f"params segment {self.segment}: {shown}" + (f" and {more} more" if more > 0 else "")


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
    conversation_turns: list[dict[str, Any]] = field(default_factory=list)  # multi-turn sessions, per turn
    # Stages measured with other parameters than the run's, by segment; not in latency_stages (see the top).
    stages_apart: list[SegmentStages] = field(default_factory=list)

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
        """Every latency stage with the request records it was computed from (warm-ups left out; a stage of
        sessions, its turn records), or None when it has none (an import, or records that cannot be told apart).

        A stage record names its measurement (``stage_id``) and so does each of its requests. A run that
        did not record one has its records matched by layer and stage name; a stage measured twice in it (a
        notebook run again) has its records split in the order they were written, by its request count.
        """
        by_id: dict[str, list[dict[str, Any]]] = {}
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
        # A stage of multi-turn sessions is computed from its turns, each naming the stage's measurement.
        turns = [t for t in self.conversation_turns if t.get("stage_id")]
        for record in self.latency_requests + turns:
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


def is_name(text: Any) -> bool:
    """Whether ``text`` is a name a study allows for itself, a layer or a compared model."""
    return isinstance(text, str) and re.fullmatch(records.LAYER_NAME_PATTERN, text) is not None


def _mapping_problem(params: dict[str, Any], dotted: str) -> str | None:
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None  # absent, or under a part already named as not a mapping
        value = value[part]
    problem = records.f(dotted, dict, "").problem(value)
    return f"params.{dotted}: {problem}" if problem and value is not None else None


def _names_problems(context: dict[str, Any]) -> list[str]:
    found = []
    if not is_name(context["study"]):
        found.append(f"study: {context['study'][:60]!r} is not a study name (lowercase letters, digits and '-', "
                     "at most 40)")  # fmt: skip
    if not re.fullmatch(RUN_ID_PATTERN, context["run_id"]):
        found.append(f"run_id: {context['run_id'][:60]!r} is not a run id (YYYYMMDDTHHMMSSZ, as servinglab makes them)")
    params = context["params"]
    for what in ("layers", "compare_models"):
        entries = params.get(what)
        for name in entries if isinstance(entries, dict) else ():
            if not is_name(name):
                found.append(f"params.{what}: {name[:60]!r} is not a valid name (lowercase letters, digits and '-', "
                             "at most 40)")  # fmt: skip
    return found


def context_problems(context: dict[str, Any]) -> list[str]:
    """What makes a run's context (run.json, already checked against records.RUN_CONTEXT) unfit for a report:
    names that are not the names a study allows (they become file names), and recorded study parts that are
    not mappings. Empty: it is fit."""
    found = _names_problems(context)
    params = context["params"]
    found += [p for dotted in PARAMS_MAPPINGS if (p := _mapping_problem(params, dotted))]
    layers = params.get("layers")
    for name, spec in layers.items() if isinstance(layers, dict) else ():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            found.append(f"params.layers.{name}: not a layer with a kind")
    kinds = context.get("layer_kinds") or {}
    found += [f"layer_kinds.{name}: not an object with a title and a column" for name, kind in kinds.items()
              if not (isinstance(kind, dict) and isinstance(kind.get("title"), str) and isinstance(kind.get("column"), str))]
    notebooks = context.get("notebooks") or []
    found += [f"notebooks[{i}]: not an object" for i, nb in enumerate(notebooks) if not isinstance(nb, dict)]
    return found


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read everything the report may show from ``run_dir``; every line that could not be read is named.

    Raises RunDirError naming run.json and each field that makes it unfit (see :func:`context_problems`).
    """
    run_dir = Path(run_dir).resolve()
    context = records.read_context(run_dir)
    problems = context_problems(context)
    if problems:
        raise RunDirError(f"{run_dir / records.RUN_FILE}: " + "; ".join(problems))
    tables = {name: records.read(run_dir, table) for name, table in records.TABLES.items()}
    damaged = [w for t in tables.values() if (w := t.warning())]
    rows = {name: _with_absent(read) for name, read in tables.items()}
    rows["latency_stages"], apart = split_stages_by_segment(run_dir, context["params"], rows["latency_stages"])
    apart_ids = {st["stage_id"] for group in apart for st in group.stages if st.get("stage_id")}
    rows["latency_requests"] = [r for r in rows["latency_requests"] if r.get("stage_id") not in apart_ids]
    return RunData(run_dir=run_dir, context=context, damaged=damaged, stages_apart=apart, **rows)


def params_changes(base: Any, other: Any, prefix: str = "") -> list[str]:
    """Each parameter whose value differs between two resolved studies, as ``dotted.key=value`` (the value as
    JSON; ``(absent)`` where one side lacks it), in key order."""
    if isinstance(base, dict) and isinstance(other, dict):
        found = []
        for key in sorted(set(base) | set(other), key=str):
            if key not in other:
                found.append(f"{prefix}{key}=(absent)")
            elif key not in base:
                found.append(f"{prefix}{key}={json.dumps(other[key], sort_keys=True, default=str)}")
            else:
                found += params_changes(base[key], other[key], f"{prefix}{key}.")
        return found
    if base == other:
        return []
    return [f"{prefix.rstrip('.')}={json.dumps(other, sort_keys=True, default=str)}"]


def _segment_changes(run_dir: Path, segment: int, params: dict[str, Any]) -> list[str]:
    try:
        frozen = records.read_params_segment(records.params_segment_path(run_dir, segment))
    except RunDirError:
        # Unreadable: nothing says its stages were measured with the run's parameters.
        return [f"{records.PARAMS_DIR}/{segment}.json unreadable"]
    return params_changes(params, frozen["params"])


def split_stages_by_segment(
    run_dir: str | os.PathLike, params: dict[str, Any], stages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[SegmentStages]]:
    """The stages measured with the run's parameters, and the others grouped by their params segment.

    Parameters
    ----------
    run_dir : path
        The run directory (its ``params/<n>.json`` are read).
    params : dict
        The run's parameters (run.json's ``params``: the study the run was made for).
    stages : list of dict
        The run's latency stage records, in the order they were written.

    Returns
    -------
    tuple
        The stages of the run's parameters (a stage recorded under no segment, or under one whose study is
        the run's, counts as one of them), and one :class:`SegmentStages` per other segment, by number.
    """
    changes: dict[int, list[str]] = {}
    own, apart = [], {}
    for stage in stages:
        segment = stage.get("params_segment")
        if segment is not None and segment not in changes:
            changes[segment] = _segment_changes(Path(run_dir), segment, params)
        if segment is None or not changes[segment]:
            own.append(stage)
        else:
            apart.setdefault(segment, []).append(stage)
    return own, [SegmentStages(n, changes[n], apart[n]) for n in sorted(apart)]


def _with_absent(read: records.TableRead) -> list[dict[str, Any]]:
    # A field a record may lack reads as null, as the table declares: the report never meets a missing key.
    absent = {fl.name: None for fl in read.table.fields if not fl.required}
    return [absent | row for row in read.rows]
