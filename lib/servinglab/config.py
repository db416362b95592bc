"""The study file: one YAML document that says what to deploy, where, and how to measure it.

This module is the one place that holds defaults and the one place that rejects bad input. Values are
merged in a single order:

1. the schema's defaults (the classes below);
2. the study file (``params/<study>.yaml``);
3. an override file named by the environment variable ``SERVINGLAB_OVERRIDES`` (how tests and CI shrink
   a study without touching notebooks);
4. ``--set dotted.key=value`` items, in the order given (values are read as YAML scalars or lists).

Every problem (unknown or misspelt key, wrong type, impossible value, unknown layer, missing file,
invalid YAML) raises :class:`~servinglab.errors.ParamsError` with the file, the key and the reason, before
anything is built, deployed or started.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from . import layers as layer_kinds
from . import studyfile
from .errors import ParamsError
from .measure.outbound import refuse_plain_http_key

OVERRIDES_ENV = "SERVINGLAB_OVERRIDES"

# Kubernetes object names are built from these, so they follow DNS-1123 label rules.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Engine arguments the platform sets itself; a study that sets them would fight the platform. 'config' reads
# further arguments from a file, past every check here.
MANAGED_ENGINE_ARGS = {"model", "served-model-name", "host", "port", "api-key", "config"}

# Kubernetes declares replicas, parallelism and probe thresholds as int32.
INT32_MAX = 2**31 - 1
# The longest any wait, deadline or grace period may be: longer than any run, and far inside what
# asyncio, threading (OverflowError above about 9e9 s) and Kubernetes' deadlines take.
LONGEST_WAIT_S = 7 * 24 * 3600.0
# Concurrent streams of one stage: the client already lags from about 64 per process (DESIGN.md).
MAX_CONCURRENCY = 100_000
# Requests one stage may send: its schedule and its records are held in memory.
MAX_STAGE_REQUESTS = 1_000_000
# Tokens of one prompt or answer: longer than any model's context.
MAX_TOKENS = 10_000_000
# Requests per second of a rate stage or of the steady load beside a change.
MAX_RATE_PER_S = 10_000.0
# Seeds go to numpy, and offsets (stage index, trial) are added to them: non-negative int32 leaves room.
MAX_SEED = INT32_MAX


def engine_argv(engine_args: dict[str, Any]) -> list[str]:
    """``{"max-model-len": 2048, "enforce-eager": True}`` → ``["--max-model-len", "2048", "--enforce-eager"]``."""
    argv: list[str] = []
    for flag, value in engine_args.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is False:
            continue
        elif isinstance(value, list):
            argv += [f"--{flag}", *(str(v) for v in value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def checked_api_key(value: str, source: str) -> str:
    """The key without surrounding whitespace, when it is one line of printable characters.

    A key with a line break or a control character would be refused by the HTTP client with the key in its
    message, so it is refused here, naming only ``source`` (a file or a variable), never the value.
    """
    key = value.strip()
    if not key:
        raise ParamsError(f"{source}: the API key is empty")
    lines = len(key.splitlines())
    if lines > 1:
        raise ParamsError(f"{source}: the API key must be one line; found {lines} lines")
    if not key.isprintable():
        raise ParamsError(f"{source}: the API key holds a character that is not printable")
    return key


def read_api_key_file(path: Path) -> str:
    """The key a file holds (see :func:`checked_api_key`); a file that is not UTF-8 is refused too."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: the API key file is not UTF-8 text") from None
    except OSError as exc:
        raise ParamsError(f"{path}: the API key file cannot be read ({exc.strerror})") from None
    return checked_api_key(text, str(path))


class StrictModel(BaseModel):
    """A schema node that rejects keys it does not define, and numbers that are not finite."""

    # .inf and .nan pass every gt/le bound, so they are refused wherever a float is read.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- platform


class LocalPlatform(StrictModel):
    """Serve each layer as a vLLM OpenAI server process on this machine."""

    kind: Literal["local"]
    host: str = Field("127.0.0.1", description="address the engine binds to")
    python: str | None = Field(
        None, description="interpreter that runs the engine; empty means the one running servinglab"
    )
    ready_timeout_s: float = Field(900.0, gt=0, le=LONGEST_WAIT_S, description="deadline for /health and /v1/models")
    stop_grace_s: float = Field(30.0, gt=0, le=3600, description="SIGTERM to SIGKILL grace period")
    kv_cache_space_gib: int = Field(
        1, ge=1, le=INT32_MAX, description="VLLM_CPU_KVCACHE_SPACE (whole GiB) for the CPU build"
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="extra environment for the engine; recorded in run.json, so no secrets"
    )
    cpu_placement: Literal["auto", "none"] = Field(
        "auto",
        description="auto: with vLLM's CPU build, the engine on every core but the first, the API server and the "
        "measuring client on the first (servinglab.platforms.placement says why); none: the kernel decides",
    )

    @field_validator("env")
    @classmethod
    def _env_holds_no_secret(cls, env: dict[str, str]) -> dict[str, str]:
        # platform.env is recorded in run.json: a key set here would be written beside the results.
        for name in env:
            if not re.fullmatch(ENV_NAME_PATTERN, name):
                raise ValueError(f"{name[:40]!r} is not an environment variable name")
            if SECRET_ENV_NAME.search(name):
                raise ValueError(f"{name} looks like a secret, and platform.env is recorded in run.json "
                                 "(the value is not shown); give the layers' key with auth.api_key_env or auth.api_key_file")  # fmt: skip
        return env


ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"


