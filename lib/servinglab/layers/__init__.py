"""Serving-layer kinds: one registered object per kind, holding everything that is specific to it.

A kind (``raw-vllm``, ``kserve``, ``llm-d``, or one a plug-in adds) is a :class:`LayerKind` subclass in a
module of its own. It declares its study options (a pydantic model whose ``kind`` field is a literal), its
renderer (the study's one model spec → Kubernetes objects), its Kubernetes references (top object, pod
selector, in-cluster URL), its prerequisites, how each lifecycle experiment is done on it or why it
cannot be, its cost rule and the source page's claims for each row of the decision table. Nothing outside
this package asks for a kind by its name: code elsewhere looks the kind object up and asks it.

Kinds are registered through one public hook, :func:`register`. The built-in kinds are found the way a
plug-in's are, through the entry-point group ``servinglab.layers`` (``name = "package.module:KIND"``);
where the package is not installed (``lib/`` on ``PYTHONPATH``) the built-ins are loaded by the same
references. This module imports nothing of servinglab's but its errors, so the study schema can build its
layer union from it.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ParamsError

if TYPE_CHECKING:
    from ..config import LayerConfig, Study

ENTRY_POINT_GROUP = "servinglab.layers"
BUILT_IN = (
    "raw-vllm = servinglab.layers.rawvllm:KIND",
    "kserve = servinglab.layers.kserve:KIND",
    "llm-d = servinglab.layers.llmd:KIND",
)

# What a lifecycle mechanism may need from where it runs (the platform answers whether it has it).
NEEDS_CLUSTER = "cluster"
NEEDS_GATEWAY = "gateway"


@dataclass(frozen=True)
class Refusal:
    """Why an experiment cannot run on a layer, and who refuses: ``layer`` (the kind has no means for it
    on any platform), ``platform`` (not where the study runs) or ``settings`` (the study's settings)."""

    reason: str
    by: str


@dataclass(frozen=True)
class Mechanism:
    """How a lifecycle experiment is done on a layer: the words for it, what it needs from where it runs,
    and, for scale to zero, whether a request wakes the layer (``on-demand``) or a person does (``by-hand``)."""

    how: str
    needs: frozenset[str] = frozenset()
    mode: str | None = None
    replaces_in_place: bool = False  # an update stops the old pods before the new ones serve


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class NetworkPeer:
    """Pods that may open connections to a layer's serving pods, as a NetworkPolicy ``from`` entry.

    ``namespace`` None means the layer's own namespace; ``ANY_NAMESPACE`` means every namespace (the peer's
    pod labels are then all that identifies it). ``why`` says in words who the peer is and what it needs.
    """

    why: str
    pod_labels: dict[str, str]
    namespace: str | None = None


ANY_NAMESPACE = "*"


@dataclass(frozen=True)
class ResourceType:
    """A Kubernetes resource a kind's objects use that is not built into Kubernetes."""

    kind: str
    plural: str
    api_versions: tuple[str, ...]  # every served version that lists the same objects, newest first
    namespaced: bool = True


class LayerKind:
    """Everything specific to one serving-layer kind. Subclass it, fill the class attributes, override
    what differs from the defaults, and pass an instance to :func:`register`.

    The defaults describe a layer with no gateway, no controller and no lifecycle feature of its own.
    """

    name: ClassVar[str]
    config: ClassVar[type[LayerConfig]]  # the layer's study options; ``kind: Literal[name]``
    title: ClassVar[str]  # how the report names it
    column: ClassVar[str]  # the source page's column it stands under
    claims: ClassVar[dict[str, str]] = {}  # decision-table row key → the source page's claim, in our words
    hosted_locally: ClassVar[bool] = False  # the local platform serves it as a vLLM process
    has_gateway: ClassVar[bool] = False  # it publishes a URL (status.url) behind a gateway route
    serves_tls: ClassVar[bool] = False  # its engine answers TLS with a certificate of its own
    scales_by_hand: ClassVar[bool] = False  # its top object's spec.replicas is what a person scales
    engine_containers: ClassVar[dict[str, int]] = {}  # container name → its port when the pod names none
    resources: ClassVar[tuple[ResourceType, ...]] = ()  # custom resources its objects use, in teardown order
    crds: ClassVar[dict[str, str]] = {}  # CRD name → label: what the kind may rely on
    controllers: ClassVar[tuple[str, ...]] = ()  # controller Deployments (names) it relies on
    control_plane: ClassVar[tuple[str, ...]] = ()  # namespaces whose pods serve it, besides its controllers'
    # The layer in front of the engine as an llm-d-benchmark stack component ({"tool", "resource"}); None: no layer.
    component: ClassVar[dict[str, str] | None] = None

    # --- the study -------------------------------------------------------------------------------------

    def render(self, study: Study, layer_name: str, canary: Any = None) -> list[dict[str, Any]]:
        """The layer's objects, in the order they are applied (pure: no cluster)."""
        raise NotImplementedError

    # --- Kubernetes references -------------------------------------------------------------------------

    def top_ref(self, study: Study, layer_name: str) -> ObjectRef:
        """The object whose readiness is the layer's."""
        raise NotImplementedError

    def pod_selector(self, study: Study, layer_name: str) -> dict[str, str]:
        """The labels of the pods that serve the layer."""
        raise NotImplementedError

    def in_cluster_url(self, study: Study, layer_name: str) -> str:
        """The layer's OpenAI base URL (…/v1) from inside the cluster: its Service."""
        raise NotImplementedError

    def network_peers(self, study: Study, layer_name: str) -> list[NetworkPeer]:
        """Who besides servinglab's own clients must reach the layer's pods (its gateway, an activator, a
        scheduler); the layer's NetworkPolicy admits these and nothing else. None by default: a layer
        without a gateway or controller in its data path is reached through its Service only."""
        return []

    def adapt_to_cluster(self, layer: LayerConfig, checks: dict[str, Any]) -> None:
        """Settle what the study leaves to the cluster (an API version it serves); nothing by default."""

    # --- prerequisites ---------------------------------------------------------------------------------

    def required_crds(self, layer: LayerConfig) -> list[str]:
        """The CRDs this layer relies on, by name as the cluster lists them."""
        return []

    def missing_prerequisites(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        """What the cluster (as the preflight found it) lacks for this layer; empty when nothing."""
        found = checks.get("crds", {})
        missing = [f"the {self.crds.get(name, name)} CRD" for name in self.required_crds(layer) if name not in found]
        running = {c["name"] for c in checks.get("controllers", [])}
        missing += [f"the controller {name}" for name in self.controllers if name not in running]
        return missing

    def control_plane_namespaces(self, layer: LayerConfig, checks: dict[str, Any]) -> list[str]:
        """The namespaces whose pods this layer depends on: its controllers' and its control plane's."""
        found = [c["namespace"] for c in checks.get("controllers", []) if c["name"] in self.controllers]
        return list(dict.fromkeys([*found, *self.control_plane]))

    def cluster_facts(self, read: Any, checks: dict[str, Any]) -> dict[str, Any]:
        """Facts of the cluster about this kind, in words (``{"default deployment mode": "Knative"}``), read
        with ``read.get(api_version, kind, namespace, name)`` after the preflight's own checks; none by default."""
        return {}

    # --- lifecycle --------------------------------------------------------------------------------------

    def mechanism(self, study: Study, layer_name: str, experiment: str) -> Mechanism | Refusal:
        """How ``experiment`` is done on this layer, or who refuses it and why."""
        if experiment == "time_to_ready":
            return Mechanism("teardown, then deploy from nothing")
        return Refusal(f"{self.title} has no means for {experiment.replace('_', ' ')}", "layer")

    # --- routing ----------------------------------------------------------------------------------------

    def routing(self, study: Study, layer_name: str) -> dict[str, str]:
        """How the layer spreads requests over its replicas, by the path a client takes to it (``gateway``,
        ``in-cluster``): the words for it. A path it does not list bypasses the layer's routing (a
        port-forward reaches one pod). Nothing by default: no path carries any routing of its own."""
        return {}

    # --- cost -------------------------------------------------------------------------------------------

    def serving_replicas(self, layer: LayerConfig) -> int:
        """Replicas that serve a load point."""
        return int(getattr(layer, "replicas", 1))

    def idle_replicas(self, layer: LayerConfig) -> int:
        """Replicas kept when no request comes."""
        return self.serving_replicas(layer)

    # --- what a run records about the kind ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What a run records of the kind, so a report reads it from the run and not from today's code."""
        return {"title": self.title, "column": self.column, "claims": dict(self.claims),
                "has_gateway": self.has_gateway, "hosted_locally": self.hosted_locally,
                "component": dict(self.component) if self.component else None}  # fmt: skip


@dataclass
class _Registry:
    kinds: dict[str, LayerKind] = field(default_factory=dict)
    loaded: bool = False
    generation: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)


_REGISTRY = _Registry()


def register(kind: LayerKind) -> LayerKind:
    """Make a serving-layer kind known: studies may use it, platforms deploy it, reports show it.

    Registering an object under a name that is taken replaces the kind only when it is the same class
    (a module imported twice); another class under a taken name is an error.
    """
    if not isinstance(kind, LayerKind):
        raise TypeError(f"{kind!r} is not a LayerKind")
    name = getattr(kind, "name", None)
    config = getattr(kind, "config", None)
    if not name or config is None:
        raise TypeError(f"{type(kind).__name__}: a kind needs a name and a config model")
    literal = getattr(config.model_fields.get("kind"), "annotation", None)
    if name not in getattr(literal, "__args__", ()):
        raise TypeError(f"{type(kind).__name__}: {config.__name__}.kind must be Literal[{name!r}]")
    with _REGISTRY.lock:
        current = _REGISTRY.kinds.get(name)
        if current is not None and type(current).__qualname__ != type(kind).__qualname__:
            raise ValueError(f"layer kind {name!r} is already registered by {type(current).__qualname__}")
        _REGISTRY.kinds[name] = kind
        _REGISTRY.generation += 1
    return kind


def unregister(name: str) -> None:
    """Forget a kind (a test's own kind, when the test ends)."""
    with _REGISTRY.lock:
        if _REGISTRY.kinds.pop(name, None) is not None:
            _REGISTRY.generation += 1


def _load(reference: str) -> LayerKind:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module.strip()), attribute.strip())


