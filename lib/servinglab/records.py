"""The run directory: its layout, every table it holds and the fields of their records, read and written here
only. A report reads nothing else.

Layout of ``runs/<study>/<run-id>/``::

    run.json               run context (RUN_CONTEXT below), updated under a lock and replaced atomically
    data/<table>.jsonl     one JSON object a line per record, appended as it is measured (TABLES below)
    manifests/<layer>.yaml the objects each layer was applied as (rendered as on a cluster where the
                           platform is not one), manifests/compare/<model>/<layer>.yaml for compare_models,
                           manifests/index.json what was assumed to render them
    logs/                  engine logs
    notebooks/             executed copies of the notebooks (written by the batch runner)
    params/<n>.json        the study as each invocation that wrote into the run resolved it, frozen (1: the
                           run's start; a later ``--only``/``--set`` adds the next); its notebooks read it

Every table is declared once, with its file, its fields (type, unit, meaning) and which are required.
Writers go through :func:`append` or :class:`Writer`, which check a record against its table before it
reaches the disk: :func:`append` syncs at once (the few records of a step that ended), a :class:`Writer`
takes the records of requests as they end, and its caller, a measuring event loop, only queues them.
Readers go through :func:`read`, which returns the records *and* every line it could not read (a line cut
short by a crash, a line that is not a record of the table), with its number: nothing is dropped silently.
``run.json`` is read through :func:`read_context`, which migrates a run written by an older servinglab to
this ``SCHEMA_VERSION``; the tables are migrated as they are read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from .config import NAME_PATTERN
from .errors import RunDirError, ServinglabError

SCHEMA_VERSION = 3
# A layer name as a study allows it (config's rule, at most 40 characters).
LAYER_NAME_PATTERN = rf"(?={NAME_PATTERN.strip('^$')}$).{{1,40}}"
PROVENANCES = ("measured", "imported", "synthetic")
RUN_FILE = "run.json"
DATA_DIR = "data"
MANIFESTS_DIR = "manifests"
MANIFESTS_INDEX = "index.json"
PARAMS_DIR = "params"

# --------------------------------------------------------------------------------------------- declaring


@dataclass(frozen=True)
class Field:
    """One field of a record: its JSON types (``null`` included when it may be missing a value), unit, meaning."""

    name: str
    types: tuple[type, ...]
    doc: str
    unit: str | None = None
    required: bool = True
    nullable: bool = False
    # A name that paths and object names are built from (a layer's) must match this (None: any string).
    pattern: str | None = None

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "is null"
        if isinstance(value, bool) and bool not in self.types:
            return f"is a boolean, expected {self.type_names}"
        if not isinstance(value, self.types):
            return f"is {_JSON_NAMES.get(type(value), type(value).__name__)}, expected {self.type_names}"
        if self.pattern and isinstance(value, str) and not re.fullmatch(self.pattern, value):
            return f"{value[:60]!r} is not a valid name (lowercase letters, digits and '-', at most 40)"
        return None

    @property
    def type_names(self) -> str:
        shown = [t for t in self.types if not (t is int and float in self.types)]  # a number may be written 1
        return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in shown)


_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def f(name: str, types: type | tuple[type, ...], doc: str, unit: str | None = None, *, required: bool = True,
      nullable: bool = False) -> Field:  # fmt: skip
    """A field; ``float`` accepts integers too (JSON does not tell 1 from 1.0)."""
    kinds = types if isinstance(types, tuple) else (types,)
    if float in kinds and int not in kinds:
        kinds = (*kinds, int)
    return Field(name, kinds, doc, unit, required, nullable)


def opt(name: str, types: type | tuple[type, ...], doc: str, unit: str | None = None) -> Field:
    """A field a record may lack or hold null in."""
    return f(name, types, doc, unit, required=False, nullable=True)


@dataclass(frozen=True)
class Table:
    """One table of the run directory: ``data/<name>.jsonl``."""

    name: str
    doc: str
    fields: tuple[Field, ...]

    @property
    def file(self) -> str:
        return f"{DATA_DIR}/{self.name}.jsonl"

    @property
    def by_name(self) -> dict[str, Field]:
        return {fl.name: fl for fl in self.fields}

    def problems(self, record: Any, strict: bool = True) -> list[str]:
        """What makes ``record`` not a record of this table (empty: it is one). ``strict`` also rejects fields
        the table does not declare (on writing; a reader accepts them)."""
        if not isinstance(record, dict):
            return [f"not an object but {type(record).__name__}"]
        found = []
        declared = self.by_name
        for name, spec in declared.items():
            if name not in record:
                if spec.required:
                    found.append(f"{name}: missing")
                continue
            problem = spec.problem(record[name])
            if problem:
                found.append(f"{name}: {problem}")
        if strict:
            found += [f"{name}: not a field of table {self.name}" for name in record if name not in declared]
        return found


# A layer's name becomes part of file names (exports) and object names: it must be one a study allows.
LAYER = Field("layer", (str,), "the layer of the study", pattern=LAYER_NAME_PATTERN)
# Where a record's numbers come from: measured in this run, imported from another tool's file, or made by a
# script (test fixtures). Written by append() and Writer when the writer says nothing else.
PROVENANCE = opt("provenance", str, "measured (this run), imported (another tool's file) or synthetic (a script)")
AT_UNIX = "unix s"
# The run's params/<n>.json the record was written under (a notebook of a batch); absent outside a batch.
PARAMS_SEGMENT = opt("params_segment", int, "the params segment (params/<n>.json) it was recorded under")

PREFLIGHT = Table("preflight", "What the platform offered before anything was deployed (00_preflight).", (
    PROVENANCE,
    PARAMS_SEGMENT,
    f("at", str, "when it was recorded (ISO 8601, UTC)"),
    f("facts", dict, "the platform's facts: hardware, engine, packages, and on a cluster its inventory (cluster)"),
    f("layers", list, "one row per layer: layer, kind, hostable, reason, requires (crds, control-plane namespaces)"),
    f("model", dict, "facts of the model directory served, or of the URI a cluster reads"),
))  # fmt: skip

DEPLOYMENTS = Table("deployments", "One record per layer each time it was ensured (10_deploy, and later starts).", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("kind", str, "the layer's kind"),
    f("platform", str, "local or kubernetes"),
    f("status", str, "ready, unsupported or failed"),
    opt("reason", str, "why it is unsupported or failed"),
    f("reused", bool, "a server or object already running with the same spec was kept"),
    opt("spec_hash", str, "hash of what makes two deployments interchangeable"),
    opt("base_url", str, "the OpenAI base URL (…/v1) the platform reached it at"),
    opt("time_to_ready_s", float, "start (process start, or apply) to ready", "s"),
    f("phases_s", dict, "seconds per start-up phase, in order", "s"),
    opt("started_at", str, "when the start began (ISO 8601, UTC)"),
    opt("ready_at", str, "when it was ready (ISO 8601, UTC)"),
    opt("pid", int, "the server's process (local)"),
    opt("log_path", str, "the engine's log"),
    f("command", list, "the server's command line (local; never holds a key)"),
    f("applied", list, "Kind/name of what servinglab applied (cluster)"),
    f("created", list, "Kind/name of what the platform's controllers made of it (cluster)"),
    opt("processes", int, "processes the layer ran as when ready (local)"),
    opt("rss_mib", float, "their resident memory when ready (local)", "MiB"),
    opt("url", str, "the address the platform published (status.url)"),
    opt("placement", dict, "the cores of the engine, its API server and the measuring client (local)"),
    opt("serving_replicas", int, "replicas that serve a load point, by the kind's cost rule"),
    opt("idle_replicas", int, "replicas kept when no request comes, by the kind's cost rule"),
    opt("recorded_at", str, "when the record was written (ISO 8601, UTC)"),
))  # fmt: skip

SMOKE = Table("smoke", "The source page's confirmed behaviour, one record per check and layer (20_smoke).", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("check", str, "models_lists_served_name, chat_completion_200, fingerprint_names_engine or api_key_enforced"),
    f("passed", bool, "whether the layer showed the expected behaviour"),
    f("expected", str, "what was expected"),
    f("observed", (str, int, float, bool, list, dict), "what was observed", nullable=True),
    f("latency_ms", float, "the check's request time", "ms"),
    f("at", str, "when it was recorded (ISO 8601, UTC)"),
    opt("via", str, "the path the requests took (direct, port-forward, gateway, in-cluster)"),
))  # fmt: skip

LATENCY_STAGES = Table("latency_stages", "One record per latency stage: what was planned, where the client ran, "
                       "what it measured and what the server saw (30_latency, servinglab import).", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("stage", str, "c=<concurrency> (closed loop) or rate=<req/s> (open loop)"),
    opt("stage_id", str, "this measurement of the stage, named by each of its request records"),
    f("mode", str, "closed or open (the sweeps), sweep (a stage of a saturation sweep), or routing (the routing "
      "experiment's stages: closed loop at max_concurrency, not part of the sweeps)"),
    f("source", str, "the tool that measured it: servinglab, or vllm bench serve (imported)"),
    opt("sweep", dict, "a saturation sweep's stage: part (synchronous, throughput, rate); a rate's index, count, "
        "and the range it was spaced in (between_req_s, from the stages named in between_stages)"),
    opt("max_concurrency", int, "requests in flight at most"),
    opt("request_rate", (float, str), "requested arrivals (open loop)", "req/s"),
    opt("num_prompts", int, "requests sent, warmups left out"),
    opt("seed", int, "seed of the stage's prompts and arrival times"),
    opt("client", str, "where the load generator ran"),
    opt("started_at_unix", float, "the stage's start", AT_UNIX),
    opt("ended_at_unix", float, "the stage's end", AT_UNIX),
    opt("interrupted", bool, "stopped before its requests were all sent"),
    opt("server_alive_after", bool, "the server answered /health after the stage"),
    f("summary", dict, "client-side metrics under vllm bench serve's names (ms, req/s, tok/s) and client health"),
    opt("server", dict, "the server's /metrics over the stage, merged over every pod: histograms' counts, means and "
        "percentiles (ms), token and request totals, prefix_cache_queries_total and prefix_cache_hits_total (tokens), "
        "prefix_cache_hit_rate (0-1), preemptions_total, gauges (running, waiting: requests; kv_cache_usage: 0-1); "
        "per_pod: the same per pod; requests_per_pod: requests each pod finished"),
    opt("routing", dict, "a routing stage's workload and path: workload (shared-prefix or no-prefix), prefix_len, "
        "num_prefixes, input_len, output_len (tokens), path (gateway, in-cluster, port-forward, direct), via, "
        "routed_by (the layer's routing on that path; null: the path bypasses it), routing_paths (every path that "
        "carries the layer's routing, with its words), replicas (the study's), pods "
        "(serving when the stage began)"),
    opt("gpu", dict, "GPU telemetry over the stage's window, from Prometheus"),
    opt("client_pods", list, "each in-cluster load pod's outcome"),
    opt("client_start_at_unix", float, "the in-cluster pods' common start", AT_UNIX),
    opt("source_file", str, "the imported result file"),
    opt("context", dict, "the imported result's own context"),
    opt("repeats", int, "times the stage was measured"),
    opt("validity", dict, "verdict (valid, client-limited, server-burst, too-few-samples), reasons with their numbers, "
        "annotations (token packing, a p99 from few requests)"),
    opt("uncertainty", dict, "95 % bootstrap intervals of the medians, p95s and throughput, with level, seed, resamples"),
    opt("repeat_summaries", list, "each repeat's duration (s), completed, throughput (req/s), loop lag (ms), bursts"),
    opt("client_workers", int, "client processes on this machine"),
    opt("client_workers_rule", str, "why that many"),
    opt("client_cpus", list, "the cores the client ran on"),
    opt("stopped_sweep", bool, "the sweep stopped after this stage, which was not valid"),
    opt("conversations", dict, "multi-turn sessions (a conversation dataset): sessions planned, started and completed, "
        "session duration (s), TTFT mean, median and p99 by turn index (by_turn); the summary is over every turn"),
))  # fmt: skip

LATENCY_REQUESTS = Table("latency_requests", "One record per request of a latency stage, written as it ends.", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("stage", str, "the stage it belongs to"),
    opt("stage_id", str, "the measurement of the stage it belongs to (its stage record's stage_id)"),
    f("index", int, "its position in the stage's planned requests (warmups counted apart)"),
    opt("warmup", bool, "a warmup request, left out of every metric"),
    f("ok", bool, "it completed with at least one token"),
    opt("status", int, "HTTP status"),
    opt("error_kind", str, "why it failed: http_<status>, timeout, disconnect, connection_refused, cancelled, ..."),
    opt("error", str, "the failure's message, cut to 300 characters"),
    opt("sent_s", float, "send time from the stage start", "s"),
    opt("scheduled_s", float, "planned send time from the stage start", "s"),
    opt("schedule_lag_ms", float, "how late it was sent against its plan", "ms"),
    opt("ttft_ms", float, "time to the first token-bearing chunk", "ms"),
    opt("e2el_ms", float, "time to the last token-bearing chunk", "ms"),
    opt("token_ms", list, "arrival of every token-bearing chunk after the send", "ms"),
    opt("chunk_tokens", list, "tokens each of those chunks carried (by usage; 1 each without continuous usage)"),
    opt("output_tokens", int, "the server's usage.completion_tokens"),
    opt("client_tokens", int, "token-bearing chunks counted by the client"),
    opt("prompt_tokens", int, "the server's usage.prompt_tokens"),
    opt("expected_prompt_tokens", int, "prompt tokens the client planned, before the chat template (-1: unknown)"),
    opt("max_tokens", int, "max_tokens asked for"),
    opt("chunks", int, "server-sent events with data"),
    opt("model", str, "the name the server answered as"),
    opt("client_pod", int, "the in-cluster load pod's slice that sent it"),
    opt("client_worker", int, "the client process (on this machine) that sent it"),
    opt("repeat", int, "which repeat of its stage"),
))  # fmt: skip

LIFECYCLE = Table("lifecycle", "One record per lifecycle experiment trial, written when it ends (40_lifecycle).", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("kind", str, "the layer's kind"),
    f("platform", str, "local or kubernetes"),
    f("experiment", str, "time_to_ready, model_update, canary, scale_to_zero or gateway_hop"),
    f("trial", int, "the trial's number, from 0"),
    f("status", str, "measured, unsupported, failed or interrupted"),
    opt("reason", str, "why it was not measured"),
    opt("refused_by", str, "who refused an unsupported experiment: layer, platform or settings"),
    f("started_at_unix", float, "its start", AT_UNIX),
    f("ended_at_unix", float, "its end", AT_UNIX),
    f("measurements", dict, "what it measured (s, ms, counts; see the experiment's module)"),
    opt("settled", str, "what was done to the layer after a failure: restored, torn down, could not settle"),
))  # fmt: skip

LIFECYCLE_REQUESTS = Table("lifecycle_requests", "One record per request a lifecycle experiment sent, as it ends.", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("experiment", str, "the experiment that sent it"),
    f("trial", int, "its trial"),
    opt("index", int, "its position among the requests of its batch or load (interleaved pairs: pair and path)"),
    f("ok", bool, "it completed with at least one token"),
    opt("status", int, "HTTP status"),
    opt("error_kind", str, "why it failed"),
    opt("error", str, "the failure's message"),
    opt("ttft_ms", float, "time to the first token", "ms"),
    opt("e2el_ms", float, "time to the last token", "ms"),
    opt("output_tokens", int, "the server's usage.completion_tokens"),
    opt("model", str, "the name the server answered as: which revision served it"),
    f("sent_at_unix", float, "when it was sent", AT_UNIX),
    f("ended_at_unix", float, "its last token, or the moment it failed", AT_UNIX),
    opt("phase", str, "before, during or after a change; split, warm, cold, wake"),
    opt("path", str, "gateway or direct (gateway_hop)"),
    opt("pair", int, "its pair (gateway_hop)"),
    opt("via", str, "the path the request took"),
))  # fmt: skip

CONVERSATION_TURNS = Table("conversation_turns", "One record per turn of a multi-turn session (a conversation of a "
                           "ShareGPT file sent turn by turn with the server's own answers), written as the turn ends.", (
    PROVENANCE,
    PARAMS_SEGMENT,
    LAYER,
    f("stage", str, "the stage it belongs to: c=<sessions in flight> or rate=<sessions/s>"),
    opt("stage_id", str, "the measurement of the stage it belongs to"),
    f("session", int, "its session's position in the stage"),
    f("conversation", int, "its conversation's index in the ShareGPT file"),
    f("turn", int, "its position in the session, from 0"),
    f("turns_planned", int, "user turns the session was to send"),
    f("messages", int, "chat messages sent: the earlier turns and the server's answers to them, then this turn"),
    f("think_time_ms", float, "the wait after the previous answer before it was sent", "ms"),
    f("ok", bool, "it completed with at least one token"),
    opt("status", int, "HTTP status"),
    opt("error_kind", str, "why it failed (it ended its session): http_<status>, timeout, disconnect, cancelled, ..."),
    opt("error", str, "the failure's message, cut to 300 characters"),
    opt("sent_s", float, "send time from the stage start", "s"),
    opt("ttft_ms", float, "time to the first token-bearing chunk", "ms"),
    opt("tpot_ms", float, "(E2E - TTFT) / (output tokens - 1)", "ms"),
    opt("e2el_ms", float, "time to the last token-bearing chunk", "ms"),
    opt("token_ms", list, "arrival of every token-bearing chunk after the send", "ms"),
    opt("chunk_tokens", list, "tokens each of those chunks carried"),
    opt("output_tokens", int, "the server's usage.completion_tokens"),
    opt("client_tokens", int, "token-bearing chunks counted by the client"),
    opt("prompt_tokens", int, "the server's usage.prompt_tokens: the history and this turn, chat template included"),
    opt("max_tokens", int, "max_tokens asked for"),
    opt("chunks", int, "server-sent events with data"),
    opt("model", str, "the name the server answered as"),
    opt("repeat", int, "which repeat of its stage (a study's stage)"),
))  # fmt: skip

TABLES: dict[str, Table] = {t.name: t for t in (PREFLIGHT, DEPLOYMENTS, SMOKE, LATENCY_STAGES, LATENCY_REQUESTS,
                                                LIFECYCLE, LIFECYCLE_REQUESTS, CONVERSATION_TURNS)}  # fmt: skip

RUN_CONTEXT = Table("run", "run.json: the run's context.", (
    f("schema_version", int, "the run directory's format"),
    f("run_id", str, "the run's id: its UTC start time, sortable"),
    f("study", str, "the study's name"),
    f("started_at", str, "when the run began (ISO 8601, UTC)"),
    opt("ended_at", str, "when it ended"),
    opt("status", str, "running, interactive, ok, failed or interrupted"),
    f("params", dict, "the study as resolved when the run began"),
    opt("sources", list, "where its values came from, in merge order"),
    opt("project_dir", str, "the project folder the study's relative paths were resolved against"),
    opt("git", dict, "the commit the code was at, and whether the tree had changes"),
    opt("servinglab_version", str, "servinglab's version"),
    opt("layer_kinds", dict, "every layer kind of the study as the run knew it: title, column, claims, ..."),
    opt("notebooks", list, "each executed notebook: name, status, seconds, error, params_segment (the params/<n>.json "
        "it read)"),
    opt("runner", dict, "the batch process writing the run: pid, create_time, host (a run marked running whose "
        "runner has gone is dead)"),
    opt("platform", dict, "the platform's name and accelerator"),
    opt("hardware", dict, "the machine or the cluster"),
    opt("engine", dict, "the engine: name, version, image, system_fingerprint"),
    opt("model", dict, "the model served"),
))  # fmt: skip


class RecordError(ServinglabError):
    """A record that is not a record of its table (a writer's mistake, caught before it reaches the disk)."""


# ---------------------------------------------------------------------------------------------- run.json


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with millisecond precision."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A sortable run id: the UTC start time to the second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def git_state(directory: Path) -> dict[str, Any]:
    """The commit the code was at, and whether the tree had changes; empty values outside git."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def create_run(runs_dir: Path, study_name: str, context: dict[str, Any]) -> Path:
    """Make ``<runs_dir>/<study>/<run-id>/`` with its run.json, and point ``latest`` at it."""
    study_dir = Path(runs_dir) / study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    base = new_run_id()
    run_id, n = base, 1
    while True:
        try:
            (study_dir / run_id).mkdir()
            break
        except FileExistsError:
            n += 1
            run_id = f"{base}-{n}"
    run_dir = study_dir / run_id
    for sub in (DATA_DIR, "logs", "notebooks"):
        (run_dir / sub).mkdir()
    _write_json_atomic(
        run_dir / RUN_FILE,
        {"schema_version": SCHEMA_VERSION, "run_id": run_id, "study": study_name, "started_at": utc_now()}
        | context,
    )
    latest = study_dir / "latest"
    tmp = study_dir / f".latest-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_id)
    tmp.replace(latest)
    return run_dir


def latest_run(runs_dir: Path, study_name: str) -> Path | None:
    latest = Path(runs_dir) / study_name / "latest"
    return latest.resolve() if latest.exists() else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Key order is kept as written: the order of the study's layers is the order of the report's columns.
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(Path(run_dir) / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _raw_context(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {RUN_FILE}; this is not a servinglab run directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object but {type(data).__name__}")
    version = data.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise RunDirError(f"{path}: schema_version {version!r}; this servinglab reads 1 to {SCHEMA_VERSION}")
    return data


def read_context(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``run.json``, migrated to this SCHEMA_VERSION; a RunDirError names the file and the field."""
    data = _raw_context(run_dir)
    for version in range(data["schema_version"], SCHEMA_VERSION):
        data = CONTEXT_MIGRATIONS[version](data)
    problems = RUN_CONTEXT.problems(data, strict=False)
    if problems:
        raise RunDirError(f"{Path(run_dir) / RUN_FILE}: " + "; ".join(problems))
    return data


def update_context(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into run.json (top-level keys; mappings merged one level deep).

    A run written by an older servinglab keeps its schema_version: what is added is added as it is.
    """
    with _locked(Path(run_dir)):
        data = _raw_context(run_dir)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = data[key] | value
            else:
                data[key] = value
        _write_json_atomic(Path(run_dir) / RUN_FILE, data)
    return data


# ----------------------------------------------------------------------------------------- params segments


def params_segment_path(run_dir: str | os.PathLike, number: int) -> Path:
    """``params/<number>.json`` of a run."""
    return Path(run_dir) / PARAMS_DIR / f"{number}.json"


def freeze_params(run_dir: str | os.PathLike, frozen: dict[str, Any]) -> tuple[int, Path]:
    """Write the next params segment of a run: ``frozen`` (study_file, sources, params, ...) with its number.

    Each invocation that writes into a run freezes the study as it resolved it, so its notebooks read this copy
    and an edit of the study file during the run changes nothing the run does or records.
    """
    folder = Path(run_dir) / PARAMS_DIR
    with _locked(Path(run_dir)):
        folder.mkdir(exist_ok=True)
        taken = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()]
        number = max(taken, default=0) + 1
        path = params_segment_path(run_dir, number)
        _write_json_atomic(path, {"segment": number, "frozen_at": utc_now()} | frozen)
    return number, path


def is_params_segment(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run's ``params/<n>.json`` (what the batch runner hands its notebooks)."""
    path = Path(path)
    return (path.suffix == ".json" and path.stem.isdigit() and path.parent.name == PARAMS_DIR
            and (path.parent.parent / RUN_FILE).is_file())  # fmt: skip


def read_params_segment(path: str | os.PathLike) -> dict[str, Any]:
    """A params segment; a RunDirError names the file and the field when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: not a params segment ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object but {type(data).__name__}")
    for key, kind in (("segment", int), ("study_file", str), ("sources", list), ("params", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise RunDirError(f"{path}: {key}: missing or not {_JSON_NAMES[kind]}")
    return data


# ---------------------------------------------------------------------------------------------- tables


def table_path(run_dir: str | os.PathLike, table: Table) -> Path:
    return Path(run_dir) / table.file


def check(table: Table, record: dict[str, Any]) -> dict[str, Any]:
    """The record, or a RecordError naming the table and every problem with it."""
    problems = table.problems(record)
    if problems:
        raise RecordError(f"a record for {table.file} is not one of its records: {'; '.join(problems)}")
    return record


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=str) + "\n"


_SEGMENT: dict[str, int] = {}  # "number": the params segment this process writes under, once it is known


def write_under_segment(number: int) -> None:
    """Stamp ``params_segment`` on every record this process writes from now on: a notebook executing in a
    batch, which read the study from that segment of its run."""
    _SEGMENT["number"] = number


@contextlib.contextmanager
def writing_under_segment(number: int) -> Iterator[None]:
    """Stamp ``params_segment`` on the records this process writes inside the block only: the batch runner,
    which deploys for one ``--only`` notebook and goes back to writing under no segment."""
    previous = dict(_SEGMENT)
    _SEGMENT["number"] = number
    try:
        yield
    finally:
        _SEGMENT.clear()
        _SEGMENT.update(previous)


def _stamps(provenance: str) -> dict[str, Any]:
    """What a record says of itself unless it says otherwise: its provenance and params segment."""
    return {"provenance": provenance} | ({"params_segment": _SEGMENT["number"]} if _SEGMENT else {})


def append(run_dir: str | os.PathLike, table: Table, rows: Iterable[dict[str, Any]], provenance: str = "measured") -> int:
    """Check and append records to a table, flushed and synced to disk; returns how many. A record that does
    not say where its numbers come from gets ``provenance``."""
    lines = [_line(check(table, _stamps(provenance) | r)) for r in rows]
    path = table_path(run_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    return len(lines)


@dataclass
class WriterStats:
    """What a :class:`Writer` has done so far, for whoever checks that it keeps its promises.

    ``sync_threads`` holds the identity of every thread that synced the file: only the writer's own.
    """

    written: int = 0
    syncs: int = 0
    last_sync_monotonic_s: float | None = None
    sync_threads: set[int] = field(default_factory=set)
    refused: int = 0


_STOP = object()  # queued by close(): everything queued before it is written, then the file is synced


class Writer:
    """Appends the records of a table as they come, off the caller's thread: :meth:`put` only queues.

    A thread of its own checks each record against its table, writes it and flushes it at once, syncs the
    file to disk at most ``SYNC_EVERY_S`` after a record was written, and again when closed; a measuring
    event loop never waits for the disk, nor for the check. ``extra`` fields are added to every record.
    The records written are kept in ``rows`` as well; a record that is not one of the table's is kept in
    ``refused`` with its problems, never written, and :meth:`close` raises a RecordError naming it. Close
    it (or use it as a context manager) when its stage ends: only then is every record on disk.
    """

    SYNC_EVERY_S = 1.0

    def __init__(self, path: Path | None, table: Table, extra: dict[str, Any] | None = None) -> None:
        self.table, self.extra = table, _stamps("measured") | dict(extra or {})
        self.rows: list[dict[str, Any]] = []
        self.refused: list[tuple[dict[str, Any], list[str]]] = []
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._handle: Any = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.open_file(path)
        self._thread = threading.Thread(target=self._run, name=f"servinglab-writer-{table.name}", daemon=True)
        self._thread.start()

    @classmethod
    def to_run(cls, run_dir: str | os.PathLike, table: Table, extra: dict[str, Any] | None = None) -> Writer:
        return cls(table_path(run_dir, table), table, extra)

    def open_file(self, path: Path) -> Any:
        """The file the records are appended to: a text file with ``write``, ``flush`` and ``fileno``
        (a subclass may hand another, e.g. to see how the writer copes with a slow disk)."""
        return open(path, "a", encoding="utf-8")

    def put(self, record: dict[str, Any]) -> None:
        """Queue a record and return at once; it is checked, written and flushed by the writer's thread.

        The record is copied here (one level), so a caller that changes it afterwards changes nothing written.
        """
        if self._closed:
            raise RecordError(f"a record for {self.table.file} came after its writer was closed")
        self._queue.put(self.extra | record)

    def __call__(self, record: dict[str, Any]) -> None:
        """The writer as a sink: :meth:`put`."""
        self.put(record)

    def write(self, record: dict[str, Any]) -> None:
        """The same as :meth:`put`."""
        self.put(record)

    def _run(self) -> None:
        unsynced_since: float | None = None  # when the oldest record not yet synced was written
        try:
            while True:
                wait_s = None if unsynced_since is None else unsynced_since + self.SYNC_EVERY_S - time.monotonic()
                try:
                    record = self._queue.get(timeout=None if wait_s is None else max(0.0, wait_s))
                except queue.Empty:
                    record = None
                if record is _STOP:
                    break
                if record is not None and self._take(record) and unsynced_since is None:
                    unsynced_since = time.monotonic()
                if unsynced_since is not None and time.monotonic() - unsynced_since >= self.SYNC_EVERY_S:
                    self._sync()
                    unsynced_since = None
            self._sync()
        except BaseException as exc:  # noqa: BLE001 - reported by close(), never lost with the thread
            self._error = self._error or exc

    def _take(self, record: dict[str, Any]) -> bool:
        """Check and write one record; whether it reached the file."""
        problems = self.table.problems(record)
        if problems:
            self.refused.append((record, problems))
            self.stats.refused += 1
            return False
        self.rows.append(record)
        if self._handle is None or self._error is not None:
            return False
        try:
            self._handle.write(_line(record))
            self._handle.flush()
        except OSError as exc:  # the disk: reported at close, the records stay in memory (rows)
            self._error = exc
            return False
        self.stats.written += 1
        return True

    def _sync(self) -> None:
        if self._handle is None or self._error is not None:
            return
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            self._error = exc
            return
        self.stats.syncs += 1
        self.stats.last_sync_monotonic_s = time.monotonic()
        self.stats.sync_threads.add(threading.get_ident())

    def close(self) -> None:
        """Write what is queued, sync the file, and stop the thread; then raise what went wrong, if anything:
        a RunDirError when the disk refused (the records stay in ``rows``), a RecordError for records that
        were not records of the table (kept in ``refused``)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            _join_through_interrupts(self._thread)
            if self._handle is not None:
                with contextlib.suppress(OSError):
                    self._handle.close()
        if self._error is not None:
            kept = len(self.rows) - self.stats.written
            raise RunDirError(f"{self.table.file}: could not be written ({self._error}); "
                              f"{kept} records are kept in memory only")  # fmt: skip
        if self.refused:
            shown = "; ".join(self.refused[0][1][:3])
            raise RecordError(f"{len(self.refused)} records for {self.table.file} were not written, not being "
                              f"records of it (the first: {shown})")  # fmt: skip

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except ServinglabError as problem:  # the error under way goes on; what the writer saw is told with it
            exc.add_note(str(problem))


def _join_through_interrupts(thread: threading.Thread) -> None:
    """Wait for a writer's thread even through Ctrl-C: the records it still holds were measured, and it takes
    no longer than the disk does to write them. The interrupt goes on once they are written."""
    interrupted: KeyboardInterrupt | None = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


@dataclass(frozen=True)
class DamagedLine:
    """A line of a table that is not one of its records."""

    number: int  # from 1
    reason: str
    text: str  # its start, for the warning


@dataclass
class TableRead:
    """A table as read: its records, and the lines that could not be read, each with its number."""

    table: Table
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[DamagedLine] = field(default_factory=list)

    def warning(self) -> str | None:
        """One sentence naming the file and the lines that could not be read, or None."""
        if not self.damaged:
            return None
        shown = "; ".join(f"line {d.number}: {d.reason}" for d in self.damaged[:5])
        more = f"; and {len(self.damaged) - 5} more" if len(self.damaged) > 5 else ""
        return (f"{self.table.file}: {len(self.damaged)} line{'s' if len(self.damaged) != 1 else ''} could not be "
                f"read and {'are' if len(self.damaged) != 1 else 'is'} left out ({shown}{more})")  # fmt: skip


def read(run_dir: str | os.PathLike, table: Table, migrate_from: int | None = None) -> TableRead:
    """Every record of a table, and every line that is not one (a truncated last line after a crash
    included), migrated from the run's schema_version (run.json's, or ``migrate_from``)."""
    path = table_path(run_dir, table)
    out = TableRead(table, path)
    if not path.is_file():
        return out
    context: dict[str, Any] = {}
    with contextlib.suppress(RunDirError):
        context = _raw_context(run_dir)
    start = migrate_from or context.get("schema_version") or SCHEMA_VERSION
    steps = [TABLE_MIGRATIONS.get((v, table.name)) for v in range(start, SCHEMA_VERSION)]
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: a write cut short
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.damaged.append(DamagedLine(number, "not UTF-8", line[:80].decode("utf-8", "replace")))
            continue
        except json.JSONDecodeError as exc:
            reason = "cut short (the last line, written when the run stopped)" if last else f"not JSON ({exc.msg})"
            out.damaged.append(DamagedLine(number, reason, line[:80].decode("utf-8", "replace")))
            continue
        for step in steps:
            if step is not None and isinstance(record, dict):
                record = step(record, context)
        problems = table.problems(record, strict=False)
        if not problems and record.get("provenance") not in (None, *PROVENANCES):
            problems = [f"provenance: {record['provenance']!r} is not one of {', '.join(PROVENANCES)}"]
        if problems:
            out.damaged.append(DamagedLine(number, "; ".join(problems[:3]), line[:80].decode("utf-8", "replace")))
            continue
        out.rows.append(record)
    return out


def read_frame(run_dir: str | os.PathLike, table: Table) -> Any:
    """A table's records as a pandas DataFrame (empty when nothing was recorded)."""
    import pandas as pd

    return pd.DataFrame(read(run_dir, table).rows)


# ------------------------------------------------------------------------------------------------ manifests


def manifests_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / MANIFESTS_DIR


def manifest_path(run_dir: str | os.PathLike, layer: str, model: str | None = None) -> Path:
    """``manifests/<layer>.yaml``, or ``manifests/compare/<model>/<layer>.yaml`` for a compared model."""
    folder = manifests_dir(run_dir) if model is None else manifests_dir(run_dir) / "compare" / model
    return folder / f"{layer}.yaml"


def write_manifest(run_dir: str | os.PathLike, layer: str, objects: list[dict[str, Any]] | None, assumed: str | None,
                   model: str | None = None, error: str | None = None) -> Path:  # fmt: skip
    """Record a layer's objects as YAML and, in the index, what was assumed to render them; or, when they
    could not be rendered, the error (``objects`` None)."""
    path = manifest_path(run_dir, layer, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if objects is not None:
        path.write_text(to_yaml(objects), encoding="utf-8")
    with _locked(Path(run_dir)):
        index_file = manifests_dir(run_dir) / MANIFESTS_INDEX
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
        key = str(path.relative_to(manifests_dir(run_dir)))
        index[key] = {"layer": layer, "model": model, "assumed": assumed, "error": error}
        _write_json_atomic(index_file, index)
    return path


def read_manifest_index(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """What the run recorded of its manifests (relative file → layer, model, assumed), or None: not recorded."""
    index_file = manifests_dir(run_dir) / MANIFESTS_INDEX
    if not index_file.is_file():
        return None
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{index_file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{index_file}: not a JSON object")
    return data


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order rendered, long strings unwrapped, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Kubernetes objects as multi-document YAML, the way ``kubectl apply -f`` reads them and a person writes."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000, explicit_start=True)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The objects of a recorded manifest file; a RunDirError names the file when it is not one."""
    try:
        objects = [o for o in yaml.safe_load_all(path.read_text(encoding="utf-8")) if o is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: not a manifest file ({str(exc).splitlines()[0]})") from None
    if not all(isinstance(o, dict) and "kind" in o and isinstance(o.get("metadata"), dict) for o in objects):
        raise RunDirError(f"{path}: holds something that is not a Kubernetes object")
    return objects


# ---------------------------------------------------------------------------------------------- migrations


def _v1_context(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 did not record its layer kinds: they are described as the registered kinds describe them."""
    from . import layers

    used = {spec.get("kind") for spec in (data.get("params", {}).get("layers") or {}).values() if isinstance(spec, dict)}
    kinds = {k.name: k.describe() for k in layers.kinds() if k.name in used}
    return data | {"schema_version": 2, "layer_kinds": data.get("layer_kinds") or kinds}


def _v1_preflight(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named the controllers it found ``kserve_controllers`` and KServe's default mode at the top, and
    did not record what each layer relies on: its kind's rules say, applied to the layer as the study gave it."""
    from . import layers

    cluster = (record.get("facts") or {}).get("cluster")
    if isinstance(cluster, dict) and "kserve_controllers" in cluster and "controllers" not in cluster:
        cluster = {("controllers" if k == "kserve_controllers" else k): v for k, v in cluster.items()}
        # Version 1 read KServe's default deployment mode from its controller's config: the fact of the kinds
        # that rely on that controller.
        mode = cluster.pop("kserve_default_deployment_mode", None)
        owners = [k.name for k in layers.kinds() if "kserve-controller-manager" in k.controllers]
        cluster["kind_facts"] = {name: {"default deployment mode": mode} for name in owners} if mode else {}
        record = record | {"facts": record["facts"] | {"cluster": cluster}}
    checks = cluster if isinstance(cluster, dict) else {}
    specs = context.get("params", {}).get("layers") or {}
    rows = []
    for row in record.get("layers") or []:
        spec = specs.get(row.get("layer")) if isinstance(row, dict) else None
        if isinstance(spec, dict) and "requires" not in row:
            with contextlib.suppress(ServinglabError, ValueError):
                kind = layers.get(spec.get("kind", ""))
                config = kind.config.model_validate(spec)
                row = row | {"requires": {
                    "crds": {crd: kind.crds.get(crd, crd) for crd in kind.required_crds(config)},
                    "control_plane_namespaces": kind.control_plane_namespaces(config, checks),
                    "controllers": [c for c in checks.get("controllers", []) if c.get("name") in kind.controllers],
                    "facts": (checks.get("kind_facts") or {}).get(kind.name, {}), "has_gateway": kind.has_gateway}}  # fmt: skip
        rows.append(row)
    return record | {"layers": rows}


def _v1_deployments(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Version 1 did not record the replicas a layer serves and idles with: its kind's cost rule says."""
    from . import layers

    spec = (context.get("params", {}).get("layers") or {}).get(record.get("layer"))
    if record.get("serving_replicas") is not None or not isinstance(spec, dict):
        return record
    try:
        kind = layers.get(spec.get("kind", ""))
        config = kind.config.model_validate(spec)
    except (ServinglabError, ValueError):
        return record
    return record | {"serving_replicas": kind.serving_replicas(config), "idle_replicas": kind.idle_replicas(config)}


# Refusals of version 1 carry no refused_by: these are how version 1 worded the platform's and the settings'.
_V1_PLATFORM = ("needs platform", "the cluster lacks")
_V1_SETTINGS = ("min_replicas is", "the split and the activation happen in the gateway")


def _v1_lifecycle(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Version 1 did not record who refused an experiment, nor whether an update replaces pods in place."""
    if record.get("status") == "unsupported" and not record.get("refused_by"):
        reason = record.get("reason") or ""
        by = "platform" if reason.startswith(_V1_PLATFORM) else "settings" if reason.startswith(_V1_SETTINGS) else "layer"
        record = record | {"refused_by": by}
    m = record.get("measurements")
    if record.get("experiment") == "model_update" and isinstance(m, dict) and m and "replaces_in_place" not in m:
        how = str(m.get("how", ""))
        record = record | {"measurements": m | {"replaces_in_place": "restart" in how or "Recreate" in how}}
    return record


def _v2_context(data: dict[str, Any]) -> dict[str, Any]:
    return data | {"schema_version": 3}


def _v2_provenance(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Version 2 did not say where numbers came from: what servinglab measured, or a vllm bench serve import."""
    if "provenance" in record:
        return record
    return record | {"provenance": "imported" if record.get("source") == "vllm bench serve" else "measured"}


# The words version 2 gave a client-limited and a server-burst stage among its warnings.
V2_VERDICT_WARNINGS = re.compile(r"^(the client was the bottleneck|\d+ of \d+ streams reached the client in one burst)")


def _v2_stage(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Version 2 stages: the verdict from their numbers (never their warnings' words), and the server's
    percentiles, which it read by interpolating inside coarse buckets, set apart as such."""
    from .measure.client_metrics import validity

    record = _v2_provenance(record, context)
    if "validity" not in record and record["provenance"] == "imported":
        record = record | {"validity": {"verdict": "unchecked", "reasons": [], "annotations": [
            {"note": "imported", "text": "imported from vllm bench serve, which records no client health"}]}}
    elif "validity" not in record and isinstance(record.get("summary"), dict):
        record = record | {"validity": validity(record["summary"])}
    summary = record.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("warnings"), list):
        # Version 2 also said client lag and held-back streams in words; the verdict says them now.
        kept = [w for w in summary["warnings"] if not (isinstance(w, str) and V2_VERDICT_WARNINGS.match(w))]
        record = record | {"summary": summary | {"warnings": kept}}
    server = record.get("server")
    if isinstance(server, dict):
        moved = {(f"{k}_interpolated" if re.fullmatch(r"p\d+(\.\d+)?_\w+_ms", k) else k): v for k, v in server.items()}
        record = record | {"server": moved}
    return record


CONTEXT_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_context, 2: _v2_context}
TABLE_MIGRATIONS: dict[tuple[int, str], Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    (1, "preflight"): _v1_preflight,
    (1, "deployments"): _v1_deployments,
    (1, "lifecycle"): _v1_lifecycle,
    (2, "latency_stages"): _v2_stage,
    **{(2, name): _v2_provenance for name in ("preflight", "deployments", "smoke", "latency_requests", "lifecycle",
                                              "lifecycle_requests")},
}


class Stopwatch:
    """Monotonic seconds since creation, for durations; wall-clock stamps come from utc_now()."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._start