class KubernetesPlatform(StrictModel):
    """Deploy each layer as Kubernetes objects on a cluster."""

    kind: Literal["kubernetes"]
    kubeconfig: str | None = Field(None, description="kubeconfig path; empty: KUBECONFIG or in-cluster")
    context: str | None = None
    namespace: str = Field("servinglab", pattern=NAME_PATTERN)
    create_namespace: bool = False
    kubernetes_version: str = Field("1.33", pattern=r"^1\.\d+$")
    ready_timeout_s: float = Field(1800.0, gt=0, le=LONGEST_WAIT_S)
    image: str = Field(
        "vllm/vllm-openai:v0.32.0",
        description="vLLM OpenAI server image, pinned by tag or digest (a moving tag would change the engine between runs)",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    gpus: int = Field(
        1, ge=0, le=INT32_MAX, description="GPUs per replica; 0 renders a CPU-only variant (give a CPU image)"
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of the GPU")
    cpu: str = Field("4", pattern=QUANTITY_PATTERN, description="CPU request and limit per replica")
    memory: str = Field("16Gi", pattern=QUANTITY_PATTERN, description="memory request and limit per replica")
    shm_size: str = Field("2Gi", pattern=QUANTITY_PATTERN, description="memory-backed /dev/shm size")
    run_as_user: int = Field(1000, ge=1, le=INT32_MAX, description="non-root user the engine runs as")
    startup_budget_s: int = Field(
        1800, ge=30, le=int(LONGEST_WAIT_S), description="time the start-up probe allows before restarting"
    )
    weights_claim_size: str = Field("20Gi", pattern=QUANTITY_PATTERN, description="PVC size when servinglab creates it")
    storage_class: str | None = Field(None, description="storage class of a PVC servinglab creates")
    staging_image: str | None = Field(
        None, description="image with the 'hf' CLI that stages hf:// weights into the PVC (clusters that reach a hub)"
    )
    api_key_secret: str | None = Field(
        None, pattern=NAME_PATTERN, description="Secret (key 'api-key') whose value the engine requires as API key"
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    gateway: str | None = Field(None, description="Gateway (name or namespace/name) llm-d routes attach to")
    endpoint: Literal["port-forward", "gateway", "in-cluster"] = Field(
        "port-forward",
        description="how the client reaches each layer: a port-forward opened by servinglab to a serving pod, "
        "the layer's gateway URL (status.url), or the in-cluster Service name (client running in the cluster)",
    )
    unschedulable_grace_s: float = Field(
        0.0, ge=0, le=LONGEST_WAIT_S,
        description="how long a pod may stay unschedulable (a node autoscaler adding a GPU node) before it fails",
    )
    gateway_address: str | None = Field(
        None, description="host[:port] of the gateway when status.url's name does not resolve; sent with its Host header"
    )
    network_policy: bool = Field(
        True, description="render a NetworkPolicy per layer that admits only the peers its kind needs; false: none"
    )

    @field_validator("image", "staging_image")
    @classmethod
    def _pinned(cls, image: str | None) -> str | None:
        if image is None:
            return image
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        if not digest and (not tag or tag == "latest"):
            raise ValueError(f"image '{image}' must be pinned by a tag other than 'latest' or by a digest")
        return image


Platform = Annotated[Union[LocalPlatform, KubernetesPlatform], Field(discriminator="kind")]

# ------------------------------------------------------------------------------------------------- model


class BuiltSource(StrictModel):
    """The small Qwen2 model the project builds from a seed (random weights, its own tokenizer)."""

    kind: Literal["built"]
    shape: Literal["tiny"] = "tiny"
    seed: int = Field(0, ge=0, le=MAX_SEED)


class DummySource(StrictModel):
    """A config-only model served with ``--load-format dummy``: a known shape, or a directory."""

    kind: Literal["dummy"]
    shape: Literal["tiny", "qwen2.5-0.5b"] | None = None
    path: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the tokenizer's corpus when a shape is built")

    @model_validator(mode="after")
    def _one_of_shape_or_path(self) -> DummySource:
        if (self.shape is None) == (self.path is None):
            raise ValueError("give exactly one of 'shape' (built here) or 'path' (a config-only directory)")
        return self


class LocalDirSource(StrictModel):
    """A Hugging Face model directory on this machine."""

    kind: Literal["local"]
    path: str


class UriSource(StrictModel):
    """Weights a cluster reads: a PVC, a Hugging Face id or an OCI model image."""

    kind: Literal["uri"]
    uri: str = Field(pattern=r"^(pvc|hf|oci)://.+", description="pvc://claim/path, hf://org/model, oci://image")


ModelSource = Annotated[
    Union[BuiltSource, DummySource, LocalDirSource, UriSource], Field(discriminator="kind")
]

# One value per flag: a list would put several words after the flag, and a word starting with '--' is a flag
# of its own (how '--host 0.0.0.0' got past the managed-flag check).
EngineArgValue = Union[bool, int, float, str]


def _engine_arg_values(args: Any) -> Any:
    """Refuse an engine argument value that is not one scalar word, before its type is tried."""
    if not isinstance(args, dict):
        return args
    for key, value in args.items():
        name = studyfile.clip(key)
        if value is None:
            raise ValueError(f"'{name}' has no value; give one, or true for a flag without one")
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"'{name}' must be one value (text, a number or true/false), not a {type(value).__name__}")
        if isinstance(value, str) and value.lstrip().startswith("--"):
            raise ValueError(f"'{name}': a value may not start with '--' (each flag is a key of its own)")
        if isinstance(value, str) and any(ord(ch) < 32 for ch in value):
            raise ValueError(f"'{name}': the value holds a control character (a newline or NUL)")
    return args


def _managed_flag(flag: str) -> str | None:
    """The platform-owned flag ``flag`` names: itself, or one it abbreviates (argparse takes any unique prefix)."""
    return next((m for m in sorted(MANAGED_ENGINE_ARGS) if m.startswith(flag)), None)


class Model(StrictModel):
    """The one model spec every layer is deployed from."""

    name: str = Field(min_length=1, description="the model's own name, for the report")
    served_name: str = Field(min_length=1, description="the name clients put in 'model'")
    source: ModelSource
    engine_args: dict[str, EngineArgValue] = Field(
        default_factory=dict,
        description="vLLM server arguments without the leading dashes, e.g. max-model-len: 2048",
    )
    revision: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9.-]*$",
        max_length=20,
        description="a tag for this revision of the spec: the engine then answers as '<served_name>:<revision>' "
        "(vLLM names its first served name in every response) and still accepts served_name, so the "
        "responses tell two revisions apart",
    )

    @field_validator("engine_args", mode="before")
    @classmethod
    def _one_word_values(cls, args: Any) -> Any:
        return _engine_arg_values(args)

    @field_validator("engine_args")
    @classmethod
    def _normalise_engine_args(cls, args: dict[str, EngineArgValue]) -> dict[str, EngineArgValue]:
        normalised: dict[str, EngineArgValue] = {}
        for key, value in args.items():
            flag = key.lstrip("-").replace("_", "-")
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", flag):
                raise ValueError(f"'{studyfile.clip(key)}' is not a vLLM argument name")
            managed = _managed_flag(flag)
            if managed == flag:
                raise ValueError(f"'{key}' is set by the platform from the model spec; remove it")
            if managed:
                raise ValueError(f"'{key}' would be read as --{managed}, which the platform sets; remove it")
            if flag in normalised:
                raise ValueError(f"'{key}' is given twice (as {flag})")
            normalised[flag] = value
        return normalised

    def served_names(self) -> list[str]:
        """The ``--served-model-name`` values: the revision's name first, since vLLM answers with the first."""
        return [f"{self.served_name}:{self.revision}", self.served_name] if self.revision else [self.served_name]

    @model_validator(mode="after")
    def _dummy_owns_load_format(self) -> Model:
        if self.source.kind == "dummy" and "load-format" in self.engine_args:
            raise ValueError("a dummy source sets load-format itself; remove engine_args.load-format")
        return self


# ------------------------------------------------------------------------------------------------ layers


class LayerConfig(StrictModel):
    """The options of one layer of a study. Each serving-layer kind (``servinglab.layers``) subclasses this
    with its own options and ``kind: Literal["<its name>"]``; the study's layer union is built from the
    registered kinds."""

    kind: str


def layer_union() -> Any:
    """The registered kinds' option models as one union, told apart by ``kind``."""
    configs = tuple(k.config for k in layer_kinds.kinds())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------- workloads


class SmokeWorkload(StrictModel):
    """The requests of the smoke test (the source page's "Confirmed behavior")."""

    prompt: str = Field("Say hello in one short sentence.", min_length=1)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    timeout_s: float = Field(120.0, gt=0, le=LONGEST_WAIT_S)


# The most rate stages one saturation sweep runs: each is a whole stage, measured ``repeats`` times.
MAX_SWEEP_RATES = 100
OLD_SWEEP_KEY, SWEEP_KEY = "rate_sweep", "sweep"  # workloads.latency.<key>: the open-loop stages, old name and new


