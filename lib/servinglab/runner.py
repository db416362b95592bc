"""The batch: execute the notebooks in order with papermill, then always tear down.

Each notebook gets ``params_file``, ``run_dir``, ``overrides`` and ``batch`` injected, plus the
parameters the study gives it under ``run.parameters``. ``params_file`` is the run's frozen params segment
(``<run_dir>/params/<n>.json``), not the study file: an edit of the study during the run changes nothing.
Executed copies go to ``<run_dir>/notebooks/``; the source notebooks are never written. A failing notebook
stops the batch (its executed copy keeps the traceback); Ctrl-C and SIGTERM stop it too; in every case the
study's servers are stopped afterwards. One batch of a study executes at a time (:mod:`servinglab.runlock`).

Ctrl-C from a terminal reaches the runner's process group but not the notebook's kernel, which
jupyter_client starts in a session of its own. A KeyboardInterrupt raised in the runner lands wherever its
main thread happens to be, and where that is a finalizer or a library's ``except BaseException`` it is
swallowed and the batch runs on. So the runner's handler raises nothing: it records the request, interrupts
the kernel as Jupyter's interrupt button does (the cell stops the way the library stops on Ctrl-C, keeping
its records), kills the kernel if it is still executing a few seconds later, and the batch loop ends at
once; teardown runs to its end, a second Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import records
from .api import run_context
from .progress import Relay, log_path
from .config import Study, load_study
from .errors import ParamsError, RunDirError, RunnerError
from .platforms import get_platform
from .runlock import RunLock

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


# A kernel interrupted by Ctrl-C gets this long to end its cell (records written, stage marked interrupted)
# before it is killed; with the kernel's death noticed within a second, the batch stops well within 10 s.
KERNEL_STOP_GRACE_S = 4.0


def _signal_kernels(signum: int, skip: set[int]) -> set[int]:
    """Send ``signum`` to this process's children (the notebook's kernel) and their process groups; returns
    the pids signalled. A child leading its own group (the kernel's session) gets it group-wide, as Jupyter's
    interrupt sends it, so the load generator's client processes get it too."""
    import psutil

    sent = set()
    for child in psutil.Process().children():
        if child.pid in skip:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signum)
            else:
                os.kill(child.pid, signum)
            sent.add(child.pid)
    return sent


