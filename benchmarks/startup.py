"""How long the suite takes on this machine, next to the floor set by starting vLLM by hand.

Prints, for the shrunk study (params/ci.yaml) in a private cache:

1. vLLM started by hand (``python -m vllm.entrypoints.openai.api_server`` polled until ``/v1/models``
   lists the model): the engine's own start-up, which no serving layer can beat;
2. the same engine through servinglab's local platform (``ensure``): model build or cache look-up,
   registry, readiness polling and phase split;
3. a second ``ensure`` (the reuse a later notebook gets);
4. the whole batch (``servinglab run params/ci.yaml``), per notebook and in total;
5. ``servinglab check`` on a study with a misspelt key (the time to reject bad input).

Run: ``.venv/bin/python benchmarks/startup.py``. It starts vLLM four times (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_overrides  # noqa: E402  (the same private-folder override the tests use)


def wait_ready(base_url: str, name: str, deadline_s: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        try:
            models = httpx.get(f"{base_url}/v1/models", timeout=2).json()
            if any(m["id"] == name for m in models.get("data", [])):
                return time.monotonic() - t0
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"vLLM at {base_url} not ready in {deadline_s} s")


def by_hand(model_dir: Path, env: dict[str, str]) -> float:
    from servinglab.platforms.local import free_port
    from servinglab.platforms.processes import stop_group

    port = free_port("127.0.0.1")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--max-model-len", "1024", "--gpu-memory-utilization", "0.1",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", "tiny")
        return time.monotonic() - t0
    finally:
        stop_group(proc.pid, 30)


def main() -> None:
    workspace = Path(tempfile.mkdtemp(prefix="servinglab-bench-"))
    overrides = write_overrides(workspace)
    os.environ["SERVINGLAB_OVERRIDES"] = str(overrides)
    from servinglab import api

    rows: list[tuple[str, str]] = []

    t0 = time.monotonic()
    study_run = api.open_study(REPO / "params" / "ci.yaml")
    model_dir, _ = study_run.platform.model_dir()
    rows.append(("build the small model (first time)", f"{time.monotonic() - t0:.1f} s"))

    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    # By hand before and after servinglab's start, so neither gets the warmer caches alone.
    rows.append(("vLLM by hand: start → /v1/models lists the model (1st)", f"{by_hand(model_dir, env):.1f} s"))

    t0 = time.monotonic()
    first = study_run.platform.ensure("raw", study_run.run_dir)
    wall = time.monotonic() - t0
    rows.append(("servinglab ensure: time to ready (recorded)", f"{first.time_to_ready_s:.1f} s"))
    rows.append(("servinglab ensure: wall time of the call", f"{wall:.1f} s"))
    rows.append(("  phases", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in first.phases_s.items())))
    t0 = time.monotonic()
    again = study_run.platform.ensure("raw", study_run.run_dir)
    assert again.reused
    rows.append(("servinglab ensure again (reuse)", f"{(time.monotonic() - t0) * 1000:.0f} ms"))
    study_run.platform.teardown()
    rows.append(("vLLM by hand: start → /v1/models lists the model (2nd)", f"{by_hand(model_dir, env):.1f} s"))

    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "servinglab.cli", "run", str(REPO / "params" / "ci.yaml"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    total = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    context = json.loads(((workspace / "runs" / "ci" / "latest") / "run.json").read_text())
    for notebook in context["notebooks"]:
        rows.append((f"servinglab run: {notebook['name']}", f"{notebook['seconds']:.1f} s"))
    rows.append(("servinglab run params/ci.yaml: total, with teardown", f"{total:.1f} s"))

    bad = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    bad["layers"]["raw"]["replicsa"] = 2
    bad_path = workspace / "typo.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        rejected = subprocess.run(
            [sys.executable, "-m", "servinglab.cli", "check", str(bad_path)], capture_output=True, text=True
        )
        times.append(time.monotonic() - t0)
        assert rejected.returncode == 2
    rows.append(("servinglab check, misspelt key: rejected in (median of 5)", f"{statistics.median(times):.2f} s"))

    width = max(len(name) for name, _ in rows)
    print(f"servinglab start-up and batch times on {os.cpu_count()} cores ({workspace})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