class RateSweep(StrictModel):
    """Open-loop stages (``workloads.latency.sweep``): requests arrive at a rate (Poisson, or gamma with a
    burstiness), either at rates the study lists or at rates a saturation sweep finds."""

    rates: list[float] = Field(default_factory=list, description="requests/s per stage; empty: no listed rates")
    saturation_rates: int = Field(
        0, ge=0, le=MAX_SWEEP_RATES,
        description="N > 0: a saturation sweep (GuideLLM's sweep): a synchronous stage (one request at a time), a "
        "throughput stage (num_prompts at once, up to max_concurrency), then N rate stages spaced linearly above "
        "the synchronous stage's measured rate up to the highest measured rate of a probe that stayed valid; "
        "0: none. Give it or rates, not both",
    )
    # Gamma gaps of shape burstiness and mean 1/rate: far outside this range they underflow to 0 or overflow.
    burstiness: float = Field(1.0, ge=0.01, le=100, description="gamma shape of the arrivals; 1: Poisson")
    num_prompts: int = Field(60, ge=1, le=MAX_STAGE_REQUESTS, description="requests per stage, warmups left out")
    max_concurrency: int | None = Field(
        None, ge=1, le=MAX_CONCURRENCY,
        description="requests in flight at most in a rate stage, and the throughput stage's concurrency "
        "(none: num_prompts at once)",
    )

    @field_validator("rates")
    @classmethod
    def _positive(cls, rates: list[float]) -> list[float]:
        if any(r <= 0 for r in rates):
            raise ValueError("every rate must be positive")
        if any(r > MAX_RATE_PER_S for r in rates):
            raise ValueError(f"every rate must be at most {MAX_RATE_PER_S:g} requests/s")
        return rates

    @model_validator(mode="after")
    def _rates_or_saturation(self) -> RateSweep:
        if self.rates and self.saturation_rates:
            raise ValueError("give rates (listed) or saturation_rates (found by a saturation sweep), not both")
        return self


class InClusterClient(StrictModel):
    """The load generator as an indexed Kubernetes Job: N pods, each a slice of every stage's schedule."""

    image: str | None = Field(
        None, description="the load generator's image (docker/loadgen), pinned; required with client: in-cluster"
    )
    # An indexed Job takes up to 10^5 completions (and Kubernetes' int32 for parallelism).
    pods: int = Field(2, ge=1, le=100_000, description="pods of the Job; each sends its share of a stage's requests")
    start_delay_s: float = Field(
        60.0, ge=0, le=LONGEST_WAIT_S,
        description="every pod starts its slice at the Job's creation + this (time to schedule and pull)",
    )
    cpu: str = Field("2", pattern=QUANTITY_PATTERN, description="CPU request and limit per pod")
    memory: str = Field("2Gi", pattern=QUANTITY_PATTERN, description="memory request and limit per pod")
    timeout_s: float = Field(
        3600.0, gt=0, le=LONGEST_WAIT_S,
        description="bound on one stage's Job from its creation (its activeDeadlineSeconds)",
    )
    insecure_skip_tls_verify: bool = Field(
        False, description="send to a layer that serves TLS with its own certificate (llm-d) without verifying it"
    )

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str | None) -> str | None:
        return KubernetesPlatform._pinned(image)

    @model_validator(mode="after")
    def _deadline_after_start(self) -> InClusterClient:
        if self.timeout_s <= self.start_delay_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) must exceed start_delay_s ({self.start_delay_s:g}): "
                             "the Job's deadline counts from its creation")  # fmt: skip
        return self


class ConversationWorkload(StrictModel):
    """Multi-turn sessions from a ShareGPT file: each conversation's user turns sent in order, each with the
    server's own earlier answers as history. Named after AIPerf's conversation options (``--conversation-num``,
    ``--conversation-turn-delay-mean``, ``-stddev``, ``-ratio``); the turns come from the file, as in AIPerf's
    file datasets, so its ``--conversation-turn-mean``/``-stddev`` have no counterpart but ``max_turns``."""

    num: int | None = Field(
        None, ge=1, le=MAX_STAGE_REQUESTS,
        description="sessions to run (AIPerf's --conversation-num), conversations drawn from the file by the seed "
        "and reused when it has fewer; null: each conversation of the file once",
    )  # fmt: skip
    max_turns: int | None = Field(
        None, ge=1, le=MAX_STAGE_REQUESTS, description="user turns of a conversation sent at most; null: all of them"
    )
    turn_delay_mean_ms: float = Field(
        0.0, ge=0, le=LONGEST_WAIT_S * 1000,
        description="think time between an answer and the next turn, mean of a normal truncated at 0; 0: none",
    )  # fmt: skip
    turn_delay_stddev_ms: float = Field(0.0, ge=0, le=LONGEST_WAIT_S * 1000, description="its standard deviation")
    turn_delay_ratio: float = Field(1.0, ge=0, le=1000, description="every think time multiplied by this")


class LatencyDataset(StrictModel):
    """What each latency stage sends, with ``vllm bench serve``'s flag names (``--random-prefix-len`` →
    ``random_prefix_len``). Values left out take vLLM's defaults; the random lengths default to
    ``workloads.latency.input_len`` and ``output_len``."""

    name: Literal["random", "sharegpt", "prefix_repetition", "custom"] = "random"
    path: str | None = Field(
        None, description="sharegpt: a local ShareGPT JSON file; custom: a JSONL of {prompt, max_tokens?}"
    )
    random_input_len: int | None = Field(None, ge=0, le=MAX_TOKENS)
    random_output_len: int | None = Field(None, ge=1, le=MAX_TOKENS)
    random_range_ratio: float | None = Field(None, ge=0, lt=1)
    random_prefix_len: int | None = Field(None, ge=0, le=MAX_TOKENS, description="tokens shared by every prompt")
    sharegpt_output_len: int | None = Field(None, ge=1, le=MAX_TOKENS, description="default: each answer's length")
    prefix_repetition_prefix_len: int | None = Field(None, ge=1, le=MAX_TOKENS, description="vLLM's default 256")
    prefix_repetition_suffix_len: int | None = Field(None, ge=0, le=MAX_TOKENS, description="vLLM's default 256")
    prefix_repetition_num_prefixes: int | None = Field(None, ge=1, le=MAX_STAGE_REQUESTS, description="default 10")
    prefix_repetition_output_len: int | None = Field(None, ge=1, le=MAX_TOKENS, description="vLLM's default 128")
    conversation: ConversationWorkload | None = Field(
        None, description="sharegpt only: send each conversation as a multi-turn session (servinglab bench "
        "--multi-turn); each closed-loop stage's concurrency is then sessions in flight, and every turn's max_tokens "
        "is sharegpt_output_len, or output_len when that is not given"
    )  # fmt: skip

    @model_validator(mode="after")
    def _needs_a_file(self) -> LatencyDataset:
        if self.name in ("sharegpt", "custom") and not self.path:
            raise ValueError(f"path: required with name {self.name} (a local file)")
        return self

    @model_validator(mode="after")
    def _conversations_are_sharegpt(self) -> LatencyDataset:
        # The sessions are a ShareGPT file's conversations: no other dataset has turns to send in order.
        if self.conversation is not None and self.name != "sharegpt":
            raise ValueError(f"conversation: only with name: sharegpt (the sessions are a ShareGPT file's "
                             f"conversations), not with name: {self.name}")  # fmt: skip
        return self


