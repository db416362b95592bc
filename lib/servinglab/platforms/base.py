"""What every platform offers the notebooks: deploy, reach, stop, and say what it has."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed layer answers the OpenAI API."""

    layer: str
    base_url: str  # ends in /v1
    served_name: str
    # The key is read when needed and kept out of repr, so printing an endpoint never shows it.
    api_key: str | None = field(default=None, repr=False, compare=False)
    headers: dict[str, str] = field(default_factory=dict, compare=False)  # e.g. Host, through a gateway by IP
    # False only for a TLS endpoint reached through an authenticated tunnel whose certificate is the
    # server's own (llm-d's workload over a port-forward).
    verify_tls: bool = field(default=True, compare=False)
    via: str = "direct"  # the path the requests take: direct, port-forward, gateway or in-cluster

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")


@dataclass
class Deployment:
    """The outcome of ensuring one layer: what the deploy notebook records per layer."""

    layer: str
    kind: str
    platform: str
    status: str  # ready | unsupported | failed
    reason: str | None = None
    reused: bool = False
    spec_hash: str | None = None
    base_url: str | None = None
    time_to_ready_s: float | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    started_at: str | None = None
    ready_at: str | None = None
    pid: int | None = None
    log_path: str | None = None
    command: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # what servinglab wrote: Kind/name (cluster platforms)
    created: list[str] = field(default_factory=list)  # what the platform's controllers made of it: Kind/name
    processes: int | None = None  # processes the layer runs as, when ready (local platform)
    rss_mib: float | None = None  # their resident memory, when ready
    url: str | None = None  # the address the platform published for the layer (status.url), when it has one

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


class Platform(Protocol):
    name: str

    def facts(self) -> dict[str, Any]:
        """What the platform offers (hardware, engine, controllers), for preflight and run.json."""

    def engine_version(self) -> str | None:
        """The vLLM version the layers run, when the platform knows it."""

    def unsupported_reason(self, layer_name: str) -> str | None:
        """None when the platform can host this layer, otherwise why not."""

    def ensure(self, layer_name: str, run_dir: str) -> Deployment:
        """Deploy a layer, or reuse it when it already runs with the same spec; wait until ready."""

    def endpoint(self, layer_name: str) -> Endpoint:
        """Where a ready layer answers."""

    def teardown(self, layer_names: list[str] | None = None) -> list[str]:
        """Stop what this study deployed (all layers when empty); returns what was stopped."""
