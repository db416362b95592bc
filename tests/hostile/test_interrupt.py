"""Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group of ``servinglab run``.

The kernel papermill starts lives in a session of its own, so only the runner gets the signal; wherever
it lands (a kernel starting, a cell running), the batch must stop within 10 s, tear down, mark its run
``interrupted`` and keep what was recorded. These tests signal a real process group, not interrupt_main.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from batch_project import (
    alive, context, descendants, kill_group, latest_run, make_project, notebook_started, smoke_checks, start_batch,
    wait_until,
)  # fmt: skip

STOP_WITHIN_S = 10


def interrupt(batch, presses: int = 1) -> float:
    """Press Ctrl-C ``presses`` times, half a second apart; returns the seconds until the batch ended."""
    t0 = time.monotonic()
    for i in range(presses):
        if i:
            time.sleep(0.5)
        os.killpg(batch.pid, signal.SIGINT)
    batch.wait(timeout=60)
    return time.monotonic() - t0


def while_kernel_starts(study_file, batch):
    wait_until(lambda: notebook_started(study_file, "20_wait"), batch, what="20_wait to start")


def while_cell_runs(study_file, batch):
    wait_until(lambda: notebook_started(study_file, "20_wait") and any(
        r["check"] == "wait" for r in smoke_checks(latest_run(study_file))), batch, what="20_wait's loop")  # fmt: skip


@pytest.mark.parametrize(("moment", "presses"), [(while_kernel_starts, 1), (while_cell_runs, 1), (while_cell_runs, 2)],
                         ids=["kernel-starting", "cell-running", "pressed-twice"])  # fmt: skip
def test_ctrl_c_stops_the_batch_tears_down_and_keeps_the_records(tmp_path, moment, presses):
    study_file = make_project(tmp_path / "project")
    batch = start_batch(study_file)
    try:
        moment(study_file, batch)
        kernels = descendants(batch.pid)
        seconds = interrupt(batch, presses)
        output = batch.communicate(timeout=30)[0]
    finally:
        if batch.poll() is None:
            kill_group(batch)
    assert batch.returncode == 130, output[-3000:]
    assert seconds < STOP_WITHIN_S, output[-3000:]
    assert "interrupted: stopping the study's servers" in output

    run = context(study_file)
    assert run["status"] == "interrupted" and run["ended_at"]
    assert [(n["name"], n["status"]) for n in run["notebooks"]] == [("10_first", "ok"), ("20_wait", "interrupted")]
    # What was recorded before the signal is kept; the notebook after the interrupted one never ran.
    checks = [r["check"] for r in smoke_checks(latest_run(study_file))]
    assert checks[0] == "first" and "after" not in checks
    assert not (latest_run(study_file) / "notebooks" / "30_after.ipynb").exists()
    # No kernel (nor anything it started) outlives the batch, and the study is free to run again.
    assert alive(kernels) == []
    assert (study_file.parent.parent / "runs" / "batch" / ".lock").read_text() == ""
