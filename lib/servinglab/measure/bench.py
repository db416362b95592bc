"""One latency stage against any OpenAI-compatible endpoint, and ``vllm bench serve`` results read in.

``run_bench`` is what ``servinglab bench`` runs; its result uses ``vllm bench serve --save-result``'s
key names for the metrics both tools report, so the two JSON files can be put side by side.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import records
from ..errors import ParamsError
from ..config import ConversationWorkload, checked_api_key, read_api_key_file
from ..platforms.base import MetricsTarget
from ..platforms.placement import usable_cores
from .loadgen import StageSpec, Target
from .outbound import refuse_plain_http_key
from .client import run_local, workers_for
from .client_metrics import validity
from .intervals import stage_intervals
from .server_metrics import ServerWindow
from . import sweep
from .stage import StagePlan
from .datasets import Dataset, dataset_requests
from .workload import DirectoryTokenizer, ServerTokenizer


def root_url(base_url: str) -> str:
    """``http://host:port`` from a base URL given with or without ``/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def read_api_key(env_name: str | None = None, file: str | None = None) -> str | None:
    """The key from a file or an environment variable (``OPENAI_API_KEY`` by default), one printable line;
    never printed."""
    if file:
        path = Path(file)
        if not path.is_file():
            raise ParamsError(f"--api-key-file {file}: file not found")
        return read_api_key_file(path)
    name = env_name or "OPENAI_API_KEY"
    value = os.environ.get(name)
    return checked_api_key(value, f"environment variable {name}") if value else None


def run_bench(
    base_url: str,
    model: str,
    input_len: int,
    output_len: int,
    num_prompts: int,
    seed: int = 0,
    tokenizer: str | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    num_warmups: int = 0,
    range_ratio: float = 0.0,
    api_key: str | None = None,
    slos: dict[str, float] | None = None,
    records_path: Path | None = None,
    labels: dict[str, Any] | None = None,
    prompts_file: str | None = None,
    duration_s: float | None = None,
    workers: int | str = "auto",
    say: Any = None,
    allow_plain_http_key: bool = False,
    dataset: Dataset | None = None,
    conversation: ConversationWorkload | None = None,
) -> dict[str, Any]:
    """Run one stage and return its result (``vllm bench serve`` key names plus servinglab's extras).

    Parameters mean what ``vllm bench serve``'s flags of the same name mean: ``input_len`` counts prompt
    tokens before the chat template; ``request_rate`` inf with ``max_concurrency`` is a closed loop;
    ``num_warmups`` come on top of ``num_prompts`` and are left out of every metric. ``workers``: client
    processes (a number, or ``auto``: one per 8 concurrent streams within this machine's cores); ``say``
    gets the rule that chose them. The key goes over plain http:// to another machine only with
    ``allow_plain_http_key``; no proxy from the environment is used. ``dataset`` says what to send (any of
    ``vllm bench serve``'s ``--dataset-name`` this tool knows); without it, random prompts of ``input_len``
    ± ``range_ratio``, or the ``prompts_file`` (a custom JSONL dataset). With ``conversation``, the stage is
    multi-turn sessions from the dataset's ShareGPT file (:mod:`servinglab.measure.conversation`).
    """
    root = root_url(base_url)
    refuse_plain_http_key(f"--base-url {base_url}", root, api_key, allow_plain_http_key, ParamsError,
                          "pass --allow-plain-http-key")  # fmt: skip
    if conversation is not None:
        from .conversation import bench_conversations

        return bench_conversations(root, model, (dataset.path if dataset else None) or "", conversation, output_len, seed, request_rate,
                                   burstiness, max_concurrency, ignore_eos, api_key, slos, records_path, labels,
                                   duration_s, allow_plain_http_key)  # fmt: skip
    tok = DirectoryTokenizer(tokenizer) if tokenizer else ServerTokenizer(root, model, api_key)
    if dataset is None:
        dataset = Dataset("custom", prompts_file, random_output_len=output_len) if prompts_file else Dataset(
            random_input_len=input_len, random_output_len=output_len, random_range_ratio=range_ratio)
    specs = dataset_requests(dataset, tok, num_prompts + num_warmups, seed, say)
    warmups, requests = specs[:num_warmups], specs[num_warmups:]
    target = Target(f"{root}/v1", model, api_key=api_key, ignore_eos=ignore_eos)
    spec = StageSpec(request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
                     duration_s=duration_s)  # fmt: skip
    name = f"c={max_concurrency}" if math.isinf(request_rate) and max_concurrency else f"rate={request_rate:g}"
    plan = StagePlan.make(name, requests, warmups, spec)
    writer = records.Writer(records_path, records.LATENCY_REQUESTS, {"layer": "bench", "stage": name} | (labels or {}))
    rule = workers_for(workers, spec, len(usable_cores()) or 1)
    if say is not None:
        say(f"client: {rule.text}")
    with writer:
        server = MetricsTarget("server", root, api_key, plain_http_key_allowed=allow_plain_http_key)
        with ServerWindow([server]) as window:
            merged = run_local(target, plan, writer, slos, rule.workers)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "client": "servinglab",
        "backend": "openai-chat",
        "model_id": model,
        "tokenizer_id": tokenizer or "server /tokenize",
        "base_url": root,
        "num_prompts": num_prompts,
        "num_warmups": num_warmups,
        "input_len": input_len,
        "output_len": output_len,
        "dataset_name": dataset.name,
        "dataset": {k: v for k, v in vars(dataset).items() if v is not None},
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "started_at_unix": window.fields["started_at_unix"],
        "interrupted": merged.interrupted,
        **merged.summary,
        "validity": validity(merged.summary),
        "uncertainty": stage_intervals([[r for r in merged.records if r.get("ok") and not r.get("warmup")]], seed,
                                       [merged.summary["request_throughput"]], closed_loop=math.isinf(request_rate)),
        "client_workers": rule.workers,
        "client_workers_rule": rule.text,
        "server": window.fields["server"],
    }