class _StopRequest:
    """Ctrl-C and SIGTERM while a batch executes: recorded, forwarded to the kernel, never raised."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.executing = False  # a notebook's kernel is starting or running

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            # os.write, not print: the main thread may be inside a print when the signal lands.
            os.write(2, b"servinglab: stopping; teardown goes on until the study's servers are stopped\n")
            return
        self.signum = signum
        threading.Thread(target=self._stop_kernel, name="servinglab-stop-kernel", daemon=True).start()

    def _stop_kernel(self) -> None:
        """Interrupt the kernel (one started after the signal too), then kill it once the grace period is over."""
        interrupted: set[int] = set()
        deadline = time.monotonic() + KERNEL_STOP_GRACE_S
        while self.executing and time.monotonic() < deadline:
            interrupted |= _signal_kernels(signal.SIGINT, skip=interrupted)
            time.sleep(0.1)
        if self.executing:
            _signal_kernels(signal.SIGKILL, skip=set())


@contextlib.contextmanager
def _signals_as_stop_requests():
    """Route SIGINT and SIGTERM (a scheduler's) to one stop request for the length of the batch."""
    stop = _StopRequest()
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _update_notebook(run_dir: Path, entry: dict) -> None:
    notebooks = [n for n in records.read_context(run_dir).get("notebooks", []) if n["name"] != entry["name"]]
    records.update_context(run_dir, notebooks=notebooks + [entry])


def _freeze(run_path: Path, study: Study, overrides: list[str] | tuple[str, ...], only: str | None) -> tuple[int, Path]:
    """This invocation's params segment of the run: the study as resolved now, read by its notebooks."""
    return records.freeze_params(run_path, {
        "study_file": str(study.source_file), "sources": study.sources, "overrides": list(overrides), "only": only,
        "params": study.resolved(),
    })  # fmt: skip


def _kernel_config():
    """The kernel talks to the runner over Unix sockets in the user's private Jupyter runtime folder, not
    over TCP on localhost (which the kernel warns about on every start, and any local user can reach)."""
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets.config import Config

    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(runtime / f"servinglab-kernel-{os.getpid()}")
    return config


def _execute(notebook: Path, executed: Path, parameters: dict, progress: bool, stop: _StopRequest) -> str | None:
    """Execute one notebook; None when it ran to its end, else the error (the stop's, when one was requested)."""
    import papermill

    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
            progress_bar=progress, request_save_on_cell_execute=True, config=_kernel_config(),
        )  # fmt: skip
    except papermill.PapermillExecutionError as exc:
        return f"{exc.ename}: {exc.evalue}".splitlines()[0]
    except Exception as exc:
        # A kernel stopped while it started, or killed after the grace period, ends papermill with its own
        # errors; without a stop request they are papermill's or the kernel's failures and go up as they are.
        if not stop.requested:
            raise
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        stop.executing = False
    return None


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
        ``dotted.key=value`` items (``--set``), frozen with the study into the run's params segment.
    only : str, optional
        Execute just this notebook (needs ``run_dir``: an existing run to add to). A notebook that measures
        running layers (``needs_running_layers`` in its metadata) gets them deployed first where they do not
        run with the study's spec; at the end only what this invocation started is stopped.
    run_dir : path, optional
        An existing run directory; a new ``runs/<study>/<run-id>`` is made when empty.
    keep_servers : bool
        Leave the servers running at the end (``run.teardown: never`` does the same).
    progress : bool
        Show papermill's per-cell progress bar.
    say : callable
        Where progress lines go: the runner's own, and one per phase of a long step that the notebooks'
        library code reports (:mod:`servinglab.progress`), relayed as they happen.

    Raises
    ------
    RunBusyError
        Another batch of the study is executing (the message names its run and pid); nothing was started.
    KeyboardInterrupt
        After teardown, when Ctrl-C or SIGTERM stopped the batch (the run is marked ``interrupted``).
    """
    study = load_study(params_file, overrides)
    platform = get_platform(study)
    notebooks = plan(study, only)
    if only and not run_dir:
        raise ParamsError(f"--only {only}: give --run-dir, the run to add this stage to")
    if run_dir:
        records.read_context(Path(run_dir).resolve())  # raises RunDirError when it is not a run directory

    with _signals_as_stop_requests() as stop, RunLock(study.runs_dir, study.study) as lock:
        if run_dir:
            run_path = Path(run_dir).resolve()
        else:
            run_path = records.create_run(study.runs_dir, study.study, run_context(study) | {"status": "running"})
        lock.name_run(run_path)
        segment, segment_file = _freeze(run_path, study, overrides, only)
        say(f"run directory: {run_path}")
        records.update_context(run_path, status="running", ended_at=None, runner=lock.holder.to_dict())
        status, stopped = "failed", []
        failure: str | None = "the batch stopped on an error"
        with Relay(log_path(run_path), say) as relay:
            tell = _in_order(relay, say)
            try:
                if only:
                    _deploy_for_alone(study, platform, notebooks[0], run_path, segment, tell)
                status, failure = _run_notebooks(study, notebooks, run_path, (segment, segment_file), overrides,
                                                 progress, stop, tell)  # fmt: skip
            finally:
                try:
                    stopped = _teardown(study, platform, run_path, segment if only else None, keep_servers, tell)
                finally:
                    if stop.requested and status == "ok":
                        status = "interrupted"  # Ctrl-C during teardown: it ran to its end all the same
                    with contextlib.suppress(RunDirError):
                        records.update_context(run_path, status=status, ended_at=records.utc_now())

        report = study.reports_dir / f"{study.study}-{run_path.name}.html"
        if report.is_file():
            # Once more now that the run has ended, so the published page carries its end and status.
            from .report import publish

            publish(run_path, study.reports_dir)
        _say_summary(run_path, report if report.is_file() else None, say)
    result = BatchResult(run_path, status, report if report.is_file() else None, stopped)
    if status == "interrupted":
        raise KeyboardInterrupt
    if status == "failed":
        raise RunnerError(failure)
    return result


def _in_order(relay: Relay, say: Callable[[str], None]) -> Callable[[str], None]:
    """The runner's own ``say``, which first passes on the progress lines written before it: a notebook's
    last stage comes before the line that says the notebook is done."""

    def tell(line: str) -> None:
        relay.flush()
        say(line)

    return tell


def needs_running_layers(notebook: Path) -> bool:
    """Whether a notebook measures layers that must already run (``servinglab.needs_running_layers`` in its
    metadata: 20_smoke, 30_latency, 40_lifecycle); the batch's 10_deploy started them before it."""
    import nbformat

    metadata = nbformat.read(str(notebook), as_version=4).metadata
    return bool((metadata.get("servinglab") or {}).get("needs_running_layers"))


