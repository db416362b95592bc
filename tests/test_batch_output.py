"""What a batch prints when its output is not a terminal (a scheduler's log): a line per notebook, no
progress bars, no kernel-transport warnings, and a closing block with the status, the layers and the report."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from batch_project import add_notebook, kill_group, latest_run, make_project, notebook_started, run_cli, start_batch
from batch_project import wait_until


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


TESTS = Path(__file__).resolve().parent
# A latency sweep against a fast streaming endpoint, through the library's own sweep, and the lifecycle
# experiments of two layers the local platform cannot host (each trial is recorded, refused): real stage
# and trial records, written in the kernel, with no engine to start.
_STAGES = (f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom streaming_endpoint import StreamingEndpoint\n"
           "from servinglab.experiments import latency\nfrom servinglab.platforms import Endpoint\n"
           "with StreamingEndpoint() as served:\n"
           "    latency.run_layer_sweep(study_run.study, study_run.platform, Endpoint('raw', served.url + '/v1', 'm'),\n"
           "                            study_run.run_dir)")  # fmt: skip
_TRIALS = ("from servinglab.experiments import lifecycle\n"
           "lifecycle.run_lifecycle(study_run.study, study_run.platform, study_run.run_dir, ['kserve', 'llm-d'],\n"
           "                        ['time_to_ready', 'canary'])")  # fmt: skip


def test_a_batch_says_each_stage_and_each_trial_as_it_ends_in_order(tmp_path):
    study = make_project(tmp_path)
    for name, code in {"30_stages": _STAGES, "40_trials": _TRIALS}.items():
        add_notebook(tmp_path, name, code)
    data = yaml.safe_load(study.read_text())
    data["run"] = {"notebooks": ["30_stages", "40_trials"]}
    study.write_text(yaml.safe_dump(data, sort_keys=False))

    done = run_cli("run", str(study), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()

    def at(prefix: str) -> int:
        found = [i for i, line in enumerate(lines) if line.strip().startswith(prefix)]
        assert found, f"no line starting {prefix!r} in:\n" + "\n".join(lines[-60:])
        return found[0]

    stages = [at(f"stage raw {name}:") for name in ("c=1", "c=4", "rate=10")]
    assert stages == sorted(stages)
    assert at("[1/2] 30_stages ...") < stages[0] and stages[-1] < at("[1/2] 30_stages done")
    first = lines[stages[0]]
    assert re.search(r"\d+\.\d\d req/s, TTFT mean \d+\.\d ms, TPOT mean \d+\.\d ms, \d+ done, 0 failed; ", first), first
    # A stage that is not valid says why in a few words: its first reason, its number and the limit.
    assert re.search(r"; invalid: [a-z-]+ \(\d+ [a-z]+, limit [\d.]+\)$", first), first
    trials = [at(f"lifecycle {experiment} on {layer}, trial 1 of 1: unsupported: ")
              for layer in ("kserve", "llm-d") for experiment in ("time_to_ready", "canary")]
    assert trials == sorted(trials)
    assert at("[2/2] 40_trials ...") < trials[0] and trials[-1] < at("[2/2] 40_trials done")
    assert trials[-1] < next(i for i, line in enumerate(lines) if set(line) == {"="} and len(line) >= 8)
    # The lines stay in the run directory, beside the engine logs.
    assert "stage raw c=4:" in (latest_run(study) / "logs" / "progress.log").read_text()
