"""How long the suite takes on this machine, next to the floor set by starting vLLM by hand.

Prints, for the shrunk study (params/ci.yaml) in a private cache:

1. vLLM started by hand (``python -m vllm.entrypoints.openai.api_server`` polled until ``/v1/models``
   lists the model): the engine's own start-up, which no serving layer can beat;
2. the same engine through servinglab's local platform (``ensure``): model build or cache look-up,
   registry, readiness polling and phase split;
3. a second ``ensure`` (the reuse a later notebook gets);
4. the whole batch (``servinglab run params/ci.yaml``), per notebook and in total;
5. ``servinglab check`` on a study with a misspelt key (the time to reject bad input);
6. each hostile study of ``tests/hostile/study_cases.py`` (alias bombs, duplicate keys, binary, Latin-1,
   nested brackets, a 50 MB file, .inf, negative seeds, int32 overflow, engine arguments that smuggle
   flags): the time until the study loader refuses it (target: 0.5 s), and the one line it says; then
   ``servinglab check`` on a few of them, interpreter start included.

Run: ``.venv/bin/python benchmarks/startup.py``. It starts vLLM four times (a few minutes on 2 cores).
``benchmarks/startup.py --hostile`` prints part 6 alone, in seconds, starting nothing.
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

REFUSAL_TARGET_S = 0.5


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


def hostile_refusals(workspace: Path) -> list[tuple[str, str]]:
    """Each hostile study: milliseconds until ``load_study`` refuses it, and the message (or ACCEPTED)."""
    sys.path.insert(0, str(REPO / "tests" / "hostile"))
    from study_cases import cases

    from servinglab.config import OVERRIDES_ENV, load_study
    from servinglab.errors import ParamsError

    folder = workspace / "hostile"
    # The cases bring their own override files; the benchmark's private one would merge over every case.
    saved = os.environ.pop(OVERRIDES_ENV, None)
    rows = []
    try:
        for case in cases():
            study, override = case.write(folder)
            t0 = time.monotonic()
            try:
                load_study(study, case.sets, override_file=override)
                said = "ACCEPTED"
            except ParamsError as exc:
                said = str(exc).replace(str(folder), "<tmp>")
            elapsed_s = time.monotonic() - t0
            over = "" if elapsed_s <= REFUSAL_TARGET_S else " OVER TARGET"
            rows.append((case.name, f"{elapsed_s * 1000:6.0f} ms{over}  {said}"))
            study.unlink()  # the 50 MB one need not stay
        # The whole command is mostly the interpreter and the imports: a valid study shows that floor.
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "servinglab.cli", "check", str(REPO / "params" / "ci.yaml")],
                              capture_output=True, text=True, env=dict(os.environ, **{OVERRIDES_ENV: ""}))  # fmt: skip
        rows.append(("servinglab check, params/ci.yaml (valid; whole command)",
                     f"{time.monotonic() - t0:6.2f} s  exit {done.returncode}"))  # fmt: skip
        for name in ("alias bomb in a string field", "50 MB file", "engine-arg list with --host"):
            case = next(c for c in cases() if c.name == name)
            study, _ = case.write(folder)
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "servinglab.cli", "check", str(study), *(f"--set={s}" for s in case.sets)],
                capture_output=True, text=True, env=dict(os.environ, **{OVERRIDES_ENV: ""}),
            )  # fmt: skip
            rows.append((f"servinglab check, {name} (whole command)",
                         f"{time.monotonic() - t0:6.2f} s  exit {done.returncode}"))  # fmt: skip
            study.unlink()
    finally:
        if saved is not None:
            os.environ[OVERRIDES_ENV] = saved
    return rows


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(title)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> None:
    workspace = Path(tempfile.mkdtemp(prefix="servinglab-bench-"))
    if "--hostile" in sys.argv[1:]:
        print_rows(f"servinglab: time to refuse each hostile study on {os.cpu_count()} cores "
                   f"(target {REFUSAL_TARGET_S} s)", hostile_refusals(workspace))  # fmt: skip
        return
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

    print_rows(f"servinglab start-up and batch times on {os.cpu_count()} cores ({workspace})", rows)
    print_rows(f"time to refuse each hostile study (target {REFUSAL_TARGET_S} s)", hostile_refusals(workspace))


if __name__ == "__main__":
    main()