class LatencyWorkload(StrictModel):
    """The reference experiment by default: chat, 256 tokens in / 128 out, ignore_eos, seed 42."""

    input_len: int = Field(256, ge=1, le=MAX_TOKENS, description="prompt tokens before the chat template")
    output_len: int = Field(128, ge=1, le=MAX_TOKENS)
    ignore_eos: bool = True
    seed: int = Field(42, ge=0, le=MAX_SEED)
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32], description="closed-loop stages")
    prompts_per_concurrency: int = Field(
        10, ge=1, le=MAX_STAGE_REQUESTS, description="a stage sends this many × its concurrency ..."
    )
    min_prompts: int = Field(60, ge=1, le=MAX_STAGE_REQUESTS, description="... and at least this many")
    num_warmups: int = Field(
        0, ge=0, le=MAX_STAGE_REQUESTS, description="requests sent before each stage, left out of its metrics"
    )
    prompts_file: str | None = Field(
        None, description="JSONL of {prompt, max_tokens?} to send instead of random prompts (cycled to length)"
    )
    dataset: LatencyDataset | None = Field(
        None, description="what to send (vllm bench serve's --dataset-name and its flags); default: random prompts "
        "of input_len tokens, or the prompts_file"
    )
    stage_duration_s: float | None = Field(
        None, gt=0, le=LONGEST_WAIT_S, description="stop sending after this long in a stage"
    )
    request_timeout_s: float = Field(600.0, gt=0, le=LONGEST_WAIT_S)
    sweep: RateSweep = Field(
        default_factory=RateSweep, description="the open-loop stages: listed rates, or a saturation sweep "
        "(saturation_rates); read from rate_sweep, its old name, in older study files"
    )
    on_server_death: Literal["stop", "continue"] = Field(
        "stop", description="a stage whose server died ends the sweep (stop) or the next stage is tried"
    )
    repeats: int = Field(
        3, ge=1, le=100, description="times each stage is measured; its intervals resample the repeats, then the "
        "requests within each (one repeat: the intervals cover request-to-request variation only)"
    )
    workers: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", description="client processes per stage on this machine; auto: one per 8 concurrent streams, "
        "within the cores the engine leaves"
    )
    past_validity: bool = Field(
        False, description="go on to higher load after a stage that was not valid (client-limited, server-burst, "
        "too few samples); by default the sweep stops there, since higher load would only be less valid"
    )
    client: Literal["local", "in-cluster"] = Field(
        "local", description="where the load generator runs: this machine, or a Job in the cluster (in_cluster)"
    )
    in_cluster: InClusterClient = Field(default_factory=InClusterClient)

    @model_validator(mode="before")
    @classmethod
    def _old_sweep_name(cls, data: Any) -> Any:
        # A run recorded before the rename, validated as it is: read silently (load_study notes it in a file).
        if isinstance(data, dict) and OLD_SWEEP_KEY in data:
            if SWEEP_KEY in data:
                raise ValueError(f"give only {SWEEP_KEY} ({OLD_SWEEP_KEY} is its old name)")
            data = {(SWEEP_KEY if k == OLD_SWEEP_KEY else k): v for k, v in data.items()}
        return data

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, levels: list[int]) -> list[int]:
        if any(c < 1 for c in levels):
            raise ValueError("every concurrency must be at least 1")
        if any(c > MAX_CONCURRENCY for c in levels):
            raise ValueError(f"every concurrency must be at most {MAX_CONCURRENCY}")
        return levels

    @model_validator(mode="after")
    def _sessions_in_closed_loops(self) -> LatencyWorkload:
        # Multi-turn sessions are measured in the closed-loop stages only: an open loop's rate and a saturation
        # sweep's probes count requests/s, which a session of several turns is not; warmups would be single
        # requests; and the in-cluster Job sends single requests.
        if self.dataset is None or self.dataset.conversation is None:
            return self
        clashes = [(self.sweep.rates, "sweep.rates: must be empty"),
                   (self.sweep.saturation_rates, "sweep.saturation_rates: must be 0"),
                   (self.num_warmups, "num_warmups: must be 0"),
                   (self.client != "local", "client: must be local (the sessions are sent from this machine)")]  # fmt: skip
        for clash, problem in clashes:
            if clash:
                raise ValueError(f"dataset.conversation: multi-turn sessions run in the closed-loop stages only "
                                 f"(concurrency: sessions in flight), so {problem}")  # fmt: skip
        if not self.concurrency:
            raise ValueError("dataset.conversation: concurrency: empty, so no stage would send the sessions")
        return self

    @model_validator(mode="after")
    def _one_dataset(self) -> LatencyWorkload:
        if self.dataset is not None and self.prompts_file:
            raise ValueError("give dataset or prompts_file, not both (prompts_file is dataset: {name: custom, path: ...})")
        prefixes = self.dataset_spec().prefix_repetition_num_prefixes
        smallest = min([max(self.min_prompts, self.prompts_per_concurrency * c) for c in self.concurrency]
                       + ([self.sweep.num_prompts] if (self.sweep.rates or self.sweep.saturation_rates) else []), default=prefixes)  # fmt: skip
        if self.dataset is not None and self.dataset.name == "prefix_repetition" and smallest < prefixes:
            raise ValueError(f"dataset.prefix_repetition_num_prefixes: {prefixes} prefixes, but a stage sends only "
                             f"{smallest} requests; each prefix needs at least one")  # fmt: skip
        return self

    def dataset_spec(self, resolve: Any = Path):
        """The workload's dataset (:class:`servinglab.measure.workload.Dataset`), its path made absolute by
        ``resolve`` (the study's ``resolve_path``) and values left out at their defaults."""
        from .measure.datasets import Dataset

        if self.dataset is None:
            legacy = {"name": "custom", "path": str(resolve(self.prompts_file))} if self.prompts_file else {}
            return Dataset(**legacy, random_input_len=self.input_len, random_output_len=self.output_len)
        # The conversation says how the file is sent (sessions), not what a single request is.
        given = {k: v for k, v in self.dataset.model_dump(exclude={"conversation"}).items() if v is not None}
        given.setdefault("random_input_len", self.input_len)
        given.setdefault("random_output_len", self.output_len)
        if self.dataset.path:
            given["path"] = str(resolve(self.dataset.path))
        return Dataset(**given)

    @model_validator(mode="after")
    def _stage_sizes(self) -> LatencyWorkload:
        largest = max(self.concurrency, default=1) * self.prompts_per_concurrency
        if largest > MAX_STAGE_REQUESTS:
            raise ValueError(f"a stage would send {largest} requests (concurrency × prompts_per_concurrency); "
                             f"at most {MAX_STAGE_REQUESTS}")  # fmt: skip
        return self


LIFECYCLE_EXPERIMENTS = ("time_to_ready", "model_update", "canary", "scale_to_zero", "gateway_hop")


