"""One line per phase of a long step (an engine's start, a latency stage, a lifecycle trial), for whoever
watches the batch.

A notebook's kernel is a process of its own whose output goes into the executed notebook, not to the
batch's terminal. So while a batch executes, the runner names a file in :data:`FILE_ENV` (the run's
``logs/progress.log``), which every kernel it starts inherits: :func:`say` appends the line there, and the
runner's :class:`Relay` passes each new line on to the batch's output as it arrives. Outside a batch (a
notebook opened by hand, a test) the line is printed where the code runs. A line never carries a secret:
callers put in names, phases and numbers only.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

FILE_ENV = "SERVINGLAB_PROGRESS_FILE"
# In the run directory beside the engine logs, so the progress of a batch stays readable after it ended.
LOG_NAME = "logs/progress.log"
RELAY_POLL_S = 0.2


def log_path(run_dir: str | os.PathLike) -> Path:
    """Where a batch's progress lines go in its run directory."""
    return Path(run_dir) / LOG_NAME


def say(line: str) -> None:
    """Report one phase of a long step: to the batch's output in a batch, printed otherwise.

    Parameters
    ----------
    line : str
        One line (a newline in it is replaced by a space, so a relayed line stays one line).
    """
    text = " ".join(str(line).split("\n"))
    target = os.environ.get(FILE_ENV)
    if not target:
        print(text, flush=True)
        return
    # One write with O_APPEND: lines from the kernel and from the runner's own process never interleave.
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (text + "\n").encode("utf-8", errors="replace"))
    finally:
        os.close(fd)


def elapsed(seconds: float) -> str:
    """Seconds as a progress line says them."""
    return f"{seconds:.1f} s"


class Relay:
    """Pass each line appended to a progress file on to ``say``, from a thread, while the context is open.

    :meth:`flush` passes on what is there now (the runner calls it when a notebook ended, before it says
    so, so the lines stay in the order they happened); leaving the context flushes too.
    """

    def __init__(self, path: str | os.PathLike, say: Callable[[str], None]) -> None:
        self.path = Path(path)
        self._say = say
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="servinglab-progress", daemon=True)
        self._previous: str | None = None

    def __enter__(self) -> Relay:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._previous = os.environ.get(FILE_ENV)
        os.environ[FILE_ENV] = str(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.flush()
        finally:
            if self._previous is None:
                os.environ.pop(FILE_ENV, None)
            else:
                os.environ[FILE_ENV] = self._previous

    def _run(self) -> None:
        while not self._stop.wait(RELAY_POLL_S):
            self.flush()

    def flush(self) -> None:
        """Pass on every whole line written since the last call."""
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(self._offset)
                    data = handle.read()
            except FileNotFoundError:
                return
            data = data[: data.rfind(b"\n") + 1]  # a line still being written is passed on next time
            self._offset += len(data)
            for line in data.decode("utf-8", errors="replace").splitlines():
                self._say(f"  {line}")
