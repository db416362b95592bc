"""The local platform against a real vLLM server (vLLM's CPU build serving the built model)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from conftest import PARAMS, engine_processes, run_cli

from servinglab import api
from servinglab.experiments import smoke
from servinglab.config import load_study
from servinglab.errors import ServerStartError, UnsupportedLayerError
from servinglab.platforms.processes import Registry, ServerEntry




@pytest.mark.engine
def test_server_is_ready_and_measured(engine):
    d = engine.deployment
    assert d.status == "ready" and d.layer == "raw" and d.kind == "raw-vllm"
    assert d.time_to_ready_s > 0 and d.processes >= 2 and d.rss_mib > 0
    # The phases are consecutive parts of the time to ready.
    assert set(d.phases_s) >= {"engine_init_s", "api_server_up_s", "model_listed_s"}
    assert sum(d.phases_s.values()) == pytest.approx(d.time_to_ready_s, abs=1.0)
    log = open(d.log_path).read()
    assert "# servinglab:" in log and "non-default args" in log
    models = httpx.get(f"{d.base_url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


@pytest.mark.engine
def test_server_runs_in_its_own_process_group(engine):
    pid = engine.deployment.pid
    assert psutil.Process(pid).is_running()
    import os

    assert os.getpgid(pid) == pid != os.getpgrp()


@pytest.mark.engine
def test_ensure_reuses_a_ready_server_with_the_same_spec(engine):
    again = engine.platform.ensure("raw", engine.run_dir)
    assert again.reused and again.pid == engine.deployment.pid and again.base_url == engine.deployment.base_url
    entries = Registry(engine.study.cache_dir).entries(engine.study.study, "raw")
    assert [e.spec_hash for e in entries] == [engine.platform.spec_hash("raw")]


@pytest.mark.engine
def test_a_new_kernel_finds_the_server_through_the_registry(engine):
    """What a second notebook does: load the study afresh in another process and ask for the endpoint."""
    code = (
        "from servinglab import api; sr = api.open_study('params/local.yaml'); "
        "print(sr.platform.endpoint('raw').base_url)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PARAMS.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == engine.deployment.base_url


@pytest.mark.engine
def test_status_lists_the_running_server(engine):
    done = run_cli("status", str(PARAMS / "local.yaml"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert engine.deployment.base_url in done.stdout and "ready" in done.stdout


@pytest.mark.engine
def test_smoke_checks_pass_and_are_recorded(engine):
    rows = smoke.run_smoke(
        engine.study, engine.platform.endpoint("raw"), engine.run_dir, engine.platform.engine_version()
    )
    assert {r["check"]: r["passed"] for r in rows} == {
        "models_lists_served_name": True,
        "chat_completion_200": True,
        "fingerprint_names_engine": True,
    }
    fingerprint = next(r["observed"] for r in rows if r["check"] == "fingerprint_names_engine")
    assert fingerprint.startswith(f"vllm-{engine.platform.engine_version()}-")
    recorded = [json.loads(line) for line in (engine.run_dir / "data" / "smoke.jsonl").read_text().splitlines()]
    assert recorded[-3:] == rows


@pytest.mark.engine
def test_layers_the_platform_cannot_host_are_refused_not_imitated(engine):
    for name in ("kserve", "llm-d"):
        assert engine.platform.unsupported_reason(name) == "needs platform: kubernetes"
        with pytest.raises(UnsupportedLayerError, match="needs platform: kubernetes"):
            engine.platform.ensure(name, engine.run_dir)


@pytest.mark.engine
def test_entries_of_dead_processes_are_cleaned_up(engine, tmp_path):
    registry = Registry(engine.study.cache_dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(gone.pid).create_time()
    gone.wait()
    stale = ServerEntry(
        study=engine.study.study, layer="old", spec_hash="0" * 64, pid=gone.pid, create_time=create_time,
        port=1, base_url="http://127.0.0.1:1/v1", served_name="x", log_path=str(tmp_path / "x.log"),
        command=[], started_at="then",
    )  # fmt: skip
    registry.save(stale)
    assert [e.layer for e in registry.entries(engine.study.study)] == ["raw"]
    assert not list(registry.directory.glob(f"{engine.study.study}--old--*"))


@pytest.mark.engine
def test_a_server_that_fails_to_start_leaves_nothing(private_overrides, monkeypatch):
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(private_overrides({"model": {"engine_args": {"max-model-len": "many"}}})))
    study_run = api.open_study(PARAMS / "local.yaml")
    with pytest.raises(ServerStartError, match="exited with status") as caught:
        study_run.platform.ensure("raw", study_run.run_dir)
    assert "raw.log" in str(caught.value)
    assert study_run.platform.running() == []
    assert engine_processes(owner_fragment=str(study_run.study.cache_dir)) == []


@pytest.mark.engine
def test_config_only_model_with_dummy_weights_then_restart_on_a_new_spec(private_overrides, monkeypatch):
    """A config-only directory served with --load-format dummy; a changed engine argument restarts it."""
    overrides = private_overrides({"model": {"source": {"kind": "dummy", "shape": "tiny"}}})
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(overrides))
    first_run = api.open_study(PARAMS / "local.yaml")
    try:
        first = first_run.platform.ensure("raw", first_run.run_dir)
        assert "--load-format" in first.command and first.command[first.command.index("--load-format") + 1] == "dummy"
        answer = httpx.post(
            f"{first.base_url}/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1

        second_run = api.open_study(PARAMS / "local.yaml", overrides=["model.engine_args.max-model-len=512"])
        second = second_run.platform.ensure("raw", second_run.run_dir)
        assert not second.reused and second.pid != first.pid and second.spec_hash != first.spec_hash
        assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
        assert [e.pid for e in second_run.platform.running()] == [second.pid]
    finally:
        stopped = first_run.platform.teardown()
    assert len(stopped) == 1 and "stopped" in stopped[0]
    assert engine_processes(owner_fragment=str(first_run.study.cache_dir)) == []


def test_a_local_model_directory_is_served_as_it_is(tmp_path, monkeypatch):
    """kind: local serves any Hugging Face directory by path, with real weights (no dummy load format)."""
    from servinglab import modelbuild
    from servinglab.platforms.local import LocalPlatform

    directory = modelbuild.ensure_model(tmp_path / "cache", "tiny", seed=1)
    monkeypatch.delenv("SERVINGLAB_OVERRIDES")
    study = load_study(
        PARAMS / "ci.yaml", [f"model.source={{kind: local, path: {directory}}}", f"paths.cache_dir={tmp_path}"]
    )
    command = LocalPlatform(study).command("raw", 8000)
    assert command[command.index("--model") + 1] == str(directory)
    assert "--load-format" not in command
    assert command[-6:] == ["--dtype", "bfloat16", "--max-model-len", "1024", "--gpu-memory-utilization", "0.1"]
