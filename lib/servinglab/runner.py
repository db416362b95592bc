"""The batch: execute the notebooks in order with papermill, then always tear down.

Each notebook gets ``params_file``, ``run_dir``, ``overrides`` and ``batch`` injected, plus the
parameters the study gives it under ``run.parameters``. Executed copies go to ``<run_dir>/notebooks/``;
the source notebooks are never written. A failing notebook stops the batch (its executed copy keeps the
traceback); Ctrl-C and SIGTERM stop it too; in every case the study's servers are stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import records
from .api import run_context
from .config import Study, load_study
from .errors import ParamsError, RunDirError, RunnerError
from .platforms import get_platform

INJECTED = ("params_file", "run_dir", "overrides", "batch")


def notebooks_dir(study: Study) -> Path:
    """The project's ``notebooks/`` folder (beside ``params/``), or the one this package ships with."""
    candidates = [study.project_dir / "notebooks", Path(__file__).resolve().parents[2] / "notebooks"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.ipynb")):
            return candidate
    raise ParamsError(f"{study.source_file}: no notebooks/ folder found in {', '.join(map(str, candidates))}")


def plan(study: Study, only: str | None = None) -> list[Path]:
    """The notebooks to execute, in order; every name and parameter is checked before anything runs."""
    import papermill

    folder = notebooks_dir(study)
    available = {p.stem: p for p in sorted(folder.glob("*.ipynb"))}
    names = study.run.notebooks or sorted(available)
    for name in names:
        if name not in available:
            raise ParamsError(
                f"{study.source_file}: run.notebooks: unknown notebook '{name}'; {folder} has {', '.join(available)}"
            )
    for name, params in study.run.parameters.items():
        if name not in available:
            raise ParamsError(
                f"{study.source_file}: run.parameters.{name}: unknown notebook; {folder} has {', '.join(available)}"
            )
        declared = set(papermill.inspect_notebook(str(available[name])))
        for key in params:
            if key in INJECTED:
                raise ParamsError(f"{study.source_file}: run.parameters.{name}.{key}: set by the runner itself")
            if key not in declared:
                raise ParamsError(
                    f"{study.source_file}: run.parameters.{name}.{key}: not a parameter of {name} "
                    f"(it has {', '.join(sorted(declared)) or 'none'})"
                )
    if only:
        stem = Path(only).stem
        if stem not in available:
            raise ParamsError(f"--only {only}: unknown notebook; {folder} has {', '.join(available)}")
        names = [stem]
    return [available[name] for name in names]


@dataclass
class BatchResult:
    run_dir: Path
    status: str  # ok | failed | interrupted
    report_path: Path | None
    stopped: list[str]


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A scheduler's SIGTERM ends the batch the way Ctrl-C does, so teardown still runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _update_notebook(run_dir: Path, entry: dict) -> None:
    notebooks = [n for n in records.read_context(run_dir).get("notebooks", []) if n["name"] != entry["name"]]
    records.update_context(run_dir, notebooks=notebooks + [entry])


def run_study(
    params_file: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    only: str | None = None,
    run_dir: str | os.PathLike | None = None,
    keep_servers: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> BatchResult:
    """Execute a study's notebooks with papermill into a run directory, then tear down.

    Parameters
    ----------
    params_file : path
        The study file.
    overrides : list of str
        ``dotted.key=value`` items (``--set``), passed on to every notebook.
    only : str, optional
        Execute just this notebook (needs ``run_dir``: an existing run to add to).
    run_dir : path, optional
        An existing run directory; a new ``runs/<study>/<run-id>`` is made when empty.
    keep_servers : bool
        Leave the servers running at the end (``run.teardown: never`` does the same).
    progress : bool
        Show papermill's per-cell progress bar.
    say : callable
        Where progress lines go.
    """
    import papermill

    study = load_study(params_file, overrides)
    platform = get_platform(study)
    notebooks = plan(study, only)
    if only and not run_dir:
        raise ParamsError(f"--only {only}: give --run-dir, the run to add this stage to")
    if run_dir:
        run_path = Path(run_dir).resolve()
        records.read_context(run_path)  # raises RunDirError when it is not a run directory
    else:
        run_path = records.create_run(study.runs_dir, study.study, run_context(study) | {"status": "running"})
    say(f"run directory: {run_path}")
    records.update_context(run_path, status="running", ended_at=None)

    status = "ok"
    failure: str | None = None
    stopped: list[str] = []
    try:
        with _sigterm_as_interrupt():
            for i, notebook in enumerate(notebooks, 1):
                executed = run_path / "notebooks" / notebook.name
                say(f"[{i}/{len(notebooks)}] {notebook.stem} ...")
                t0 = time.monotonic()
                entry = {"name": notebook.stem, "executed_path": str(executed), "started_at": records.utc_now()}
                _update_notebook(run_path, entry | {"status": "running"})
                parameters = {
                    "params_file": str(study.source_file),
                    "run_dir": str(run_path),
                    "overrides": list(overrides),
                    "batch": True,
                } | study.run.parameters.get(notebook.stem, {})
                try:
                    papermill.execute_notebook(
                        str(notebook),
                        str(executed),
                        parameters=parameters,
                        cwd=str(notebook.parent),
                        progress_bar=progress,
                        request_save_on_cell_execute=True,
                    )
                except papermill.PapermillExecutionError as exc:
                    seconds = round(time.monotonic() - t0, 1)
                    error = f"{exc.ename}: {exc.evalue}".splitlines()[0]
                    _update_notebook(run_path, entry | {"status": "failed", "seconds": seconds, "error": error})
                    status, failure = "failed", f"{notebook.stem} failed ({error}); executed copy: {executed}"
                    say(f"[{i}/{len(notebooks)}] {notebook.stem} FAILED after {seconds} s: {error}")
                    say(f"executed notebook with the traceback: {executed}")
                    break
                seconds = round(time.monotonic() - t0, 1)
                _update_notebook(run_path, entry | {"status": "ok", "seconds": seconds})
                say(f"[{i}/{len(notebooks)}] {notebook.stem} done in {seconds} s")
    except KeyboardInterrupt:
        status, failure = "interrupted", "interrupted"
        say("interrupted: stopping the study's servers")
    finally:
        if keep_servers or study.run.teardown == "never":
            say(f"servers left running; stop them with: servinglab teardown {study.source_file}")
        else:
            stopped = platform.teardown()
            for line in stopped:
                say(f"teardown: {line}")
        with contextlib.suppress(RunDirError):
            records.update_context(run_path, status=status, ended_at=records.utc_now())

    report = study.reports_dir / f"{study.study}-{run_path.name}.html"
    if report.is_file():
        # Once more now that the run has ended, so the published page carries its end and status.
        from .report import publish

        publish(run_path, study.reports_dir)
    result = BatchResult(run_path, status, report if report.is_file() else None, stopped)
    if status == "interrupted":
        raise KeyboardInterrupt
    if status == "failed":
        raise RunnerError(failure)
    return result

