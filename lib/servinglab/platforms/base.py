"""The platform contract: what every platform offers the experiments and notebooks, and the values it hands
back. ``local`` (vLLM server processes on this machine) and ``kubernetes`` (objects on a cluster) both
implement :class:`Platform`; callers use nothing else of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol
from urllib.parse import urlsplit

from ..measure.outbound import refuse_plain_http_key

if TYPE_CHECKING:
    from ..config import Study
    from ..layers import Refusal
    from ..layers.common import Canary


def endpoint_options(study: Study, layer_name: str) -> dict[str, Any]:
    """The study's client settings for one layer (``client:``), as :class:`Endpoint` takes them: how its
    certificate is checked, the proxy, and whether its key may go over plain http:// to another machine."""
    return {
        "verify_tls": study.tls_verify(layer_name),
        "proxy": study.client.proxy,
        "plain_http_key_allowed": layer_name in study.client.allow_plain_http_key,
    }


def tls_text(verify_tls: bool | str) -> str:
    """How a TLS certificate is checked, as the records and the report say it."""
    if verify_tls is False:
        return "certificate not checked (client.tls_verify)"
    if verify_tls is True:
        return "certificate checked against the system's CAs"
    return f"certificate checked against {verify_tls}"


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed layer answers the OpenAI API, and how the clients reach it.

    Refuses, on creation, a key that would go over plain http:// to another machine (see
    :func:`refuse_plain_http_key`). ``via`` ends with how the certificate is checked (https) and the proxy
    taken (when the study names one), so every record that carries ``via`` says both.
    """

    layer: str
    base_url: str  # ends in /v1
    served_name: str
    # The key is read when needed and kept out of repr, so printing an endpoint never shows it.
    api_key: str | None = field(default=None, repr=False, compare=False)
    headers: dict[str, str] = field(default_factory=dict, compare=False)  # e.g. Host, through a gateway by IP
    # True: the system's CAs; a path: that CA file; False: not checked (the study names the layer).
    verify_tls: bool | str = field(default=True, compare=False)
    via: str = "direct"  # the path the requests take: direct, port-forward, gateway or in-cluster
    proxy: str | None = field(default=None, compare=False)  # only from the study, never from the environment
    plain_http_key_allowed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        refuse_plain_http_key(f"layers.{self.layer}", self.base_url, self.api_key, self.plain_http_key_allowed)
        notes = [f"TLS, {tls_text(self.verify_tls)}"] if urlsplit(self.base_url).scheme == "https" else []
        notes += [f"through proxy {urlsplit(self.proxy).netloc}"] if self.proxy else []
        if notes:
            object.__setattr__(self, "via", f"{self.via} [{'; '.join(notes)}]")

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")


@dataclass(frozen=True)
class MetricsTarget:
    """One engine process whose ``/metrics`` make up part of a layer's: a pod, or the local server."""

    name: str  # the pod's name, or the layer's for the one local server
    root_url: str  # http(s)://host:port, without /v1
    api_key: str | None = field(default=None, repr=False, compare=False)
    headers: dict[str, str] = field(default_factory=dict, compare=False)
    verify_tls: bool | str = field(default=True, compare=False)  # as Endpoint's
    plain_http_key_allowed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        refuse_plain_http_key(f"metrics of {self.name}", self.root_url, self.api_key, self.plain_http_key_allowed)


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
    placement: dict[str, list[int]] | None = None  # the cores of the engine, its API server, the client (local)
    serving_replicas: int | None = None  # replicas that serve a load point (the kind's cost rule)
    idle_replicas: int | None = None  # replicas kept when no request comes

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifests:
    """A layer's objects as its user would apply them, and what was assumed to render them (None: nothing)."""

    objects: list[dict[str, Any]]
    assumed: str | None = None