def _load_plugins() -> None:
    """The built-in kinds, then every entry point of ``servinglab.layers``, once."""
    with _REGISTRY.lock:
        if _REGISTRY.loaded:
            return
        _REGISTRY.loaded = True
        # The built-ins first, in the source page's order (the same references as the package's own entry
        # points, so they load also where the package is not installed), then every plug-in by name.
        found = dict(line.replace(" ", "").split("=", 1) for line in BUILT_IN)
        plugins = sorted((ep.name, ep.value) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
        for name, reference in plugins:
            found.setdefault(name, reference)
        for name, reference in found.items():
            if name not in _REGISTRY.kinds:
                register(_load(reference))


def kinds() -> list[LayerKind]:
    """Every registered kind: the built-ins first, in the source page's order, then the others as registered."""
    _load_plugins()
    built_in = [line.split("=", 1)[0].strip() for line in BUILT_IN]
    registered = {name: i for i, name in enumerate(_REGISTRY.kinds)}
    names = sorted(registered, key=lambda n: built_in.index(n) if n in built_in else len(built_in) + registered[n])
    return [_REGISTRY.kinds[n] for n in names]


def generation() -> int:
    """Changes whenever a kind is registered or forgotten (the study schema is rebuilt then)."""
    _load_plugins()
    return _REGISTRY.generation


def get(name: str) -> LayerKind:
    """The kind registered under ``name``; an unknown name is an error, never a fall-through."""
    _load_plugins()
    try:
        return _REGISTRY.kinds[name]
    except KeyError:
        known = ", ".join(_REGISTRY.kinds) or "none"
        raise ParamsError(f"unknown layer kind {name!r}; registered kinds: {known}") from None


def of(layer: LayerConfig) -> LayerKind:
    """The kind of a layer's study options."""
    return get(layer.kind)


def resource_types() -> dict[str, ResourceType]:
    """Every custom resource the registered kinds use, by Kubernetes kind."""
    return {r.kind: r for k in kinds() for r in k.resources}


def known_crds() -> dict[str, str]:
    """Every CRD a registered kind may rely on: name → label."""
    out: dict[str, str] = {}
    for k in kinds():
        out.update(k.crds)
    return out


__all__ = [
    "ANY_NAMESPACE", "BUILT_IN", "ENTRY_POINT_GROUP", "NEEDS_CLUSTER", "NEEDS_GATEWAY", "LayerKind", "Mechanism",
    "NetworkPeer", "ObjectRef", "Refusal", "ResourceType", "generation", "get", "kinds", "known_crds", "of", "register", "resource_types",
    "unregister",
]  # fmt: skip
