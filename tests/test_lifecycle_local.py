"""Lifecycle experiments on the local platform, against the real vLLM server: an interruption in the
middle of a model update puts the layer back as the study specifies it and keeps every request measured.

(The experiments' measured path runs in the whole batch, tests/test_runner.py.)
"""

from __future__ import annotations

import _thread
import json
import sys
import threading
import time

import httpx
import pytest

from servinglab.experiments import lifecycle
from servinglab.platforms import get_platform

pytestmark = pytest.mark.engine


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _main_thread_in(function_name: str) -> bool:
    """Whether the main thread is running ``function_name`` now (anywhere on its stack)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back
    return False


def test_an_interrupted_model_update_restores_the_layer_and_keeps_its_requests(engine, tmp_path):
    study = engine.study.model_copy(deep=True)
    study.workloads.lifecycle.baseline_s = 2.0
    platform = get_platform(study)
    before = platform.endpoint("raw")
    requests_file = tmp_path / "data" / "lifecycle_requests.jsonl"
    (tmp_path / "run.json").write_text("{}")

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r.get("phase") == "during" for r in _lines(requests_file)):
            time.sleep(0.05)
        # The old server is stopped now and the new one is starting: interrupt in the middle of the change.
        time.sleep(3)
        # Python drops a KeyboardInterrupt raised inside a finalizer, as a user's first Ctrl-C can be lost:
        # press again, as they would, while the update still runs and nothing has begun to settle it.
        while time.monotonic() < deadline and _main_thread_in("run_lifecycle") and not _main_thread_in("settle"):
            _thread.interrupt_main()
            time.sleep(2)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        lifecycle.run_lifecycle(study, platform, tmp_path, ["raw"], ["model_update"])

    [outcome] = _lines(tmp_path / "data" / "lifecycle.jsonl")
    assert outcome["experiment"] == "model_update" and outcome["status"] == "interrupted"
    assert outcome["settled"] == "restored" and "KeyboardInterrupt" in outcome["reason"]
    # Every request sent before the interruption is on disk, the baseline ones answered by the old spec.
    sent = _lines(requests_file)
    baseline = [r for r in sent if r["phase"] == "before"]
    assert len(baseline) >= 2 and all(r["ok"] and r["model"] == "tiny" for r in baseline)
    # One server, the study's own spec, on the address it had: the half-started new revision is gone.
    entries = platform.running()
    assert len(entries) == 1 and entries[0].spec_hash == platform.spec_hash("raw")
    after = platform.endpoint("raw")
    assert after.base_url == before.base_url
    answer = httpx.post(f"{after.base_url}/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["model"] == "tiny"
    # The shared engine was restarted: later tests read its new process from the session's record.
    engine.deployment = engine.platform.ensure("raw", engine.run_dir)