class LifecycleWorkload(StrictModel):
    """The operational experiments of 40_lifecycle: what each changes, how often, under which load."""

    experiments: list[Literal["time_to_ready", "model_update", "canary", "scale_to_zero", "gateway_hop"]] = Field(
        default_factory=lambda: list(LIFECYCLE_EXPERIMENTS), description="the experiments to run, in this order"
    )
    repeats: int = Field(
        3, ge=1, le=100, description="time-to-ready cycles per layer, each a teardown and a fresh start"
    )
    update_engine_args: dict[str, EngineArgValue] = Field(
        default_factory=lambda: {"max-num-seqs": 128},
        description="the change a model update and a canary make to the engine arguments",
    )
    prompt: str = Field("Count from one to twenty.", min_length=1, description="the prompt of every request here")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS, description="output tokens per request (ignore_eos)")
    request_timeout_s: float = Field(120.0, gt=0, le=LONGEST_WAIT_S)
    # The sender yields to its requests only between arrivals: a steady load, not a stress test.
    steady_rate: float = Field(
        2.0, gt=0, le=1000, description="requests/s sent while a layer changes (Poisson, seeded)"
    )
    baseline_s: float = Field(
        10.0, gt=0, le=LONGEST_WAIT_S, description="steady load measured before a change, for comparison"
    )
    canary_percent: int = Field(20, ge=1, le=99, description="share of the requests the new revision should get")
    canary_requests: int = Field(
        200, ge=10, le=MAX_STAGE_REQUESTS, description="requests whose answering revision is counted"
    )
    hop_requests: int = Field(
        40, ge=4, le=MAX_STAGE_REQUESTS, description="requests per path in the gateway-vs-direct comparison"
    )
    warm_requests: int = Field(
        5, ge=1, le=MAX_STAGE_REQUESTS, description="requests on a warm layer, the cold start's comparison"
    )
    scale_to_zero_timeout_s: float = Field(
        900.0, gt=0, le=LONGEST_WAIT_S, description="longest wait for a layer to reach zero pods"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every confidence interval")
    seed: int = Field(7, ge=0, le=MAX_SEED)
    on_interrupt: Literal["restore", "teardown"] = Field(
        "restore",
        description="after an interrupted or failed experiment: put the layer back as the study specifies it, "
        "or delete it",
    )

    @field_validator("update_engine_args", mode="before")
    @classmethod
    def _one_word_values(cls, args: Any) -> Any:
        return _engine_arg_values(args)

    @field_validator("update_engine_args")
    @classmethod
    def _update_args(cls, args: dict[str, EngineArgValue]) -> dict[str, EngineArgValue]:
        return Model._normalise_engine_args(args)


class RoutingWorkload(StrictModel):
    """The routing experiment: per layer, one closed-loop stage whose prompts start with shared prefixes and
    one of the same lengths without, so the prefix-cache hit rate, the requests each replica served and the
    TTFT can be set side by side. Random tokens, counted as ``vllm bench serve --random-prefix-len`` counts
    them: a prompt is ``prefix_len + input_len`` tokens."""

    prefix_len: int = Field(
        512, ge=1, le=MAX_TOKENS,
        description="tokens every prompt of a group starts with (vLLM's CPU build caches in blocks of 128 tokens, "
        "GPUs in blocks of 16: a prefix shorter than a block is never a hit)",
    )
    num_prefixes: int = Field(
        1, ge=1, le=MAX_STAGE_REQUESTS, description="distinct shared prefixes; prompt i starts with prefix i mod this"
    )
    input_len: int = Field(128, ge=1, le=MAX_TOKENS, description="random tokens after the prefix, new in every prompt")
    output_len: int = Field(32, ge=1, le=MAX_TOKENS)
    concurrency: int = Field(8, ge=1, le=MAX_CONCURRENCY, description="requests in flight in both stages")
    num_prompts: int = Field(64, ge=1, le=MAX_STAGE_REQUESTS, description="requests in each of the two stages")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="prompts of the shared stage; the other stage takes seed + 1")


class Workloads(StrictModel):
    smoke: SmokeWorkload = Field(default_factory=SmokeWorkload)
    latency: LatencyWorkload = Field(default_factory=LatencyWorkload)
    lifecycle: LifecycleWorkload = Field(default_factory=LifecycleWorkload)
    routing: RoutingWorkload | None = Field(
        None, description="the routing experiment of 30_latency (shared prefixes against none); empty: not run"
    )


class Costs(StrictModel):
    """Prices that turn measured throughput into cost. Empty: no cost figures."""

    currency: str = Field("USD", min_length=1, max_length=8)
    gpu_hourly: float | None = Field(None, gt=0, description="price of one GPU for an hour")
    replica_hourly: float | None = Field(
        None, gt=0, description="price of one whole replica for an hour (instead of gpu_hourly × GPUs per replica; "
        "the way to price a CPU machine)"
    )



class Goodput(StrictModel):
    """Per-request objectives: a request counts towards goodput when it meets every one given."""

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2el_ms: float | None = Field(None, gt=0)

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Telemetry(StrictModel):
    """Where GPU telemetry comes from: a Prometheus server (for example scraping a DCGM exporter)."""

    prometheus_url: str | None = Field(None, pattern=r"^https?://")
    queries: dict[str, str] = Field(
        default_factory=lambda: {
            "gpu_utilization_pct": "avg(DCGM_FI_DEV_GPU_UTIL)",
            "gpu_memory_used_mib": "sum(DCGM_FI_DEV_FB_USED)",
        },
        description="name → PromQL; each is averaged and maximised over every stage's time window",
    )


class Slos(StrictModel):
    """Service level objectives; the report tests measurements against them. Empty means no objective."""

    goodput: Goodput = Field(default_factory=Goodput)

    ttft_ms_p95: float | None = Field(None, gt=0)
    tpot_ms_p95: float | None = Field(None, gt=0)
    e2e_ms_p95: float | None = Field(None, gt=0)
    time_to_ready_s: float | None = Field(None, gt=0)
    cold_start_s: float | None = Field(None, gt=0)
    update_failed_requests: int | None = Field(
        None, ge=0, le=MAX_STAGE_REQUESTS,
        description="most requests a model update may fail under the steady load (0: no downtime)",
    )


class Auth(StrictModel):
    """Where the API key comes from. Only the source is ever recorded, never the key."""

    api_key_env: str | None = Field(None, description="name of the environment variable that holds the key")
    api_key_file: str | None = None

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _a_variable_name(cls, name: Any) -> Any:
        # A key pasted here instead of a name is the likeliest mistake: say what is wrong, never what was given.
        if name is not None and not (isinstance(name, str) and re.fullmatch(ENV_NAME_PATTERN, name)):
            raise ValueError("must name an environment variable (letters, digits and '_'), not hold the key; "
                             "the value is not shown in case it is one")  # fmt: skip
        return name

    @model_validator(mode="after")
    def _at_most_one(self) -> Auth:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self


class ClientSettings(StrictModel):
    """How the measuring clients (smoke, load, lifecycle traffic) reach the servers under test.

    Nothing here comes from the environment: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY`` and
    ``SSL_CERT_FILE`` are ignored, since a proxy would see the bearer key and add its hop to every latency.
    """

    proxy: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", description="http(s):// proxy the clients go through; empty: none"
    )
    ca_file: str | None = Field(None, description="PEM file of the CAs that sign the servers' certificates; "
                                "empty: the system's CAs")  # fmt: skip
    tls_verify: dict[str, bool] = Field(
        default_factory=dict,
        description="layer name → false to send requests without checking its server's certificate (llm-d's "
        "workload serves a certificate of its own); every layer not named is checked",
    )
    allow_plain_http_key: list[str] = Field(
        default_factory=list,
        description="layers whose API key may go over plain http:// to an address other than this machine's "
        "loopback (anyone on the path can read it); every layer not named is refused",
    )


class RunSettings(StrictModel):
    """How ``servinglab run`` executes the notebooks."""

    notebooks: list[str] | None = Field(None, description="notebook names in order; empty: all, sorted")
    parameters: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-notebook parameters, checked against its parameters cell"
    )
    teardown: Literal["always", "never"] = Field("always", description="stop every layer when the batch ends")


class Paths(StrictModel):
    """Where results go. Relative paths are relative to the project folder (the one holding params/)."""

    runs_dir: str = "runs"
    reports_dir: str = "reports"
    cache_dir: str = Field("~/.cache/servinglab", description="built models and the local server registry")


