"""Engine processes that outlive the kernel that started them, and the on-disk registry that finds them.

A local server is started in its own session (so its process group holds the API server and the engine
core processes it forks, and a Ctrl-C aimed at the terminal does not reach it half-way). The registry is
one JSON file per server under ``<cache_dir>/servers/``; the entry itself records its study, layer and
spec hash, and lookups compare those fields exactly. The file name is only for people: names may contain
``--``, so study ``lab`` with layer ``b--raw`` and study ``lab--b`` with layer ``raw`` would read alike,
and a digest of all three keeps their files apart. A process is identified by its pid *and* its creation
time, so a recycled pid is never mistaken for our server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class ServerEntry:
    """One engine process the local platform started."""

    study: str
    layer: str
    spec_hash: str
    pid: int
    create_time: float
    port: int
    base_url: str
    served_name: str
    log_path: str
    command: list[str]
    started_at: str
    state: str = "starting"  # starting | ready
    ready_at: str | None = None
    time_to_ready_s: float | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    placement: dict[str, list[int]] | None = None  # the cores of its parts, when they were placed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_alive(pid: int, create_time: float) -> bool:
    """True when ``pid`` runs and is the process created at ``create_time`` (not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            _reap(proc.info["pid"])
            continue
        try:
            if os.getpgid(proc.info["pid"]) == pgid:
                members.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return members


def is_engine_group(pgid: int) -> bool:
    """True when every live member of the group is a vLLM process (guards against a recycled pgid)."""
    members = group_members(pgid)
    for pid in members:
        try:
            text = " ".join(psutil.Process(pid).cmdline()) + " " + psutil.Process(pid).name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "vllm" not in text.lower():
            return False
    return bool(members)


def stop_group(pgid: int, grace_s: float) -> str:
    """SIGTERM the whole group, then SIGKILL what is left after ``grace_s``; returns how it ended."""
    if not group_members(pgid):
        return "already gone"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return "stopped (SIGTERM)"
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and group_members(pgid):
        time.sleep(0.1)
    return "killed (SIGKILL after grace period)"


def _reap(pid: int) -> None:
    """Collect the exit status of a finished child of ours, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class Registry:
    """The servers a study's local platform started, as files under ``<cache_dir>/servers``."""

    def __init__(self, cache_dir: Path) -> None:
        self.directory = Path(cache_dir) / "servers"

    def _path(self, study: str, layer: str, spec_hash: str) -> Path:
        # The digest, not the readable prefix, makes the name unique: prefixes of two owners can coincide.
        owner = hashlib.sha256(json.dumps([study, layer, spec_hash]).encode()).hexdigest()[:16]
        return self.directory / f"{study}--{layer}--{owner}.json"

    def save(self, entry: ServerEntry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(entry.study, entry.layer, entry.spec_hash)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)

    def remove(self, entry: ServerEntry) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(entry.study, entry.layer, entry.spec_hash).unlink()

    def entries(self, study: str, layer: str | None = None) -> list[ServerEntry]:
        """Entries whose own study (and layer, when given) are exactly these; those whose process is gone are
        deleted. Another owner's entry is never touched, whatever its file is called.

        Parameters
        ----------
        study : str
            The study whose servers are wanted.
        layer : str, optional
            One layer of it; all its layers when omitted.
        """
        if not self.directory.is_dir():
            return []
        live = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = ServerEntry(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                # Removed by its owner meanwhile, or unreadable (another version's, damaged): nobody's to
                # judge, so left alone. Entries are written by rename, so ours are whole.
                continue
            if entry.study != study or (layer is not None and entry.layer != layer):
                continue
            if process_alive(entry.pid, entry.create_time):
                self._rename_to_current(path, entry)
                live.append(entry)
            else:
                # The server's main process ended; engine processes it left in its group go too.
                if is_engine_group(entry.pid):
                    stop_group(entry.pid, grace_s=1.0)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return live

    def _rename_to_current(self, path: Path, entry: ServerEntry) -> None:
        """An entry saved under an earlier naming moves to its current name, so ``remove`` finds it."""
        current = self._path(entry.study, entry.layer, entry.spec_hash)
        if path != current:
            with contextlib.suppress(FileNotFoundError):
                path.replace(current)
