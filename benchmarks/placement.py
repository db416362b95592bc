"""Where the local engine, its API server and the client run on a small CPU machine, and what each placement
does to the numbers: the client's mean TTFT beside the server's own (its /metrics histogram's mean), the
client's event-loop lag, streams delivered in one burst, TPOT, throughput and the stage's verdict.

For each option a vLLM CPU server is started by hand on the study's model (``params/local.yaml``, built if
needed), its processes placed as the option says, and ``servinglab bench`` (with ``--workers 1``) sends
the default sweep's stages c=1, 2, 4 (256 tokens in / 128 out, 60 prompts, ignore_eos) from the cores
the option gives the client. The options:

- ``none``: everything where the kernel puts it (today's default before placement);
- ``bind``: the API server and the client on the first core, EngineCore, the Worker and its OpenMP
  threads (``VLLM_CPU_OMP_THREADS_BIND``) on the others: what ``platform.cpu_placement: auto`` does;
- ``bind_nice``: as bind, the engine's processes at nice 10;
- ``bind_passive``: as bind, OpenMP threads told to sleep when idle (``OMP_WAIT_POLICY=PASSIVE``);
- ``api_with_engine``: the API server on the engine's cores, the client alone on the first;
- ``bind_nice_client``: as bind, the client at nice 5;
- ``client_with_engine``: as bind, but the client on the engine's cores.

Run: ``.venv/bin/python benchmarks/placement.py [OPTION ...]`` (about 2 minutes an option on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["none", "bind", "bind_nice", "bind_passive", "api_with_engine", "bind_nice_client", "client_with_engine"]
CONCURRENCY = (1, 2, 4)


def model_and_args() -> tuple[str, list[str]]:
    from servinglab import api
    from servinglab.config import engine_argv

    study_run = api.open_study(REPO / "params" / "local.yaml")
    directory, extra = study_run.platform.model_dir()
    return str(directory), engine_argv(study_run.study.model.engine_args) + extra


def start(option: str, model: str, args: list[str], port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="1")
    cores = sorted(os.sched_getaffinity(0))
    if option != "none":
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores[1:])
    if option == "bind_passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "m", "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"{option}: the server ended; see {log}")
        time.sleep(0.5)


def place(option: str, server: subprocess.Popen) -> tuple[int, ...] | None:
    """Put the server's processes where the option says; the client's cores (None: anywhere)."""
    from servinglab.platforms import placement
    from servinglab.platforms.processes import group_members

    if option == "none":
        return None
    cores = sorted(os.sched_getaffinity(0))
    first, rest = (cores[0],), tuple(cores[1:])
    for pid in group_members(server.pid):
        api_server = pid == server.pid
        placement.pin(pid, rest if option == "api_with_engine" or not api_server else first)
        if option == "bind_nice" and not api_server:
            for tid in placement.threads_of(pid):
                os.setpriority(os.PRIO_PROCESS, tid, 10)
    return rest if option == "client_with_engine" else first


def stage(option: str, port: int, model: str, c: int, cpus: tuple[int, ...] | None, folder: Path) -> dict:
    out = folder / f"{option}-c{c}.json"
    command = [sys.executable, "-m", "servinglab.cli", "bench", "--base-url", f"http://127.0.0.1:{port}", "--model",
               "m", "--tokenizer", model, "--input-len", "256", "--output-len", "128", "--num-prompts", "60",
               "--max-concurrency", str(c), "--ignore-eos", "--seed", "42", "--workers", "1", "--out", str(out)]  # fmt: skip
    prefix = ["taskset", "-c", ",".join(str(x) for x in cpus)] if cpus else []
    if option == "bind_nice_client":
        prefix += ["nice", "-n", "5"]
    subprocess.run(prefix + command, check=True, capture_output=True, text=True)
    r = json.loads(out.read_text())
    server = r.get("server") or {}
    return {"option": option, "c": c, "client_mean_ttft_ms": round(r["mean_ttft_ms"], 1),
            "server_mean_ttft_ms": round(server.get("mean_ttft_ms") or float("nan"), 1),
            "median_tpot_ms": round(r["median_tpot_ms"], 2), "p99_loop_lag_ms": round(r["p99_loop_lag_ms"], 1),
            "burst_deliveries": r["burst_deliveries"], "request_throughput": round(r["request_throughput"], 2),
            "verdict": (r.get("validity") or {}).get("verdict")}  # fmt: skip


def main(options: list[str]) -> None:
    from servinglab.platforms.local import free_port

    model, args = model_and_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="servinglab-placement-") as tmp:
        folder = Path(tmp)
        for option in options:
            port = free_port("127.0.0.1")
            server = start(option, model, args, port, folder / f"{option}.log")
            try:
                cpus = place(option, server)
                stage(option, port, model, 1, cpus, folder)  # a first stage warms the engine's caches
                rows += [stage(option, port, model, c, cpus, folder) for c in CONCURRENCY]
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(60)
            for row in rows[-len(CONCURRENCY) :]:
                print(json.dumps(row), flush=True)
    print("\n| option | c | client TTFT mean | server TTFT mean | gap | TPOT p50 | loop lag p99 | bursts | req/s | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = r["client_mean_ttft_ms"] - r["server_mean_ttft_ms"]
        within = gap <= max(5.0, 0.25 * r["server_mean_ttft_ms"])
        print(f"| {r['option']} | {r['c']} | {r['client_mean_ttft_ms']} ms | {r['server_mean_ttft_ms']} ms | "
              f"{gap:+.1f} ms ({'within' if within else 'outside'} the target) | {r['median_tpot_ms']} ms | "
              f"{r['p99_loop_lag_ms']} ms | {r['burst_deliveries']}/60 | {r['request_throughput']} | {r['verdict']} |")  # fmt: skip


if __name__ == "__main__":
    unknown = [o for o in sys.argv[1:] if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    main(sys.argv[1:] or OPTIONS)