class Study(StrictModel):
    """A whole study: what to deploy, on which platform, and how to measure it."""

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Study:  # type: ignore[override]
        """Validate through the schema whose layer union holds every registered kind (:func:`study_model`)."""
        if cls is Study:
            return study_model().model_validate(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)

    study: str = Field(pattern=NAME_PATTERN, max_length=40)
    description: str = ""
    platform: Platform
    model: Model
    layers: dict[str, LayerConfig] = Field(min_length=1)  # each validated by its kind's model: study_model()
    compare_models: dict[str, Model] = Field(
        default_factory=dict,
        description="further models, by a short name, each a spec like 'model': never deployed, only rendered "
        "on every layer beside 'model', so the report can count what changes in the manifests from model to model",
    )
    workloads: Workloads = Field(default_factory=Workloads)
    slos: Slos = Field(default_factory=Slos)
    costs: Costs = Field(default_factory=Costs)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    auth: Auth = Field(default_factory=Auth)
    client: ClientSettings = Field(default_factory=ClientSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    paths: Paths = Field(default_factory=Paths)

    _source_file: Path = PrivateAttr(default=Path("."))
    _sources: list[str] = PrivateAttr(default_factory=list)

    @field_validator("layers", "compare_models")
    @classmethod
    def _names(cls, entries: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Both become parts of Kubernetes object names.
        what = "layer" if info.field_name == "layers" else "model"
        for name in entries:
            if not re.fullmatch(NAME_PATTERN, name) or len(name) > 40:
                raise ValueError(f"{what} name '{name}' must be lowercase letters, digits and '-', at most 40")
        return entries

    @model_validator(mode="after")
    def _client_names_layers(self) -> Study:
        for key, names in (("tls_verify", list(self.client.tls_verify)),
                           ("allow_plain_http_key", self.client.allow_plain_http_key)):  # fmt: skip
            unknown = [n for n in names if n not in self.layers]
            if unknown:
                raise ValueError(f"client.{key}: unknown layer {', '.join(repr(n) for n in unknown)}; "
                                 f"the study defines {', '.join(self.layers)}")  # fmt: skip
        return self

    @field_validator("model")
    @classmethod
    def _source_fits_platform(cls, model: Model, info: ValidationInfo) -> Model:
        platform = info.data.get("platform")
        if platform is not None and platform.kind == "local" and model.source.kind == "uri":
            raise ValueError(
                f"source uri '{model.source.uri}' needs platform: kubernetes; "
                "on the local platform use source kind built, dummy or local"
            )
        return model

    # --- derived values (never stored in the file) ---------------------------------------------------

    @property
    def source_file(self) -> Path:
        return self._source_file

    @property
    def sources(self) -> list[str]:
        """Where the values came from, in merge order (file paths and ``--set`` items)."""
        return list(self._sources)

    @property
    def project_dir(self) -> Path:
        """The folder relative paths are resolved against: the parent of ``params/``."""
        parent = self._source_file.parent
        return parent.parent if parent.name == "params" else parent

    def resolve_path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.project_dir / path).resolve()

    @property
    def runs_dir(self) -> Path:
        return self.resolve_path(self.paths.runs_dir)

    @property
    def reports_dir(self) -> Path:
        return self.resolve_path(self.paths.reports_dir)

    @property
    def cache_dir(self) -> Path:
        return self.resolve_path(self.paths.cache_dir)

    def select_layers(self, names: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """The layers named (all when empty), in study order; an unknown name is a ParamsError."""
        if not names:
            return dict(self.layers)
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            raise ParamsError(
                f"{self._source_file}: layers: unknown layer {', '.join(repr(n) for n in unknown)}; "
                f"the study defines {', '.join(self.layers)}"
            )
        return {n: self.layers[n] for n in self.layers if n in names}

    def api_key(self) -> str | None:
        """The API key, read now from its source. Never store or print the value."""
        if self.auth.api_key_env:
            value = os.environ.get(self.auth.api_key_env)
            return checked_api_key(value, f"environment variable {self.auth.api_key_env}") if value else None
        if self.auth.api_key_file:
            return read_api_key_file(self.resolve_path(self.auth.api_key_file))
        return None

    def tls_verify(self, layer_name: str) -> bool | str:
        """How a client checks the layer's certificate: False (not at all, as ``client.tls_verify`` names
        the layer), the CA file ``client.ca_file`` names, or True (the system's CAs)."""
        if not self.client.tls_verify.get(layer_name, True):
            return False
        return str(self.resolve_path(self.client.ca_file)) if self.client.ca_file else True

    def revised(self, engine_args: dict[str, Any], revision: str | None) -> Study:
        """The same study with the model's engine arguments changed and its revision tagged (a model update)."""
        model = Model.model_validate(
            self.model.model_dump() | {"engine_args": {**self.model.engine_args, **engine_args}, "revision": revision}
        )
        changed = self.model_copy(deep=True)
        changed.model = model
        return changed

    def resolved(self) -> dict[str, Any]:
        """The merged study as plain data (what run.json records); holds no secret by construction."""
        return self.model_dump(mode="json")


_STUDY_MODELS: dict[int, type[Study]] = {}


def study_model() -> type[Study]:
    """The study schema for the kinds registered now: :class:`Study` with its layers as their union.

    Rebuilt when a kind is registered (a plug-in, a test's own kind), so a study may use it at once.
    """
    generation = layer_kinds.generation()
    if generation not in _STUDY_MODELS:
        _STUDY_MODELS.clear()
        _STUDY_MODELS[generation] = create_model(
            "Study", __base__=Study, __module__=__name__, layers=(dict[str, layer_union()], Field(min_length=1))
        )
    return _STUDY_MODELS[generation]


# ------------------------------------------------------------------------------------------------ loading


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    # Size, encoding, duplicate keys, nesting and aliases are refused there, before anything is built.
    return studyfile.read_mapping(path, what)


def parse_set_items(items: list[str] | tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``["a.b=1"]`` → ``[("--set a.b=1", {"a": {"b": 1}})]``; values are YAML scalars or lists."""
    parsed = []
    for item in items:
        label = f"--set {studyfile.clip(item, 100)}"
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"{label}: expected dotted.key=value")
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ParamsError(f"{label}: '{key}' has an empty part between dots")
        if len(parts) > studyfile.MAX_DEPTH:
            raise ParamsError(f"--set {studyfile.clip(key)}: more than {studyfile.MAX_DEPTH} parts between dots")
        # A value that is not YAML is quoted in the error, unless it belongs where a key may have been pasted.
        where = _without_value(label) if _not_echoed(parts) else label
        value = studyfile.parse_text(raw, where) if raw.strip() else ""
        tree: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            tree = {part: tree}
        parsed.append((label, tree))
    return parsed


def migrate_rate_sweep(
    sources: list[tuple[str, dict[str, Any]]], note: Callable[[str], None] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Each source with ``workloads.latency.rate_sweep`` (the old name) read as ``workloads.latency.sweep``.

    Parameters
    ----------
    sources : list of (label, data)
        The study's sources in merge order (file, override file, ``--set`` items), each as read.
    note : callable, optional
        Gets one deprecation line per source that used the old name (default: standard error).

    Raises
    ------
    ParamsError
        When one source gives both names: which one it means cannot be told.
    """
    say = note or (lambda line: print(line, file=sys.stderr))
    migrated = []
    for label, data in sources:
        workloads = data.get("workloads") if isinstance(data, dict) else None
        latency = workloads.get("latency") if isinstance(workloads, dict) else None
        if not isinstance(latency, dict) or OLD_SWEEP_KEY not in latency:
            migrated.append((label, data))
            continue
        if SWEEP_KEY in latency:
            raise ParamsError(f"{label}: workloads.latency.{OLD_SWEEP_KEY} and workloads.latency.{SWEEP_KEY}: "
                              f"give only {SWEEP_KEY} ({OLD_SWEEP_KEY} is its old name)")  # fmt: skip
        say(f"servinglab: note: {label}: workloads.latency.{OLD_SWEEP_KEY} is now workloads.latency.{SWEEP_KEY}; "
            "read as that (rename it)")  # fmt: skip
        renamed = {(SWEEP_KEY if k == OLD_SWEEP_KEY else k): v for k, v in latency.items()}
        migrated.append((label, data | {"workloads": workloads | {"latency": renamed}}))
    return migrated


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in ``top`` replaces what ``base`` had.

    A mapping whose ``kind`` differs from the one below it replaces it whole: switching a model source
    from ``built`` to ``local`` must not keep ``shape`` and ``seed`` from the study file.
    """
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and value.get("kind", below.get("kind")) == below.get("kind"):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _defines(data: Any, path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _field_names(tp: Any) -> list[str]:
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_variants(tp: Any) -> dict[str, type[BaseModel]]:
    """For a discriminated union: tag value → model class."""
    variants = {}
    for arg in typing.get_args(_unwrap(tp)):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "kind" in arg.model_fields:
            for tag in typing.get_args(arg.model_fields["kind"].annotation):
                variants[tag] = arg
    return variants


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the schema: (display path, type at the end)."""
    tp: Any = study_model()
    shown: list[str] = []
    for part in loc:
        tp = _unwrap(tp)
        variants = _union_variants(tp)
        if variants and part in variants:
            tp = variants[part]  # pydantic puts the union's tag into the location; the file does not
            continue
        tp = _optional_member(tp)
        if _is_plain_union(tp) or (tp is None and _PYDANTIC_MEMBER.fullmatch(str(part))):
            # ... and for a plain union, the member it tried ('bool', 'int', "literal['auto']"): not a key either.
            tp = _member_named(tp, str(part))
            continue
        shown.append(str(part))
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            tp = None
    return shown, _optional_member(_unwrap(tp))


# The names pydantic gives union members and wrapped validators in an error's location.
_PYDANTIC_MEMBER = re.compile(r"[a-z]+(-[a-z]+)*\[.*\]")


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return []
    return [a for a in typing.get_args(tp) if a is not type(None)]


def _optional_member(tp: Any) -> Any:
    """``X | None`` → ``X``: pydantic names no member for it."""
    members = _union_members(tp)
    return _unwrap(members[0]) if len(members) == 1 else tp


def _is_plain_union(tp: Any) -> bool:
    return len(_union_members(tp)) > 1


def _member_named(tp: Any, tag: str) -> Any:
    """The member of a plain union that pydantic's location ``tag`` names, when it can be told; else None."""
    for member in _union_members(tp):
        plain = _unwrap(member)
        name = getattr(typing.get_origin(plain) or plain, "__name__", "").lower()
        if name and (tag == name or tag.startswith(f"{name}[")):
            return plain
    return None


def _describe(error: dict[str, Any]) -> tuple[list[str], str]:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        shown, _ = _walk(loc)
        _, parent = _walk(loc[:-1])
        known = _field_names(parent)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return shown, f"unknown key{hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        shown, tp = _walk(loc)
        tags = ", ".join(_union_variants(tp)) or ", ".join(k.name for k in layer_kinds.kinds())
        shown = shown + ["kind"]
        if kind == "union_tag_not_found":
            return shown, f"required key is missing; expected one of {tags}"
        given = error.get("ctx", {}).get("tag", "?")
        what = "layer kind" if shown[:1] == ["layers"] else "kind"
        return shown, f"unknown {what} {given}; expected one of {tags}"
    shown, _ = _walk(loc)
    message = error["msg"]
    if kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    return shown, studyfile.clip(message, 300)


def _given(error: dict[str, Any]) -> str:
    """`` (got 'many')`` for a wrong scalar; nothing for a mapping or list, or where the message says it."""
    if "input" not in error or error["type"] in ("missing", "value_error") or isinstance(error["input"], (dict, list)):
        return ""
    return f" (got {studyfile.clip(repr(error['input']))})"


def load_study(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    override_file: str | os.PathLike | None = None,
) -> Study:
    """Read, merge and validate a study.

    Parameters
    ----------
    path : path
        The study file, for example ``params/local.yaml``.
    overrides : list of str
        ``dotted.key=value`` items applied last, as ``--set`` does on the command line.
    override_file : path, optional
        A YAML file merged over the study file. Defaults to the file named by ``SERVINGLAB_OVERRIDES``.

    Raises
    ------
    ParamsError
        Naming the file (or ``--set`` item), the key and the problem, for every problem found.
    """
    study_path = Path(path).resolve()
    sources: list[tuple[str, dict[str, Any]]] = [(str(study_path), _read_yaml(study_path, "study file"))]
    if override_file is None and os.environ.get(OVERRIDES_ENV):
        override_file = os.environ[OVERRIDES_ENV]
    if override_file:
        override_path = Path(override_file).resolve()
        label = f"{OVERRIDES_ENV}" if str(override_file) == os.environ.get(OVERRIDES_ENV) else "override file"
        sources.append((str(override_path), _read_yaml(override_path, f"override file (from {label})")))
    sources.extend(parse_set_items(overrides))
    _check_finite(sources)  # before the rename, so that the error names the key as the file spells it
    sources = migrate_rate_sweep(sources)

    merged: dict[str, Any] = {}
    for _, data in sources:
        merged = deep_merge(merged, data)

    try:
        study = Study.model_validate(merged)
    except ValidationError as exc:
        lines = _error_lines(exc, sources)
        raise ParamsError(lines[0] if len(lines) == 1 else "invalid study\n  " + "\n  ".join(lines)) from None

    study._source_file = study_path
    study._sources = [label for label, _ in sources]
    _check_files(study, sources)
    _check_client(study, sources)
    _check_local_key_transport(study, sources)
    return study


def _error_lines(exc: ValidationError, sources: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One ``origin: key: problem`` line per key; a union's members' complaints about one key share a line."""
    by_key: dict[tuple[str, str], list[str]] = {}
    given: dict[tuple[str, str], str] = {}
    for error in exc.errors():
        shown, message = _describe(dict(error))
        place = (_origin(sources, tuple(shown)), ".".join(shown) or "(top level)")
        if message not in by_key.setdefault(place, []):
            by_key[place].append(message)
        given.setdefault(place, "" if _not_echoed(shown) else _given(dict(error)))
    lines = []
    for (origin, key), messages in by_key.items():
        lines.append(f"{origin}: {key}: {'; or '.join(messages)}{given[(origin, key)]}")
    return lines


def _non_finite(data: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], float] | None:
    """The first .inf or .nan in ``data`` and where it is."""
    if isinstance(data, float) and not math.isfinite(data):
        return path, data
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in children:
        found = _non_finite(value, (*path, str(key)))
        if found:
            return found
    return None


def _check_finite(sources: list[tuple[str, dict[str, Any]]]) -> None:
    """.inf and .nan pass every range check, and keys typed Any take them too: no study number may be either."""
    for label, data in sources:
        found = _non_finite(data)
        if found:
            path, value = found
            raise ParamsError(f"{label}: {'.'.join(path)}: {value} is not a finite number")


# Keys whose values are not repeated in an error: a key pasted into them must not reach a terminal or a log.
_NOT_ECHOED = (("auth",), ("platform", "env"))


def _not_echoed(path: tuple[str, ...] | list[str]) -> bool:
    return any(tuple(path[: len(prefix)]) == prefix for prefix in _NOT_ECHOED)


def _check_local_key_transport(study: Study, sources: list[tuple[str, dict[str, Any]]]) -> None:
    """A local server's address is known now: a key bound for another machine over http:// is refused here."""
    if study.platform.kind != "local" or not (study.auth.api_key_env or study.auth.api_key_file):
        return
    for layer in study.layers:
        origin = _origin(sources, ("platform", "host"))
        host = f"[{study.platform.host}]" if ":" in study.platform.host else study.platform.host
        refuse_plain_http_key(f"{origin}: platform.host (layer {layer})", f"http://{host}",
                              "set", layer in study.client.allow_plain_http_key, ParamsError)  # fmt: skip



def load_resolved(params: dict[str, Any], study_file: str | os.PathLike, sources: list[str], label: str) -> Study:
    """A study from what :meth:`Study.resolved` gave when it was loaded (a run's frozen params segment).

    Parameters
    ----------
    params : dict
        The resolved study: every source already merged, so no override file or ``--set`` is applied again.
    study_file : path
        The study file it was loaded from: relative paths resolve against its project folder as they did then.
    sources : list of str
        Where its values came from, in merge order, as recorded then.
    label : str
        The file the values are read from now (the segment), named in errors.
    """
    try:
        study = Study.model_validate(params)
    except ValidationError as exc:
        lines = [f"{label}: {'.'.join(_describe(e)[0]) or '(top level)'}: {_describe(e)[1]}" for e in exc.errors()]
        raise ParamsError("invalid study\n  " + "\n  ".join(lines)) from None
    study._source_file = Path(study_file)
    study._sources = list(sources)
    _check_files(study, [(label, params)])
    _check_client(study, [(label, params)])
    return study

def _origin(sources: list[tuple[str, dict[str, Any]]], path: tuple[str, ...]) -> str:
    """The last source in merge order that sets ``path`` (or, for a missing key, its nearest parent)."""
    for length in range(len(path), 0, -1):
        for label, data in reversed(sources):
            if _defines(data, path[:length]):
                return _without_value(label) if _not_echoed(path) else label
    return sources[0][0]


def _without_value(label: str) -> str:
    """``--set auth.api_key_env=sk-…`` → ``--set auth.api_key_env=(not shown)``; file paths stay as they are."""
    key, sep, _ = label.partition("=")
    return f"{key}=(not shown)" if label.startswith("--set ") and sep else label


def _check_client(study: Study, sources: list[tuple[str, dict[str, Any]]]) -> None:
    """An in-cluster load generator needs a cluster and an image to run."""
    latency = study.workloads.latency
    if latency.client != "in-cluster":
        return
    origin = _origin(sources, ("workloads", "latency", "client"))
    if study.platform.kind != "kubernetes":
        raise ParamsError(
            f"{origin}: workloads.latency.client: in-cluster runs the load generator as a Kubernetes Job and needs "
            f"platform: kubernetes (the platform is {study.platform.kind}); use client: local"
        )
    if not latency.in_cluster.image:
        raise ParamsError(
            f"{origin}: workloads.latency.in_cluster.image: required with client: in-cluster (the load generator's "
            "image, built from docker/loadgen and pushed where the cluster pulls from)"
        )
    # The pods are given no CA for a workload's own certificate: verifying it would fail every request,
    # so skipping the check must be asked for by name, never assumed.
    own_tls = [name for name, layer in study.layers.items() if layer_kinds.of(layer).serves_tls]
    if own_tls and not latency.in_cluster.insecure_skip_tls_verify:
        raise ParamsError(
            f"{origin}: workloads.latency.in_cluster.insecure_skip_tls_verify: layers {', '.join(own_tls)} serve TLS "
            "with a certificate of their own that the load pods cannot verify; set it to true to send without "
            "verification (the report says so), or measure them with client: local"
        )


def _check_dataset_file(study: Study, sources: list[tuple[str, dict[str, Any]]]) -> None:
    """A dataset file must be a file of bounded size, and read as its format says, before anything starts."""
    dataset = study.workloads.latency.dataset
    if dataset is None or not dataset.path:
        return
    from .measure.sharegpt import MAX_SHAREGPT_BYTES
    from .measure.datasets import check_file

    origin = _origin(sources, ("workloads", "latency", "dataset", "path"))
    path = study.resolve_path(dataset.path)
    if not path.is_file():
        raise ParamsError(f"{origin}: workloads.latency.dataset.path: {path}: "
                          f"{'not a file' if path.exists() else 'file not found'}")  # fmt: skip
    if path.stat().st_size > MAX_SHAREGPT_BYTES:
        raise ParamsError(f"{origin}: workloads.latency.dataset.path: {path}: larger than {MAX_SHAREGPT_BYTES} bytes")
    try:
        check_file(study.workloads.latency.dataset_spec(study.resolve_path))
        if dataset.conversation is not None:
            _check_sessions(path)
    except ParamsError as exc:
        raise ParamsError(f"{origin}: workloads.latency.dataset.path: {exc}") from None


def _check_sessions(path: Path) -> None:
    """A conversation dataset must have a session to send now, not when its first stage starts."""
    from .measure.sharegpt import USER_ROLES, read_conversations

    if not any(role in USER_ROLES for turns in read_conversations(path) for role, _ in turns):
        raise ParamsError(f"{path}: no conversation has a human turn to send")


def _check_files(study: Study, sources: list[tuple[str, dict[str, Any]]]) -> None:
    """Files and variables the study points at must exist now, not halfway through a run."""
    source = study.model.source
    if source.kind in ("local", "dummy") and getattr(source, "path", None):
        directory = study.resolve_path(source.path)
        if not (directory / "config.json").is_file():
            problem = "directory not found" if not directory.exists() else "no config.json in it"
            origin = _origin(sources, ("model", "source", "path"))
            raise ParamsError(f"{origin}: model.source.path: {directory}: {problem}")
    prompts = study.workloads.latency.prompts_file
    if prompts and not study.resolve_path(prompts).is_file():
        origin = _origin(sources, ("workloads", "latency", "prompts_file"))
        raise ParamsError(f"{origin}: workloads.latency.prompts_file: {study.resolve_path(prompts)}: file not found")
    _check_dataset_file(study, sources)
    if study.auth.api_key_file and not study.resolve_path(study.auth.api_key_file).is_file():
        origin = _origin(sources, ("auth", "api_key_file"))
        raise ParamsError(
            f"{origin}: auth.api_key_file: no such file (relative paths start at {study.project_dir}; "
            "the value is not shown in case a key was pasted instead of a path)"
        )
    if study.auth.api_key_file:
        try:
            read_api_key_file(study.resolve_path(study.auth.api_key_file))
        except ParamsError as exc:
            raise ParamsError(f"{_origin(sources, ('auth', 'api_key_file'))}: auth.api_key_file: {exc}") from None
    if study.auth.api_key_env and os.environ.get(study.auth.api_key_env):
        try:
            study.api_key()
        except ParamsError as exc:
            raise ParamsError(f"{_origin(sources, ('auth', 'api_key_env'))}: auth.api_key_env: {exc}") from None
    if study.client.ca_file and not study.resolve_path(study.client.ca_file).is_file():
        origin = _origin(sources, ("client", "ca_file"))
        raise ParamsError(f"{origin}: client.ca_file: {study.resolve_path(study.client.ca_file)}: file not found")
    if study.auth.api_key_env and not os.environ.get(study.auth.api_key_env):
        origin = _origin(sources, ("auth", "api_key_env"))
        raise ParamsError(
            f"{origin}: auth.api_key_env: environment variable {study.auth.api_key_env} is not set or empty"
        )
