"""Two runs of one study: the second is refused while the first executes, and each run reads its own frozen
study. A lock whose holder is gone (or whose pid now names another process) is taken over; a run whose
runner was killed shows as dead, not running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
import yaml
from batch_project import (
    STUDY, context, descendants, kill_group, latest_run, make_project, notebook_started, run_cli, smoke_checks, start_batch,
    wait_until,
)  # fmt: skip

from servinglab import api, records
from servinglab.errors import RunBusyError
from servinglab.runlock import Holder, RunLock, lock_path


def exited_process() -> Holder:
    """The pid and creation time of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    holder = Holder(child.pid, psutil.Process(child.pid).create_time(), Holder.this_process().host)
    child.wait()
    return holder


def write_lock(runs_dir, holder: Holder) -> None:
    path = lock_path(runs_dir, STUDY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.to_dict()))


def test_a_second_run_is_refused_naming_the_running_one_and_reads_no_edit(tmp_path):
    study_file = make_project(tmp_path / "project", description="as started")
    first = start_batch(study_file, "--no-progress")
    try:
        wait_until(lambda: notebook_started(study_file, "20_wait"), first, what="20_wait to start")
        run_dir = latest_run(study_file)

        second = run_cli("run", str(study_file), "--no-progress")
        assert second.returncode == 2, second.stdout + second.stderr
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1
        assert f"run {run_dir.name}" in message and f"pid {first.pid}" in message and "already executing" in message
        assert sorted(p.name for p in run_dir.parent.iterdir()) == sorted([".lock", "latest", run_dir.name])

        # Read-only commands take no lock; status names the batch that runs.
        status = run_cli("status", str(study_file))
        assert status.returncode == 0 and f"run {run_dir.name}\trunning" in status.stdout, status.stderr

        # An edit of the study file while the run executes changes nothing the run reads.
        edited = yaml.safe_load(study_file.read_text()) | {"description": "edited during the run"}
        study_file.write_text(yaml.safe_dump(edited, sort_keys=False))
        (run_dir / "release").touch()
        output = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            kill_group(first)
    assert first.returncode == 0, output[-3000:]
    observed = {r["check"]: r["observed"] for r in smoke_checks(run_dir)}
    assert observed["first"] == observed["after"] == "as started"
    run = context(study_file)
    assert [(n["name"], n["params_segment"]) for n in run["notebooks"]] == [("10_first", 1), ("20_wait", 1), ("30_after", 1)]
    frozen = json.loads((run_dir / "params" / "1.json").read_text())
    assert frozen["params"]["description"] == "as started" == run["params"]["description"]
    assert lock_path(study_file.parent.parent / "runs", STUDY).read_text() == ""

    # A later invocation into the same run freezes its own segment, and its notebook reads that one.
    again = run_cli("run", str(study_file), "--only", "30_after", "--run-dir", str(run_dir), "--no-progress",
                    "--set", "description=added later")  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    after = [(r["observed"], r["params_segment"]) for r in smoke_checks(run_dir) if r["check"] == "after"]
    assert after == [("as started", 1), ("added later", 2)]
    assert {r["params_segment"] for r in smoke_checks(run_dir) if r["check"] != "after"} == {1}
    assert json.loads((run_dir / "params" / "2.json").read_text())["params"]["description"] == "added later"
    assert [(n["name"], n["params_segment"]) for n in context(study_file)["notebooks"]][-1] == ("30_after", 2)


def test_a_live_lock_refuses_before_anything_starts(tmp_path, monkeypatch):
    study_file = make_project(tmp_path / "project")
    runs_dir = study_file.parent.parent / "runs"
    me = Holder.this_process()
    write_lock(runs_dir, Holder(me.pid, me.create_time, me.host, "20990101T000000Z", str(runs_dir / STUDY / "x")))
    done = run_cli("run", str(study_file), "--no-progress")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "run 20990101T000000Z" in done.stderr and f"pid {me.pid}" in done.stderr
    assert [p.name for p in (runs_dir / STUDY).iterdir()] == [".lock"]  # no run was made
    # check and status read only; they run beside the batch.
    assert run_cli("check", str(study_file)).returncode == 0
    assert run_cli("status", str(study_file)).returncode == 0
    # A notebook run on its own (its study file, not a batch's frozen segment) would use the batch's servers.
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with pytest.raises(RunBusyError, match="20990101T000000Z"):
        api.open_study(study_file)


def test_a_stale_lock_is_taken_over(tmp_path):
    study_file = make_project(tmp_path / "project")
    runs_dir = study_file.parent.parent / "runs"
    write_lock(runs_dir, exited_process())
    done = run_cli("run", str(study_file), "--no-progress", "--set", "run.notebooks=[10_first]")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert context(study_file)["status"] == "ok"


def test_a_recycled_pid_does_not_hold_the_lock(tmp_path):
    me = Holder.this_process()
    # Our pid with another creation time: the holder has gone and the system gave its pid to this process.
    write_lock(tmp_path, Holder(me.pid, me.create_time - 100, me.host, "old", "old"))
    with RunLock(tmp_path, STUDY):
        assert json.loads(lock_path(tmp_path, STUDY).read_text())["create_time"] == me.create_time
    assert lock_path(tmp_path, STUDY).read_text() == ""


def test_a_lock_held_by_a_live_process_is_not_taken(tmp_path):
    init = psutil.Process(1)
    write_lock(tmp_path, Holder(1, init.create_time(), Holder.this_process().host, "r", "d"))
    with pytest.raises(RunBusyError, match=r"run r \(d\), pid 1"):
        RunLock(tmp_path, STUDY).acquire()
    assert json.loads(lock_path(tmp_path, STUDY).read_text())["pid"] == 1


def test_status_shows_a_run_whose_runner_was_killed_as_dead(tmp_path):
    study_file = make_project(tmp_path / "project")
    runs_dir = study_file.parent.parent / "runs"
    dead = records.create_run(runs_dir, STUDY, {"params": {}, "status": "running", "runner": exited_process().to_dict()})
    live = records.create_run(runs_dir, STUDY, {"params": {}, "status": "running", "runner": Holder.this_process().to_dict()})
    done = records.create_run(runs_dir, STUDY, {"params": {}, "status": "ok", "runner": exited_process().to_dict()})
    status = run_cli("status", str(study_file))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any(line.startswith(f"run {dead.name}\tdead\t") for line in lines), status.stdout
    assert any(line.startswith(f"run {live.name}\trunning\t") for line in lines), status.stdout
    assert not any(done.name in line for line in lines)


def test_a_batch_killed_with_sigkill_shows_dead_and_its_lock_is_taken_over(tmp_path):
    study_file = make_project(tmp_path / "project")
    batch = start_batch(study_file, "--no-progress")
    try:
        wait_until(lambda: notebook_started(study_file, "20_wait"), batch, what="20_wait to start")
        run_dir = latest_run(study_file)
        kernels = descendants(batch.pid)
        os.killpg(batch.pid, signal.SIGKILL)  # no handler runs: run.json keeps saying running
        batch.communicate(timeout=30)
    finally:
        if batch.poll() is None:
            kill_group(batch)
    for kernel in kernels:  # the kernel notices its parent has gone by itself; do not wait for it here
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            os.killpg(kernel.pid, signal.SIGKILL)
    assert context(study_file)["status"] == "running"
    status = run_cli("status", str(study_file))
    assert f"run {run_dir.name}\tdead\t" in status.stdout, status.stdout + status.stderr

    again = run_cli("run", str(study_file), "--no-progress", "--set", "run.notebooks=[10_first]")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert latest_run(study_file) != run_dir and context(study_file)["status"] == "ok"
