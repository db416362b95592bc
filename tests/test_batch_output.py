"""What a batch prints when its output is not a terminal (a scheduler's log): a line per notebook, no
progress bars, no kernel-transport warnings, and a closing block with the status, the layers and the report."""

from __future__ import annotations

from batch_project import kill_group, latest_run, make_project, notebook_started, start_batch, wait_until


def test_a_batch_in_a_log_talks_in_lines_and_ends_with_its_summary(tmp_path):
    study = make_project(tmp_path)
    batch = start_batch(study)
    try:
        wait_until(lambda: notebook_started(study, "20_wait"), batch, what="20_wait")
        (latest_run(study) / "release").touch()  # 20_wait ends once its run directory holds this
        out, _ = batch.communicate(timeout=300)
    except BaseException:
        kill_group(batch)
        raise
    assert batch.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert "\r" not in out and "Executing:" not in out, "a progress bar written into a log"
    assert "without encryption" not in out
    assert [line for line in lines if line.startswith("[") and " done in " in line][:1], out[-2000:]
    rule = next(i for i, line in enumerate(lines) if set(line) == {"="} and len(line) >= 8)
    block = lines[rule:]
    assert block[1].startswith("study batch, run ") and block[1].endswith(": ok")
    assert any(line.startswith("  raw: ") for line in block)
    assert any(line.startswith("warnings: ") for line in block)
