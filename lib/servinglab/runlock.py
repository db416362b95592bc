"""One executing batch per study: the lock in ``<runs_dir>/<study>/.lock``, and who is running a run.

Two batches of one study share the study's servers (the local registry) and objects (labels), so the second
would reuse or stop the first's, and either final teardown would remove the other's layers. The lock file
names its holder the way the local registry names a server: its pid *and* its process creation time, so a
recycled pid is never taken for a live batch. A lock whose holder is gone is stale and taken over.

The file is never deleted: releasing empties it. Reading, deciding and writing happen under ``flock`` on
the file itself, so two batches starting at once cannot both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil

from .errors import RunBusyError
from .platforms.processes import process_alive

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Holder:
    """The process executing a study's batch, as the lock file and run.json record it."""

    pid: int
    create_time: float
    host: str
    run_id: str | None = None
    run_dir: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), psutil.Process().create_time(), socket.gethostname())

    @classmethod
    def from_dict(cls, data: Any) -> Holder | None:
        """The holder a lock file or run.json names, or None when it names none (or nothing readable)."""
        if not isinstance(data, dict):
            return None
        pid, create_time = data.get("pid"), data.get("create_time")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(create_time, (int, float)):
            return None
        run_id, run_dir = data.get("run_id"), data.get("run_dir")
        return cls(pid, float(create_time), str(data.get("host") or ""),
                   run_id if isinstance(run_id, str) else None, run_dir if isinstance(run_dir, str) else None)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def alive(self) -> bool:
        """True while this process runs. A holder on another host cannot be checked and counts as alive."""
        if self.host and self.host != socket.gethostname():
            return True
        return process_alive(self.pid, self.create_time)

    def describe(self) -> str:
        run = f"run {self.run_id} ({self.run_dir})" if self.run_id else "a run that is starting"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"{run}, pid {self.pid}{where}"


def lock_path(runs_dir: Path, study_name: str) -> Path:
    """``<runs_dir>/<study>/.lock``."""
    return Path(runs_dir) / study_name / LOCK_FILE


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_holder(handle: Any) -> Holder | None:
    handle.seek(0)
    text = handle.read()
    try:
        return Holder.from_dict(json.loads(text)) if text.strip() else None
    except json.JSONDecodeError:
        return None  # a lock cut short by a crash holds nobody


def _write_holder(handle: Any, holder: Holder | None) -> None:
    handle.seek(0)
    handle.truncate()
    if holder is not None:
        handle.write(json.dumps(holder.to_dict(), sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def current_holder(runs_dir: Path, study_name: str) -> Holder | None:
    """The live holder of a study's lock, or None (free, or stale). Reads only; takes nothing."""
    path = lock_path(runs_dir, study_name)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        holder = _read_holder(handle)
    return holder if holder is not None and holder.alive() else None


class RunLock:
    """The study's lock, held by this process from :meth:`acquire` to :meth:`release`.

    Parameters
    ----------
    runs_dir : path
        The study's ``paths.runs_dir``.
    study_name : str
        The study's name; the lock is ``<runs_dir>/<study>/.lock``.
    """

    def __init__(self, runs_dir: Path, study_name: str) -> None:
        self.path = lock_path(runs_dir, study_name)
        self.study_name = study_name
        self.holder = Holder.this_process()

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunBusyError naming the live batch that holds it (a stale one is taken over)."""
        with _flocked(self.path) as handle:
            other = _read_holder(handle)
            if other is not None and other.alive() and not self._holds(other):
                raise RunBusyError(
                    f"{self.path}: study {self.study_name} is already executing in {other.describe()}; "
                    "wait for it to end or stop it (Ctrl-C) first"
                )
            _write_holder(handle, self.holder)
        return self

    def name_run(self, run_dir: Path) -> None:
        """Record which run the lock's holder writes into, so a refused second batch can name it."""
        self.holder = Holder(self.holder.pid, self.holder.create_time, self.holder.host, run_dir.name, str(run_dir))
        with _flocked(self.path) as handle:
            if self._holds(_read_holder(handle)):
                _write_holder(handle, self.holder)

    def _holds(self, other: Holder | None) -> bool:
        return other is not None and (other.pid, other.create_time) == (self.holder.pid, self.holder.create_time)

    def release(self) -> None:
        """Empty the lock file when this process still holds it."""
        with _flocked(self.path) as handle:
            if self._holds(_read_holder(handle)):
                _write_holder(handle, None)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_state(context: dict[str, Any]) -> str:
    """A run's status as it is now: ``dead`` for a run marked running whose runner process has gone.

    A batch killed with SIGKILL (or a machine that went down) never marks its run; run.json still says
    ``running``. The runner's pid and creation time in run.json tell whether that is still true.
    """
    status = str(context.get("status") or "unknown")
    if status != "running":
        return status
    holder = Holder.from_dict(context.get("runner"))
    if holder is None or holder.alive():
        return status
    return "dead"
