"""Accuracy: servinglab bench and vllm bench serve against the same local vLLM server and workload.

The server runs the built small model with ``--no-enable-prefix-caching`` (a repeated prompt must not
get cheaper). At concurrency 1, 4 and 16 the two clients run interleaved (vllm, servinglab, vllm,
servinglab, ...), ``REPEATS`` times each, on the reference shape scaled down (256 tokens in, 128 out,
``ignore_eos``, seed 42, 10 × concurrency prompts and at least 20). For each metric (TTFT, TPOT, ITL,
E2E medians, computed here from each client's per-request timings with one definition) it prints both
clients' median over the repeats, their difference, and the spread between two runs of ``vllm bench serve``
itself, the noise floor of this machine; once over all requests and once over the requests that were not
delivered in one burst (the server sometimes holds a whole stream back on a busy 2-core machine; the
count per run and client is printed, see benchmarks/README.md).

Run: ``.venv/bin/python benchmarks/accuracy.py`` (about five minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_overrides  # noqa: E402

REPEATS = 3
LEVELS = (1, 4, 16)
METRICS = ("ttft", "tpot", "itl", "e2el")


def vllm_run(url: str, tokenizer: str, c: int, n: int, seed: int) -> dict:
    """One ``vllm bench serve`` run: its own summary and its per-request timings."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, str(REPO / "benchmarks" / "vllm_bench_serve.py"), "--backend", "openai-chat",
            "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", "tiny", "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
            "--num-prompts", str(n), "--max-concurrency", str(c), "--ignore-eos", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--save-detailed", "--result-dir", folder,
            "--result-filename", "r.json", "--disable-tqdm",
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads((Path(folder) / "r.json").read_text())
    requests = [
        {"ttft": ttft * 1000, "e2el": latency * 1000, "gaps": [g * 1000 for g in itls], "tokens": tokens}
        for ttft, latency, itls, tokens, error in zip(
            result["ttfts"], result["latencies"], result["itls"], result["output_lens"], result["errors"]
        )
        if not error
    ]
    return {"summary": result, "requests": requests}


def servinglab_run(url: str, tokenizer: str, c: int, n: int, seed: int) -> dict:
    """One ``servinglab bench`` run: its own summary and its per-request timings."""
    with tempfile.TemporaryDirectory() as folder:
        out, records = Path(folder) / "r.json", Path(folder) / "r.jsonl"
        command = [
            sys.executable, "-m", "servinglab.cli", "bench", "--base-url", url, "--model", "tiny", "--tokenizer",
            tokenizer, "--input-len", "256", "--output-len", "128", "--num-prompts", str(n), "--max-concurrency",
            str(c), "--ignore-eos", "--seed", str(seed), "--out", str(out), "--records", str(records),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        summary = json.loads(out.read_text())
        rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    requests = [
        {"ttft": r["ttft_ms"], "e2el": r["e2el_ms"], "tokens": r["output_tokens"],
         "gaps": [b - a for a, b in zip(r["token_ms"], r["token_ms"][1:])]}  # fmt: skip
        for r in rows
        if r.get("ok") and not r.get("warmup")
    ]
    return {"summary": summary, "requests": requests}


def burst(request: dict) -> bool:
    """Delivered in one burst: the first token reached the client after half the request's time."""
    return request["ttft"] > 0.5 * request["e2el"]


def medians(requests: list[dict]) -> dict[str, float]:
    """Median TTFT, TPOT, pooled ITL and E2E over requests, by vllm bench serve's definitions."""
    if not requests:
        return {m: float("nan") for m in METRICS}
    tpots = [(r["e2el"] - r["ttft"]) / (r["tokens"] - 1) for r in requests if r["tokens"] and r["tokens"] > 1]
    gaps = [g for r in requests for g in r["gaps"]]
    return {
        "ttft": statistics.median(r["ttft"] for r in requests),
        "tpot": statistics.median(tpots) if tpots else float("nan"),
        "itl": statistics.median(gaps) if gaps else float("nan"),
        "e2el": statistics.median(r["e2el"] for r in requests),
    }


def compare(runs: dict[str, list[dict]], pick) -> list[tuple[str, float, float, float, float]]:
    """Per metric: both clients' median over the repeats, their difference, vllm's run-to-run spread."""
    rows = []
    per_run = {tool: [medians([r for r in run["requests"] if pick(r)]) for run in runs[tool]] for tool in runs}
    for metric in METRICS:
        theirs = [m[metric] for m in per_run["vllm"]]
        ours = [m[metric] for m in per_run["servinglab"]]
        t, o = statistics.median(theirs), statistics.median(ours)
        spread = (max(theirs) - min(theirs)) / t * 100 if t else float("nan")
        rows.append((metric, t, o, (o - t) / t * 100 if t else float("nan"), spread))
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrency levels")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved runs of each client per level")
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="servinglab-accuracy-"))
    os.environ["SERVINGLAB_OVERRIDES"] = str(
        write_overrides(workspace, {"model": {"engine_args": {"no-enable-prefix-caching": True, "max-model-len": 2048}}})
    )
    from servinglab import api

    study_run = api.open_study(REPO / "params" / "ci.yaml")
    deployment = study_run.platform.ensure("raw", study_run.run_dir)
    url = deployment.base_url.removesuffix("/v1")
    tokenizer = str(study_run.platform.model_dir()[0])
    table = []
    try:
        for c in args.levels:
            n = max(20, 10 * c)
            runs: dict[str, list[dict]] = {"vllm": [], "servinglab": []}
            for repeat in range(args.repeats):
                seed = 42 + repeat
                runs["vllm"].append(vllm_run(url, tokenizer, c, n, seed))
                runs["servinglab"].append(servinglab_run(url, tokenizer, c, n, seed))
            bursts = {tool: [sum(map(burst, run["requests"])) for run in runs[tool]] for tool in runs}
            sizes = {tool: [len(run["requests"]) for run in runs[tool]] for tool in runs}
            table.append((c, "all requests", compare(runs, lambda r: True), bursts, sizes))
            table.append((c, "streamed requests", compare(runs, lambda r: not burst(r)), bursts, sizes))
    finally:
        study_run.platform.teardown()

    print(f"accuracy against vllm bench serve, {args.repeats} interleaved repeats, on {os.cpu_count()} cores")
    for c, subset, rows, bursts, sizes in table:
        counts = "; ".join(
            f"{tool}: " + ", ".join(f"{b}/{n}" for b, n in zip(bursts[tool], sizes[tool])) for tool in ("vllm", "servinglab")
        )
        print(f"  concurrency {c}, {subset} (delivered in one burst, per run: {counts})")
        print(f"    {'metric':<6} {'vllm bench':>11} {'servinglab':>11} {'difference':>11} {'vllm run-to-run':>16}")
        for metric, t, o, diff, spread in rows:
            print(f"    {metric:<6} {t:>9.2f}ms {o:>9.2f}ms {diff:>+10.1f}% {spread:>15.1f}%")



if __name__ == "__main__":
    main()
