"""Client capacity: how many streamed requests and chunks per second the load generator sustains.

Against a zero-latency streaming endpoint on loopback (tests/streaming_endpoint.py, in its own process),
side by side with ``vllm bench serve`` in the same run:

1. closed loop at concurrency 64, answers of 16 and of 128 one-token chunks: requests/s and chunks/s;
2. servinglab in an open loop at 80 % of its own capacity: achieved rate and p99 schedule lag;
3. 1,000 concurrent streams held open (the endpoint waits 50 ms a token): errors and the client's memory.

Run: ``.venv/bin/python benchmarks/client_capacity.py`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CONCURRENCY = 64


def start_endpoint() -> tuple[subprocess.Popen, str]:
    from servinglab.platforms.local import free_port

    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "streaming_endpoint.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1}, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the streaming endpoint did not start")


def servinglab_stage(url: str, tokenizer: str, n: int, output_len: int, rate: float = float("inf"), concurrency: int | None = CONCURRENCY) -> dict:
    from servinglab.measure.bench import run_bench

    return run_bench(url, "m", 16, output_len, n, seed=0, tokenizer=tokenizer, request_rate=rate,
                     max_concurrency=concurrency, ignore_eos=True)  # fmt: skip


def vllm_stage(url: str, tokenizer: str, n: int, output_len: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, str(REPO / "benchmarks" / "vllm_bench_serve.py"), "--backend", "openai-chat",
            "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", "m", "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", str(output_len),
            "--num-prompts", str(n), "--max-concurrency", str(CONCURRENCY), "--ignore-eos", "--seed", "0",
            "--save-result", "--result-dir", folder, "--result-filename", "r.json", "--disable-tqdm",
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads((Path(folder) / "r.json").read_text())


def main() -> None:
    from servinglab import modelbuild

    tokenizer = str(modelbuild.ensure_model(Path(tempfile.gettempdir()) / "servinglab-bench-cache", "tiny", 0))
    endpoint, url = start_endpoint()
    rows = []
    try:
        for output_len, n in ((16, 3000), (128, 1000)):
            ours = servinglab_stage(url, tokenizer, n, output_len)
            theirs = vllm_stage(url, tokenizer, n, output_len)
            for name, r in (("servinglab bench", ours), ("vllm bench serve", theirs)):
                # One token a chunk: output tokens/s is token-bearing chunks/s.
                rows.append((f"{output_len}-token answers, c={CONCURRENCY}", name, r["request_throughput"],
                             r["output_throughput"]))  # fmt: skip
            capacity = ours["request_throughput"]
            paced = servinglab_stage(url, tokenizer, min(n, int(capacity * 5)), output_len, rate=0.8 * capacity, concurrency=None)
            rows.append((f"{output_len}-token answers, open loop at 80 % ({0.8 * capacity:.0f} req/s)", "servinglab bench",
                         paced["request_throughput"], paced["p99_schedule_lag_ms"]))  # fmt: skip

        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        from servinglab.measure.loadgen import StageSpec, Target, run_stage
        from servinglab.measure.workload import RequestSpec

        records = []
        t0 = time.monotonic()
        outcome = run_stage(Target(f"{url}/v1", "m"), [RequestSpec("slow hold", 2, 20) for _ in range(1000)],
                            StageSpec(max_concurrency=1000), records.append)  # fmt: skip
        held_s = time.monotonic() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        endpoint.terminate()
        endpoint.wait(10)

    print(f"client capacity on {os.cpu_count()} cores, zero-latency endpoint on loopback")
    print(f"  {'workload':<52} {'client':<18} {'req/s':>9} {'chunks/s or p99 lag':>20}")
    for workload, client, rps, extra in rows:
        extra_text = f"{extra:,.0f} tok chunks/s" if "open loop" not in workload else f"p99 lag {extra:.2f} ms"
        print(f"  {workload:<52} {client:<18} {rps:>9,.0f} {extra_text:>20}")
    failed = sum(1 for r in records if not r["ok"])
    print(f"  1,000 concurrent streams (20 tokens at 50 ms each): {outcome.completed} completed, {failed} failed, "
          f"{held_s:.1f} s, client peak RSS {peak_kib / 1024:.0f} MiB (before: {before_kib / 1024:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
