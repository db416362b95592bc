"""A small project for batch tests: a study on the local platform and notebooks that need no engine.

``servinglab run`` looks for ``notebooks/`` beside the study's ``params/`` first, so a project folder holding
these notebooks runs a real papermill batch (a real kernel per notebook, real records, real teardown) in a
few seconds. The notebooks record smoke rows carrying what they read of the study:

- ``10_first`` one record at once;
- ``20_wait`` a record every 0.2 s until ``release`` appears in the run directory (or 120 s pass);
- ``30_after`` one record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import psutil
import yaml
from conftest import PARAMS, REPO, SERVINGLAB

STUDY = "batch"

_OPEN = "from servinglab import api, records\nimport time\nstudy_run = api.open_study(params_file, run_dir, overrides)"
_RECORD = ("records.append(study_run.run_dir, records.SMOKE, [{{'layer': 'raw', 'check': '{check}', 'passed': True, "
           "'expected': 'x', 'observed': study_run.study.description, 'latency_ms': 1.0, 'at': records.utc_now()}}])")  # fmt: skip
_WAIT = ("for i in range(600):\n    if (study_run.run_dir / 'release').exists():\n        break\n    "
         + _RECORD.format(check="wait") + "\n    time.sleep(0.2)")  # fmt: skip
NOTEBOOKS = {
    "10_first": [_OPEN, _RECORD.format(check="first")],
    "20_wait": [_OPEN, _WAIT],
    "30_after": [_OPEN, _RECORD.format(check="after")],
}


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell('params_file = ""\nrun_dir = ""\noverrides = []\nbatch = False')
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters] + [nbformat.v4.new_code_cell(source) for source in cells]
    return nb


def make_project(folder: Path, description: str = "as started") -> Path:
    """Write the project; returns its study file (``params/batch.yaml``)."""
    (folder / "params").mkdir(parents=True)
    (folder / "notebooks").mkdir()
    for name, cells in NOTEBOOKS.items():
        nbformat.write(_notebook(cells), folder / "notebooks" / f"{name}.ipynb")
    study = yaml.safe_load((PARAMS / "ci.yaml").read_text())
    study |= {"study": STUDY, "description": description,
              "paths": {"runs_dir": "runs", "reports_dir": "reports", "cache_dir": "cache"}}  # fmt: skip
    path = folder / "params" / f"{STUDY}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def add_notebook(folder: Path, name: str, code: str) -> None:
    """One more notebook in the project: it opens the study, then runs ``code``."""
    nbformat.write(_notebook([_OPEN, code]), folder / "notebooks" / f"{name}.ipynb")


def cli_env() -> dict[str, str]:
    """The environment for the CLI: the study file as written, without the test session's override file."""
    env = dict(os.environ)
    env.pop("SERVINGLAB_OVERRIDES", None)
    return env


def start_batch(study_file: Path, *args: str) -> subprocess.Popen:
    """``servinglab run`` in a process group of its own, as a terminal's foreground job is."""
    return subprocess.Popen(
        [*SERVINGLAB, "run", str(study_file), *args], cwd=REPO, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVINGLAB, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def latest_run(study_file: Path) -> Path:
    return (study_file.parent.parent / "runs" / STUDY / "latest").resolve()


def context(study_file: Path) -> dict:
    return json.loads((latest_run(study_file) / "run.json").read_text())


def smoke_checks(run_dir: Path) -> list[dict]:
    path = run_dir / "data" / "smoke.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition, batch: subprocess.Popen, timeout_s: float = 120, what: str = "") -> None:
    """Poll ``condition`` until true; fails when the batch ended first or the time is up."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if batch.poll() is not None:
            raise AssertionError(f"the batch ended before {what}: {batch.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def notebook_started(study_file: Path, name: str) -> bool:
    try:
        return any(n["name"] == name for n in context(study_file).get("notebooks", []))
    except (OSError, ValueError):
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (the kernel and what it started), as seen now."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def kill_group(batch: subprocess.Popen) -> None:
    """Clean up after a failed test: the batch's group, and each kernel's (a session of its own)."""
    for proc in descendants(batch.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(batch.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    batch.communicate(timeout=30)
