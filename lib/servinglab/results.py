"""The run directory: the only place a report reads from.

Layout of ``runs/<study>/<run-id>/``::

    run.json            run context (schema_version, study, resolved params, platform, hardware,
                        engine version and fingerprint, git SHA, start and end times, notebooks)
    data/<table>.jsonl  results, one JSON object a line, appended and flushed as they are measured
    logs/               engine logs
    notebooks/          executed copies of the notebooks (written by the batch runner)

Records are appended one line at a time and flushed to disk, so a crash or Ctrl-C keeps everything
measured before it. ``run.json`` is updated under a lock and replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .errors import RunDirError

SCHEMA_VERSION = 1
RUN_FILE = "run.json"


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with millisecond precision."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A sortable run id: the UTC start time to the second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def git_state(directory: Path) -> dict[str, Any]:
    """The commit the code was at, and whether the tree had changes; empty values outside git."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def create_run(runs_dir: Path, study_name: str, context: dict[str, Any]) -> Path:
    """Make ``<runs_dir>/<study>/<run-id>/`` with its run.json, and point ``latest`` at it."""
    study_dir = Path(runs_dir) / study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    base = new_run_id()
    run_id, n = base, 1
    while True:
        try:
            (study_dir / run_id).mkdir()
            break
        except FileExistsError:
            n += 1
            run_id = f"{base}-{n}"
    run_dir = study_dir / run_id
    for sub in ("data", "logs", "notebooks"):
        (run_dir / sub).mkdir()
    _write_json_atomic(
        run_dir / RUN_FILE,
        {"schema_version": SCHEMA_VERSION, "run_id": run_id, "study": study_name, "started_at": utc_now()}
        | context,
    )
    latest = study_dir / "latest"
    tmp = study_dir / f".latest-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_id)
    tmp.replace(latest)
    return run_dir


def latest_run(runs_dir: Path, study_name: str) -> Path | None:
    latest = Path(runs_dir) / study_name / "latest"
    return latest.resolve() if latest.exists() else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Key order is kept as written: the order of the study's layers is the order of the report's columns.
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(run_dir: Path):
    with open(Path(run_dir) / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_context(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``run.json``; raises RunDirError when it is missing or of an unknown version."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {RUN_FILE}; this is not a servinglab run directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from exc
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunDirError(f"{path}: schema_version {version!r}; this servinglab reads {SCHEMA_VERSION}")
    return data


def update_context(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into run.json (top-level keys; mappings merged one level deep)."""
    with _locked(Path(run_dir)):
        data = read_context(run_dir)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = data[key] | value
            else:
                data[key] = value
        _write_json_atomic(Path(run_dir) / RUN_FILE, data)
    return data


def table_path(run_dir: str | os.PathLike, table: str) -> Path:
    return Path(run_dir) / "data" / f"{table}.jsonl"


def append_records(run_dir: str | os.PathLike, table: str, records: Iterable[dict[str, Any]]) -> int:
    """Append records to ``data/<table>.jsonl`` and flush them to disk; returns how many."""
    path = table_path(run_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count


def read_records(run_dir: str | os.PathLike, table: str) -> list[dict[str, Any]]:
    """Every record of a table; a truncated last line (a crash mid-write) is skipped."""
    path = table_path(run_dir, table)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_table(run_dir: str | os.PathLike, table: str):
    """A table as a pandas DataFrame (empty when nothing was recorded)."""
    import pandas as pd

    return pd.DataFrame(read_records(run_dir, table))


class Stopwatch:
    """Monotonic seconds since creation, for durations; wall-clock stamps come from utc_now()."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._start
