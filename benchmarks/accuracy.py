"""Accuracy: servinglab bench and vllm bench serve against the same local vLLM server and workload.

The server runs the built small model with ``--no-enable-prefix-caching`` (a repeated prompt must not
get cheaper). At concurrency 1, 4 and 16 the two clients run interleaved (vllm, servinglab, vllm,
servinglab, ...), ``REPEATS`` times each, on the reference shape scaled down (256 tokens in, 128 out,
``ignore_eos``, seed 42, 10 × concurrency prompts and at least 20). For each metric (TTFT, TPOT, ITL,
E2E medians) it prints both clients' median over the repeats, their difference, and the spread between
two runs of ``vllm bench serve`` itself, the noise floor of this machine.

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
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, str(REPO / "benchmarks" / "vllm_bench_serve.py"), "--backend", "openai-chat",
            "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", "tiny", "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
            "--num-prompts", str(n), "--max-concurrency", str(c), "--ignore-eos", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", folder,
            "--result-filename", "r.json", "--disable-tqdm",
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads((Path(folder) / "r.json").read_text())


def servinglab_run(url: str, tokenizer: str, c: int, n: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "r.json"
        command = [
            sys.executable, "-m", "servinglab.cli", "bench", "--base-url", url, "--model", "tiny", "--tokenizer",
            tokenizer, "--input-len", "256", "--output-len", "128", "--num-prompts", str(n), "--max-concurrency",
            str(c), "--ignore-eos", "--seed", str(seed), "--out", str(out),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


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
            for metric in METRICS:
                key = f"median_{metric}_ms"
                theirs = [r[key] for r in runs["vllm"]]
                ours = [r[key] for r in runs["servinglab"]]
                t, o = statistics.median(theirs), statistics.median(ours)
                spread = (max(theirs) - min(theirs)) / t * 100 if t else float("nan")
                table.append((c, metric, t, o, (o - t) / t * 100 if t else float("nan"), spread))
    finally:
        study_run.platform.teardown()

    print(f"accuracy against vllm bench serve, {args.repeats} interleaved repeats, on {os.cpu_count()} cores")
    print(f"  {'c':>3} {'metric':<6} {'vllm bench':>11} {'servinglab':>11} {'difference':>11} {'vllm run-to-run':>16}")
    for c, metric, t, o, diff, spread in table:
        print(f"  {c:>3} {metric:<6} {t:>9.2f}ms {o:>9.2f}ms {diff:>+10.1f}% {spread:>15.1f}%")


if __name__ == "__main__":
    main()
