"""Does the client keep up with a GPU server? ``servinglab bench`` (client processes by the ``auto`` rule)
beside ``vllm bench serve`` against one running vLLM server, at high concurrency, interleaved, with the
server's own view of each run (its ``/metrics`` before and after: mean TTFT and mean ITL from the
histograms' sums and counts).

Targets, per point: the servinglab client's p99 event-loop lag ≤ 5 ms, and its mean TPOT within 3 % of the
server's mean ITL (what the engine took per token; the client's ITL also carries the API server's packing
of several tokens into a chunk, shown as tokens per chunk).

Run against a server that is up (256 tokens in / 128 out, ignore_eos, prefix caching off):

    python benchmarks/gpu_client.py --base-url http://127.0.0.1:8000 --model qwen2.5-0.5b \\
        --tokenizer MODEL_DIR --out benchmarks/results/gpu_client.json

The figures are printed as a table and written as JSON (small: summaries only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
INPUT_LEN, OUTPUT_LEN = 256, 128


def scrape(base_url: str) -> dict:
    from servinglab.measure import server_metrics

    return server_metrics.parse(httpx.get(f"{base_url}/metrics", timeout=10).text)


def server_view(before: dict, after: dict) -> dict:
    from servinglab.measure import server_metrics

    found = server_metrics.delta(before, after)
    return {k: found.get(k) for k in ("mean_ttft_ms", "mean_itl_ms", "mean_e2el_ms", "ttft_count")}


def vllm_run(args: argparse.Namespace, c: int, n: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, str(REPO / "benchmarks" / "vllm_bench_serve.py"), "--backend", "openai-chat",
            "--base-url", args.base_url, "--endpoint", "/v1/chat/completions", "--model", args.model,
            "--tokenizer", args.tokenizer, "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(n), "--max-concurrency", str(c),
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result",
            "--result-dir", folder, "--result-filename", "r.json", "--disable-tqdm",
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        r = json.loads((Path(folder) / "r.json").read_text())
    return {k: r.get(k) for k in ("completed", "failed", "request_throughput", "median_ttft_ms", "mean_ttft_ms",
                                  "median_tpot_ms", "mean_tpot_ms", "median_itl_ms", "mean_itl_ms", "median_e2el_ms")}


def servinglab_run(args: argparse.Namespace, c: int, n: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "r.json"
        command = [
            sys.executable, "-m", "servinglab.cli", "bench", "--base-url", args.base_url, "--model", args.model,
            "--tokenizer", args.tokenizer, "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
            "--num-prompts", str(n), "--max-concurrency", str(c), "--ignore-eos", "--seed", str(seed),
            "--workers", args.workers, "--out", str(out),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        r = json.loads(out.read_text())
    keys = ("completed", "failed", "request_throughput", "median_ttft_ms", "mean_ttft_ms", "median_tpot_ms",
            "mean_tpot_ms", "median_itl_ms", "mean_itl_ms", "median_e2el_ms", "p99_loop_lag_ms",
            "mean_tokens_per_chunk", "p99_tokens_per_chunk", "client_workers", "client_workers_rule")  # fmt: skip
    return {k: r.get(k) for k in keys} | {"validity": (r.get("validity") or {}).get("verdict")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-concurrency", type=int, default=5)
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for c in args.concurrency:
            n = max(200, args.prompts_per_concurrency * c)
            for tool, run in (("vllm bench serve", vllm_run), ("servinglab bench", servinglab_run)):
                before = scrape(args.base_url)
                started = time.time()
                client = run(args, c, n, 42 + round_)
                server = server_view(before, scrape(args.base_url))
                rows.append({"round": round_, "c": c, "num_prompts": n, "tool": tool, "client": client, "server": server,
                             "wall_s": round(time.time() - started, 1)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import vllm

        machine["vllm"] = vllm.__version__
    except ImportError:
        pass
    try:
        machine["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                        text=True).stdout.strip()  # fmt: skip
    except OSError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                                          "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(table(rows))


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Per point: both tools' medians, their mean TPOT against the server's mean ITL, the client's lag."""
    lines = ["| c | round | tool | TTFT p50 | TPOT p50 | TPOT mean | ITL mean | server ITL mean | TPOT vs server | "
             "loop lag p99 | tokens a chunk | workers | req/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c, s = r["client"], r["server"]
        gap = (100 * (c["mean_tpot_ms"] - s["mean_itl_ms"]) / s["mean_itl_ms"]
               if c.get("mean_tpot_ms") and s.get("mean_itl_ms") else None)  # fmt: skip
        lines.append(f"| {r['c']} | {r['round']} | {r['tool']} | {_f(c['median_ttft_ms'], 1)} | {_f(c['median_tpot_ms'])} | "
                     f"{_f(c['mean_tpot_ms'])} | {_f(c['mean_itl_ms'])} | {_f(s.get('mean_itl_ms'))} | "
                     f"{'–' if gap is None else f'{gap:+.1f} %'} | {_f(c.get('p99_loop_lag_ms'), 1)} | "
                     f"{_f(c.get('mean_tokens_per_chunk'))} | {c.get('client_workers') or '–'} | "
                     f"{_f(c['request_throughput'], 1)} |")  # fmt: skip
    ours = [r for r in rows if r["tool"] == "servinglab bench"]
    lag_ok = all((r["client"].get("p99_loop_lag_ms") or 0) <= 5.0 for r in ours)
    tpot_ok = all(abs(r["client"]["mean_tpot_ms"] - r["server"]["mean_itl_ms"]) <= 0.03 * r["server"]["mean_itl_ms"]
                  for r in ours if r["server"].get("mean_itl_ms"))  # fmt: skip
    spread = statistics.median([r["wall_s"] for r in rows]) if rows else 0
    lines.append(f"\nloop lag ≤ 5 ms at every point: {'yes' if lag_ok else 'no'}; mean TPOT within 3 % of the server's "
                 f"mean ITL at every point: {'yes' if tpot_ok else 'no'} (median wall time a run {spread:.0f} s)")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