def _deploy_for_alone(study: Study, platform, notebook: Path, run_path: Path, segment: int,
                      say: Callable[[str], None]) -> None:  # fmt: skip
    """Ensure the layers a notebook executed on its own (``--only``) measures: those of its ``layers``
    parameter (all of the study's when it has none) that the platform hosts. A layer running with the
    study's spec is reused; the records say which were started, under this invocation's params segment."""
    from .experiments import deploy

    if not needs_running_layers(notebook):
        return
    wanted = study.run.parameters.get(notebook.stem, {}).get("layers") or None
    names = [name for name in study.select_layers(wanted) if not platform.unsupported_reason(name)]
    if not names:
        return
    say(f"{notebook.stem} measures running layers: ensuring {', '.join(names)}")
    with records.writing_under_segment(segment):
        outcomes = deploy.deploy_layers(study, platform, run_path, names)
    for outcome in outcomes:
        say(f"{outcome['layer']}: {'reused, already running with this spec' if outcome['reused'] else outcome['status']}")
    deploy.assert_deployed(outcomes)


def started_in_segment(run_path: Path, segment: int) -> list[str]:
    """The layers that one invocation (its params segment) started rather than reused, by its deployment
    records: what an ``--only`` invocation stops at its end."""
    rows = records.read(run_path, records.DEPLOYMENTS).rows
    return sorted({r["layer"] for r in rows if r.get("params_segment") == segment and r["status"] == "ready"
                   and not r["reused"]})  # fmt: skip


def _teardown(study: Study, platform, run_path: Path, segment: int | None, keep_servers: bool,
              say: Callable[[str], None]) -> list[str]:  # fmt: skip
    """Stop the study's servers at the end: all of them after a batch; after an ``--only`` invocation
    (``segment``) only those it started, so a server someone else started goes on serving."""
    if keep_servers or study.run.teardown == "never":
        say(f"servers left running; stop them with: servinglab teardown {study.source_file}")
        return []
    if segment is None:
        stopped = platform.teardown()
    else:
        started = started_in_segment(run_path, segment)
        # An empty list would mean every layer to the platform.
        stopped = platform.teardown(started) if started else []
        running = [row["layer"] for row in platform.status() if row["layer"] not in started]
        if running:
            say(f"left running (not started by this invocation): {', '.join(sorted(set(running)))}")
    for line in stopped:
        say(f"teardown: {line}")
    return stopped


def _say_summary(run_path: Path, report: Path | None, say: Callable[[str], None]) -> None:
    """The closing block: status, per layer its verdict and headline numbers, warnings, the report."""
    from .report.summary import summary_lines

    try:
        lines = summary_lines(run_path, report)
    except Exception as exc:  # noqa: BLE001 - the batch ends as it did; the block is a courtesy
        lines = [f"(no summary: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    for line in lines:
        say(line)


def _run_notebooks(
    study: Study, notebooks: list[Path], run_path: Path, segment: tuple[int, Path],
    overrides: list[str] | tuple[str, ...], progress: bool, stop: _StopRequest, say: Callable[[str], None],
) -> tuple[str, str | None]:  # fmt: skip
    """Execute the notebooks in order until one fails or a stop is requested: (status, failure)."""
    number, segment_file = segment
    for i, notebook in enumerate(notebooks, 1):
        stop.executing = True  # set before the check: a request from here on reaches this notebook's kernel
        if stop.requested:
            break
        executed = run_path / "notebooks" / notebook.name
        say(f"[{i}/{len(notebooks)}] {notebook.stem} ...")
        t0 = time.monotonic()
        entry = {"name": notebook.stem, "executed_path": str(executed), "started_at": records.utc_now(),
                 "params_segment": number}  # fmt: skip
        _update_notebook(run_path, entry | {"status": "running"})
        parameters = {
            "params_file": str(segment_file),
            "run_dir": str(run_path),
            "overrides": list(overrides),
            "batch": True,
        } | study.run.parameters.get(notebook.stem, {})
        error = _execute(notebook, executed, parameters, progress, stop)
        seconds = round(time.monotonic() - t0, 1)
        if error is not None and stop.requested:
            _update_notebook(run_path, entry | {"status": "interrupted", "seconds": seconds, "error": error})
            say(f"[{i}/{len(notebooks)}] {notebook.stem} interrupted after {seconds} s")
            break
        if error is not None:
            _update_notebook(run_path, entry | {"status": "failed", "seconds": seconds, "error": error})
            say(f"[{i}/{len(notebooks)}] {notebook.stem} FAILED after {seconds} s: {error}")
            say(f"executed notebook with the traceback: {executed}")
            return "failed", f"{notebook.stem} failed ({error}); executed copy: {executed}"
        _update_notebook(run_path, entry | {"status": "ok", "seconds": seconds})
        say(f"[{i}/{len(notebooks)}] {notebook.stem} done in {seconds} s")
    stop.executing = False
    if stop.requested:
        say("interrupted: stopping the study's servers")
        return "interrupted", "interrupted"
    return "ok", None