class PodTimeline(Protocol):
    def first(self) -> dict[str, float]:
        """The earliest time (time.time()) each mark was reached by any new pod."""
        ...

    def wait_for(self, mark: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``mark`` to be seen (a watch may deliver it after the first token
        came through); whether it was."""
        ...


class Platform(Protocol):
    """Deploy, reach, change, watch and stop a study's layers."""

    name: str
    study: Study

    def with_study(self, study: Study) -> Platform:
        """The same machine or cluster, connection and registry, for a changed study (a model update)."""
        ...

    # --- what the platform offers -----------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        """What the platform offers (hardware, engine, controllers), for preflight and run.json."""
        ...

    def engine_version(self) -> str | None:
        """The vLLM version the layers run, when the platform knows it."""
        ...

    def unsupported_reason(self, layer_name: str) -> str | None:
        """None when the platform can host this layer, otherwise why not."""
        ...

    def refusal(self, needs: frozenset[str]) -> Refusal | None:
        """Why this platform, as the study sets it, cannot give what a lifecycle mechanism needs (``cluster``,
        ``gateway``), or None."""
        ...

    def model_dir(self) -> tuple[Path, list[str]]:
        """The model directory this machine serves and the engine arguments its source needs (local only)."""
        ...

    def manifests(self, layer_name: str, study: Study | None = None, run_id: str | None = None) -> Manifests:
        """The layer's objects as applied on a cluster (rendered as on one where the platform is not)."""
        ...

    # --- deploy and reach -------------------------------------------------------------------------

    def ensure(self, layer_name: str, run_dir: str, run_id: str | None = None, canary: Canary | None = None,
               keep_on_failure: bool = False) -> Deployment:  # fmt: skip
        """Deploy a layer, or reuse it when it already runs with the same spec; wait until ready."""
        ...

    def endpoint(self, layer_name: str, via: str | None = None) -> Endpoint:
        """Where a ready layer answers, by the path ``via`` names (the platform's default when None)."""
        ...

    def paths(self, layer_name: str) -> dict[str, Endpoint]:
        """The ways to reach a ready layer side by side: ``direct`` always, ``gateway`` when it has one."""
        ...

    def metrics_targets(self, layer_name: str) -> list[MetricsTarget]:
        """Every ready engine process of the layer, each with its own ``/metrics``."""
        ...

    def client_cpus(self, layer_name: str) -> tuple[int, ...] | None:
        """The cores a client on this machine should measure the layer from (None: wherever it runs)."""
        ...

    def created_objects(self, layer_name: str) -> list[str]:
        """Kind/name of what the platform's controllers made of the layer (empty where there are none)."""
        ...

    # --- change, scale, watch ---------------------------------------------------------------------

    def replicas(self, layer_name: str) -> int | None:
        """The replicas a person set on the layer now (None: the layer is not scaled by hand)."""
        ...

    def scale(self, layer_name: str, replicas: int) -> None:
        """Set a layer's replicas by hand (``kubectl scale``; locally: stop, or start, its server)."""
        ...

    def wait_for_pods(self, layer_name: str, count: int, timeout_s: float) -> float:
        """Seconds until the layer has exactly ``count`` serving processes (ready ones, when ``count`` > 0)."""
        ...

    def wait_ready(self, layer_name: str, since: float) -> dict[str, float]:
        """Wait until the layer is ready again after a change made at ``since``; the marks seen."""
        ...

    def traffic(self, layer_name: str) -> list[dict[str, Any]]:
        """The traffic split the layer's controller reports (empty where nothing splits traffic)."""
        ...

    def pod_timeline(self, layer_name: str) -> ContextManager[PodTimeline]:
        """While open, stamps when the layer's new serving processes are created, scheduled, started, ready."""
        ...

    # --- stop -------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """The study's layers present now: ``layer``, ``state``, ``where`` and ``detail``."""
        ...

    def teardown(self, layer_names: list[str] | None = None) -> list[str]:
        """Stop what this study deployed (all layers when empty); returns what was stopped."""
        ...
