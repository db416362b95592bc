"""The batch on params/ci.yaml: the whole suite, a failing stage, an interrupted run, and secrets."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PARAMS, REPO, SERVINGLAB, engine_processes, run_cli

from servinglab import records

pytestmark = pytest.mark.engine

KEY_VARIABLE = "SERVINGLAB_TEST_API_KEY"


def every_file(*folders: Path):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def test_whole_suite_with_an_api_key_that_appears_nowhere(private_overrides, tmp_path):
    key = "sk-planted-" + secrets.token_hex(16)
    overrides = private_overrides({"auth": {"api_key_env": KEY_VARIABLE}})
    workspace = overrides.parent
    done = run_cli(
        "run", str(PARAMS / "ci.yaml"), "--no-progress",
        env_overrides=overrides, extra_env={KEY_VARIABLE: key}, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The last line printed is the report's path.
    report = Path(done.stdout.strip().splitlines()[-1])
    assert report.is_file() and report.parent == workspace / "reports"
    run_dir = (workspace / "runs" / "ci" / "latest").resolve()
    assert report.name == f"ci-{run_dir.name}.html"
    assert (workspace / "reports" / "ci.html").read_bytes() == report.read_bytes()
    assert report.name in (workspace / "reports" / "index.html").read_text()

    context = json.loads((run_dir / "run.json").read_text())
    assert context["schema_version"] == records.SCHEMA_VERSION and context["status"] == "ok" and context["ended_at"]
    assert context["git"]["sha"] and len(context["git"]["sha"]) == 40
    assert context["engine"]["system_fingerprint"].startswith("vllm-")
    assert context["hardware"]["logical_cores"] >= 1
    assert [n["name"] for n in context["notebooks"]] == ["00_preflight", "10_deploy", "20_smoke", "30_latency",
                                                          "40_lifecycle", "90_report"]  # fmt: skip
    assert all(n["status"] == "ok" for n in context["notebooks"])

    # Executed copies live in the run directory; the sources stay without outputs.
    for name in ("00_preflight", "10_deploy", "20_smoke", "30_latency", "40_lifecycle", "90_report"):
        executed = json.loads((run_dir / "notebooks" / f"{name}.ipynb").read_text())
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
        source = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
        assert not any(c.get("outputs") for c in source["cells"] if c["cell_type"] == "code")

    smoke = [json.loads(line) for line in (run_dir / "data" / "smoke.jsonl").read_text().splitlines()]
    assert {r["check"] for r in smoke if r["passed"]} == {
        "models_lists_served_name", "chat_completion_200", "fingerprint_names_engine", "api_key_enforced"
    }  # fmt: skip
    deployments = [json.loads(line) for line in (run_dir / "data" / "deployments.jsonl").read_text().splitlines()]
    assert {d["layer"]: d["status"] for d in deployments} == {"raw": "ready", "kserve": "unsupported", "llm-d": "unsupported"}

    stages = [json.loads(line) for line in (run_dir / "data" / "latency_stages.jsonl").read_text().splitlines()]
    assert [(s["layer"], s["stage"]) for s in stages] == [("raw", "c=1"), ("raw", "c=4"), ("raw", "rate=10")]
    assert all(s["summary"]["completed"] >= 6 and s["summary"]["failed"] == 0 for s in stages)
    requests = (run_dir / "data" / "latency_requests.jsonl").read_text().splitlines()
    assert len(requests) == sum(s["summary"]["completed"] for s in stages)
    assert "c=4:" in report.read_text()  # the TTFT row is measured

    # Lifecycle: what the local platform can do is measured on the real engine; the rest says why not.
    outcomes = {(r["layer"], r["experiment"]): r for r in
                map(json.loads, (run_dir / "data" / "lifecycle.jsonl").read_text().splitlines())}  # fmt: skip
    measured = {key for key, r in outcomes.items() if r["status"] == "measured"}
    assert measured == {("raw", "time_to_ready"), ("raw", "model_update"), ("raw", "scale_to_zero")}
    assert all(r["reason"] for key, r in outcomes.items() if key not in measured)
    assert outcomes[("kserve", "canary")]["reason"] == "needs platform: kubernetes"
    assert outcomes[("kserve", "canary")]["refused_by"] == "platform" and outcomes[("raw", "canary")]["refused_by"] == "layer"
    ready = outcomes[("raw", "time_to_ready")]["measurements"]
    assert ready["time_to_ready_s"] > 1 and sum(ready["phases_s"].values()) == pytest.approx(ready["time_to_ready_s"], abs=1)
    update = outcomes[("raw", "model_update")]["measurements"]
    # A restart is an outage: the new revision answers under its own name only after it, and nothing in between.
    assert update["answered_as_after"] == ["tiny:update"] and update["change_to_served_s"] >= update["change_to_ready_s"] - 1
    assert update["longest_gap_s"] > 1 and update["before"]["failed"] == 0
    cold = outcomes[("raw", "scale_to_zero")]["measurements"]
    assert cold["cold_start_s"] > 1 and cold["cold_start_s"] * 1000 > 10 * cold["warm_ttft_ms_p50"]

    # Torn down at the end of the batch.
    assert engine_processes(owner_fragment=str(workspace / "cache")) == []
    assert not list((workspace / "cache" / "servers").glob("*.json"))

    # The key is in no notebook, log, data file, report, registry entry or console output.
    leaks = [str(p) for p in every_file(workspace) if key.encode() in p.read_bytes()]
    assert leaks == []
    assert key not in done.stdout and key not in done.stderr

    # Re-rendering from the run directory alone gives the same bytes.
    published = report.read_bytes()
    again = run_cli("report", str(run_dir), "--out", str(report.parent), env_overrides=overrides, timeout=120)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == report and report.read_bytes() == published


def test_a_failing_notebook_stops_the_batch_and_teardown_still_runs(private_overrides):
    overrides = private_overrides({"model": {"engine_args": {"max-model-len": "many"}}})
    done = run_cli("run", str(PARAMS / "ci.yaml"), "--no-progress", env_overrides=overrides, timeout=900)
    assert done.returncode == 1
    run_dir = (overrides.parent / "runs" / "ci" / "latest").resolve()
    executed = run_dir / "notebooks" / "10_deploy.ipynb"
    assert f"executed notebook with the traceback: {executed}" in done.stdout
    assert executed.is_file() and not (run_dir / "notebooks" / "20_smoke.ipynb").exists()
    context = json.loads((run_dir / "run.json").read_text())
    assert context["status"] == "failed"
    assert [(n["name"], n["status"]) for n in context["notebooks"]] == [("00_preflight", "ok"), ("10_deploy", "failed")]
    # What was measured before the failure is kept.
    assert (run_dir / "data" / "preflight.jsonl").read_text().strip()
    failed = [json.loads(l) for l in (run_dir / "data" / "deployments.jsonl").read_text().splitlines()]
    assert [d["status"] for d in failed if d["layer"] == "raw"] == ["failed"]
    assert engine_processes(owner_fragment=str(overrides.parent / "cache")) == []


def test_ctrl_c_during_the_batch_leaves_no_engine_process(private_overrides):
    overrides = private_overrides()
    cache = overrides.parent / "cache"
    env = dict(os.environ, SERVINGLAB_OVERRIDES=str(overrides))
    batch = subprocess.Popen(
        [*SERVINGLAB, "run", str(PARAMS / "ci.yaml"), "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job is
    )  # fmt: skip
    try:
        # Wait (bounded) until the engine is starting, then press Ctrl-C: SIGINT to the job's group.
        deadline = time.monotonic() + 600
        while not engine_processes(owner_fragment=str(cache)):
            assert batch.poll() is None and time.monotonic() < deadline, "the engine never started"
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(batch.pid, signal.SIGINT)
        # Impatient, a second Ctrl-C while the kernel stops and teardown runs: teardown still goes to its end.
        time.sleep(2)
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGINT)
        output, _ = batch.communicate(timeout=300)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == 130, output[-3000:]
    assert "interrupted" in output
    assert engine_processes(owner_fragment=str(cache)) == []
    run_dir = (overrides.parent / "runs" / "ci" / "latest").resolve()
    context = json.loads((run_dir / "run.json").read_text())
    assert context["status"] == "interrupted"
    assert [(n["name"], n["status"]) for n in context["notebooks"]][-1] == ("10_deploy", "interrupted")
    assert (run_dir / "data" / "preflight.jsonl").read_text().strip()  # measured before the interrupt
    assert not list((cache / "servers").glob("*.json"))


def test_only_reruns_one_stage_into_an_existing_run(private_overrides, monkeypatch):
    from servinglab import api

    overrides = private_overrides()
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(overrides))
    run_dir = api.open_study(PARAMS / "ci.yaml").run_dir
    done = run_cli("run", str(PARAMS / "ci.yaml"), "--only", "00_preflight", "--run-dir", str(run_dir),
                   "--no-progress", env_overrides=overrides, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (run_dir / "notebooks" / "00_preflight.ipynb").is_file()
    assert (run_dir / "data" / "preflight.jsonl").read_text().strip()
    context = json.loads((run_dir / "run.json").read_text())
    assert [(n["name"], n["status"]) for n in context["notebooks"]] == [("00_preflight", "ok")]
    # The stage went into that run; no new run was made (beside the runs sits the study's lock, released).
    study_dir = overrides.parent / "runs" / "ci"
    assert [p for p in study_dir.iterdir() if p.is_dir() and not p.is_symlink()] == [run_dir]
    assert (study_dir / ".lock").read_text() == ""
    assert [(n["name"], n["params_segment"]) for n in context["notebooks"]] == [("00_preflight", 1)]

    nowhere = run_cli("run", str(PARAMS / "ci.yaml"), "--only", "00_preflight", "--run-dir", "nowhere",
                      env_overrides=overrides, timeout=120)  # fmt: skip
    assert nowhere.returncode == 2 and "nowhere" in nowhere.stderr
    missing = run_cli("run", str(PARAMS / "ci.yaml"), "--only", "00_preflight", env_overrides=overrides, timeout=120)
    assert missing.returncode == 2 and "give --run-dir" in missing.stderr
    unknown = run_cli("run", str(PARAMS / "ci.yaml"), "--only", "30_nothing", env_overrides=overrides, timeout=120)
    assert unknown.returncode == 2 and "--only 30_nothing: unknown notebook" in unknown.stderr
