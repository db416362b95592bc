"""Who may reach a layer's pods: one NetworkPolicy per layer that admits only the peers the layer needs.

Without it any pod of the cluster reaches the engine's port (and its API key is the only guard). The
policy selects the pods that serve the layer (the kind's ``pod_selector``) and admits, on any port:

- servinglab's own in-cluster load pods for this study and layer (labelled ``app.kubernetes.io/component:
  loadgen`` with the study and layer labels, in the study's namespace);
- with ``platform.endpoint: in-cluster``, the pod servinglab runs in, which its user labels
  ``servinglab.io/client: <study>`` in the study's namespace;
- with ``telemetry.prometheus_url``, Prometheus' pods (``app.kubernetes.io/name: prometheus``, the label
  the Prometheus Operator gives them) in the namespace of the URL's Service, or in any namespace when the
  URL is not a cluster Service name;
- what the kind declares (``LayerKind.network_peers``): a gateway's proxies, Knative's activator, llm-d's
  endpoint picker.

What a policy does not govern, and why it is enough: a port-forward reaches the pod through the kubelet
inside the pod's own network namespace, and the kubelet's probes come from the node, which common network
plugins admit. Policies add up: a cluster whose gateway runs elsewhere or carries other labels admits it
with a policy of its own beside this one (or the study sets ``platform.network_policy: false``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..config import Study
from . import ANY_NAMESPACE, NetworkPeer, get
from . import common as c

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server (1.22+)
PEERS_ANNOTATION = "servinglab.io/admits"
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus"}


def own_peers(study: Study, layer_name: str) -> list[NetworkPeer]:
    """The peers every layer admits: servinglab's clients in the cluster, and Prometheus when it is used."""
    settings = c.cluster_settings(study)
    peers = [NetworkPeer("servinglab's in-cluster load pods for this layer",
                         {**c.selector_labels(study, layer_name), c.COMPONENT_LABEL: c.LOAD_COMPONENT})]  # fmt: skip
    if settings.endpoint == "in-cluster":
        peers.append(NetworkPeer("the pod servinglab runs in (platform.endpoint: in-cluster)",
                                 {c.CLIENT_LABEL: study.study}))  # fmt: skip
    if study.telemetry.prometheus_url:
        peers.append(NetworkPeer("Prometheus (telemetry.prometheus_url)", dict(PROMETHEUS_LABELS),
                                 _service_namespace(study.telemetry.prometheus_url) or ANY_NAMESPACE))  # fmt: skip
    return peers


def _service_namespace(url: str) -> str | None:
    """The namespace of a cluster Service URL (``http://name.namespace.svc[.cluster.local]:port``)."""
    parts = (urlsplit(url).hostname or "").split(".")
    return parts[1] if len(parts) >= 3 and parts[2] == "svc" else None


def _from(peer: NetworkPeer, namespace: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"podSelector": {"matchLabels": dict(peer.pod_labels)}}
    if peer.namespace == ANY_NAMESPACE:
        entry["namespaceSelector"] = {}
    elif peer.namespace not in (None, namespace):
        entry["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: peer.namespace}}
    return entry


def network_policy(study: Study, layer_name: str) -> dict[str, Any] | None:
    """The layer's NetworkPolicy, or None when the study turns policies off (``platform.network_policy``).

    Parameters
    ----------
    study : Study
        A study on the kubernetes platform.
    layer_name : str
        The layer whose serving pods the policy selects.
    """
    settings = c.cluster_settings(study)
    if not settings.network_policy:
        return None
    kind = get(study.layers[layer_name].kind)
    peers = [*own_peers(study, layer_name), *kind.network_peers(study, layer_name)]
    annotations = {PEERS_ANNOTATION: "; ".join(p.why for p in peers)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": c.metadata(study, layer_name, c.object_name(study, layer_name, "-ingress"), annotations),
        "spec": {
            "podSelector": {"matchLabels": kind.pod_selector(study, layer_name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_from(p, settings.namespace) for p in peers]}],
        },
    }