def run_bench_sweep(count: int, num_prompts: int, seed: int = 0, past_validity: bool = False, say: Any = None,
                    **stage: Any) -> list[dict[str, Any]]:  # fmt: skip
    """A saturation sweep (:mod:`servinglab.measure.sweep`): a synchronous stage, a throughput stage (all
    ``num_prompts`` at once), then ``count`` Poisson (``burstiness`` 1) or gamma rate stages between their
    measured rates; returns each stage's :func:`run_bench` result in order, with its part under ``sweep``.

    Parameters
    ----------
    count : int
        Rate stages after the two probes.
    num_prompts : int
        Requests per stage.
    seed : int
        The first stage's seed; stage i uses ``seed + i``, so each stage's prompts are its own.
    past_validity : bool
        Go on to higher rates after a rate stage that was not valid (by default the sweep stops there).
    say : callable, optional
        Gets one line per stage as it ends (and the client rule, as :func:`run_bench` says it).
    stage :
        Everything else :func:`run_bench` takes, except ``request_rate`` and ``max_concurrency``, which the
        sweep sets.
    """
    # (part, rate, concurrency): one request at a time, then every request at once.
    planned = [(sweep.part_of(sweep.SYNCHRONOUS), math.inf, 1),
               (sweep.part_of(sweep.THROUGHPUT), math.inf, num_prompts)]  # fmt: skip
    results: list[dict[str, Any]] = []
    for part, rate, concurrency in planned:
        results.append(_sweep_stage(results, part, rate, concurrency, num_prompts, seed, say, stage))
    found = sweep.rate_range(results[0], results)
    if found is None:
        if say is not None:
            say("sweep: " + sweep.no_range_text(results[0], results[1]))
        return results
    low, high, top = found
    for k, rate in enumerate(sweep.sweep_rates(low, high, count), start=1):
        part = sweep.part_of(sweep.RATE, index=k, count=count, between_req_s=[round(low, 6), round(high, 6)],
                             between_stages=[results[0]["stage"], top])  # fmt: skip
        result = _sweep_stage(results, part, rate, None, num_prompts, seed, say, stage)
        results.append(result)
        if not sweep.is_valid(result) and not past_validity:
            result["stopped_sweep"] = True  # nothing higher is measured: it would only be less valid
            if say is not None:
                say("sweep: stops here: the stage was not valid, and a higher rate would only be less valid")
            break
    return results


def _sweep_stage(done: list[dict[str, Any]], part: dict[str, Any], rate: float, concurrency: int | None,
                 num_prompts: int, seed: int, say: Any, stage: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One stage of a bench sweep, named as the study's sweep names it, with its line said as it ends."""
    name = {sweep.SYNCHRONOUS: "sweep-sync", sweep.THROUGHPUT: "sweep-throughput"}.get(
        part["part"], f"sweep-rate-{part.get('index')}-of-{part.get('count')}")
    labels = (stage.get("labels") or {}) | {"stage": name}
    result = run_bench(num_prompts=num_prompts, seed=seed + len(done), request_rate=rate, max_concurrency=concurrency,
                       say=say, **(stage | {"labels": labels}))  # fmt: skip
    result = {"stage": name, "sweep": part} | result
    if say is not None:
        requested = "" if math.isinf(rate) else f" (requested {rate:.3g} req/s)"
        say(f"{name}: {result['completed']} done, {result['failed']} failed, {result['request_throughput']:.2f} req/s, "
            f"TTFT median {result['median_ttft_ms']} ms, TPOT median {result['median_tpot_ms']} ms; "
            f"{result['validity']['verdict']}{requested}")  # fmt: skip
    return result


VLLM_KEYS = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
             "total_input_tokens", "total_output_tokens", "request_goodput"]  # fmt: skip


def import_vllm_bench(path: str | os.PathLike, run_dir: str | os.PathLike, layer: str = "imported") -> dict[str, Any]:
    """Read a ``vllm bench serve --save-result`` JSON into a run directory as one latency stage."""
    source = Path(path)
    if not source.is_file():
        raise ParamsError(f"{source}: file not found")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: not a vllm bench serve result (a JSON {type(data).__name__}, not an object)")
    missing = [k for k in ("completed", "duration", "mean_ttft_ms") if k not in data]
    if missing:
        raise ParamsError(f"{source}: not a vllm bench serve result (no {', '.join(missing)})")
    records.read_context(run_dir)
    summary = {k: data.get(k) for k in VLLM_KEYS if k in data}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for key, value in data.items():
            if key.endswith(f"_{metric}_ms"):
                summary[key] = value
    rate = data.get("request_rate")
    stage = {
        "layer": layer,
        "source": "vllm bench serve",
        "source_file": str(source.resolve()),
        "stage": f"c={data.get('max_concurrency')}" if data.get("max_concurrency") else f"rate={rate}",
        "mode": "closed" if rate in ("inf", None, math.inf) else "open",
        "max_concurrency": data.get("max_concurrency"),
        "request_rate": None if rate in ("inf", None) else rate,
        "summary": summary,
        "provenance": "imported",
        # vllm bench serve records nothing of its client's health: whether it kept up is not known.
        "validity": {"verdict": "unchecked", "reasons": [], "annotations": [
            {"note": "imported", "text": "imported from vllm bench serve, which records no client health"}]},
        "context": {k: data.get(k) for k in ("date", "backend", "model_id", "tokenizer_id", "num_prompts", "burstiness")},
    }
    records.append(run_dir, records.LATENCY_STAGES, [stage], provenance="imported")
    return stage
