"""A thin, typed-free way to talk to a Kubernetes API through the official client.

Objects stay plain dicts from render to apply to watch: the platform works with KServe's custom kinds as
much as with built-in ones, and needs server-side apply, label-selected lists and watches of any kind.
The official client supplies configuration (kubeconfig, contexts, in-cluster service accounts, auth
plugins), TLS and the HTTP pool; this module supplies the paths.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import kubernetes
import yaml
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from .. import layers
from ..errors import KubeconfigError, PlatformError

FIELD_MANAGER = "servinglab"

# kind → (plural, namespaced): the built-in kinds the platform applies, waits on, lists or deletes; the
# custom resources of the layer kinds come from their registry (servinglab.layers).
KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "Deployment": ("deployments", True),
    "ReplicaSet": ("replicasets", True),
    "Service": ("services", True),
    "PersistentVolumeClaim": ("persistentvolumeclaims", True),
    "Pod": ("pods", True),
    "Event": ("events", True),
    "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "HTTPRoute": ("httproutes", True),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "Node": ("nodes", False),
    "ConfigMap": ("configmaps", True),
    "StorageClass": ("storageclasses", False),
    "GatewayClass": ("gatewayclasses", False),
    "Job": ("jobs", True),
    "NetworkPolicy": ("networkpolicies", True),
}
API_VERSIONS = {
    "Namespace": "v1", "Service": "v1", "PersistentVolumeClaim": "v1", "Pod": "v1", "Event": "v1", "Node": "v1",
    "Deployment": "apps/v1", "ReplicaSet": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "CustomResourceDefinition": "apiextensions.k8s.io/v1", "ConfigMap": "v1", "StorageClass": "storage.k8s.io/v1",
    "GatewayClass": "gateway.networking.k8s.io/v1", "Job": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}  # fmt: skip


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> kubernetes.client.ApiClient:
    """Configuration as kubectl finds it: the argument, then $KUBECONFIG / ~/.kube/config, then in-cluster."""
    configuration = kubernetes.client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        if kubeconfig or os.path.exists(path.split(os.pathsep)[0]):
            kubernetes.config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        else:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
    except (kubernetes.config.ConfigException, OSError) as exc:
        # The message names the file or the missing service account, never the credentials.
        raise PlatformError(f"no Kubernetes configuration usable (kubeconfig {path!r}, context {context!r}): {exc}") from None
    except yaml.MarkedYAMLError as exc:
        # Only where and what: the parser's own message quotes the offending line, which may hold a token.
        where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else "?"
        raise KubeconfigError(f"kubeconfig {path!r} is not valid YAML ({where}: {exc.problem})") from None
    except (yaml.YAMLError, TypeError, ValueError, KeyError, AttributeError) as exc:
        # A kubeconfig of the wrong shape (clusters: 5) fails deep in the client; its text may quote values.
        raise KubeconfigError(f"kubeconfig {path!r} does not have a kubeconfig's shape "
                            f"(clusters, contexts and users are lists of named entries): {type(exc).__name__}") from None
    return kubernetes.client.ApiClient(configuration)


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    if kind in KINDS:
        plural, namespaced = KINDS[kind]
    elif (custom := layers.resource_types().get(kind)) is not None:
        plural, namespaced = custom.plural, custom.namespaced
    else:
        raise PlatformError(f"servinglab does not know the resource name of kind {kind}")
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespaced and namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


@dataclass
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, or ERROR (a broken watch, restarted)
    kind: str  # the kind watched
    object: dict[str, Any]
    seen: float  # time.time() when the event reached servinglab


class Kube:
    """Requests to one cluster, as plain dicts."""

    def __init__(self, api: kubernetes.client.ApiClient, request_timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout = request_timeout_s

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: Any = None) -> Any:  # fmt: skip
        """One request; returns the urllib3 response (unread), raises ApiException on an error status."""
        method, url, headers, body, _ = self.api.param_serialize(
            method, path,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        try:
            response = self.api.call_api(method, url, header_params=headers, body=body,
                                         _request_timeout=timeout or self.timeout)  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise PlatformError(f"cannot reach the Kubernetes API at {self.api.configuration.host}: {reason}") from None
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException(http_resp=response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return json.loads(self.request(method, path, **kwargs).read() or b"{}")

    def version(self) -> dict[str, Any]:
        return self.json("GET", "/version")

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.json("GET", object_path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, selector: dict[str, str] | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        query = {"labelSelector": format_selector(selector), "fieldSelector": field_selector}
        items = self.json("GET", object_path(api_version, kind, namespace), query=query).get("items") or []
        # Filtered here too, so a selector the server ignored cannot widen what is deleted or waited on.
        return [item for item in items if matches(item, selector)]

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply under servinglab's field manager (creates or updates)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        query = {"fieldManager": FIELD_MANAGER, "force": "true", "dryRun": "All" if dry_run else None}
        return self.json("PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml")

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name),
                         body={"propagationPolicy": "Foreground"}).read()  # fmt: skip
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def log_tail(self, namespace: str, pod: str, container: str, lines: int = 20, previous: bool = True) -> str:
        query = {"container": container, "tailLines": lines, "previous": "true" if previous else None}
        try:
            return self.request("GET", object_path("v1", "Pod", namespace, pod, "log"), query=query).read().decode(
                "utf-8", "replace")  # fmt: skip
        except ApiException:
            if previous:
                return self.log_tail(namespace, pod, container, lines, previous=False)
            return ""

    def log(self, namespace: str, pod: str, container: str, timeout_s: float = 300.0) -> str | None:
        """The container's whole current log; None when the API has none to give (never started, pod gone)."""
        path = object_path("v1", "Pod", namespace, pod, "log")
        try:
            response = self.request("GET", path, query={"container": container}, timeout=(10, timeout_s))
        except ApiException:
            return None
        return response.read().decode("utf-8", "replace")

    def watch(self, api_version: str, kind: str, namespace: str | None, selector: dict[str, str] | None,
              events: queue.Queue, stop: threading.Event) -> threading.Thread:  # fmt: skip
        """Stream the kind's events (selected) into ``events`` from a thread until ``stop`` is set."""

        current: dict[str, Any] = {}

        def close_when_stopped() -> None:
            stop.wait()
            try:
                raw = current["response"].response  # the urllib3 response under the client's wrapper
                if hasattr(raw, "shutdown"):
                    raw.shutdown()  # unblocks the thread reading it
                raw.release_conn()
            except Exception:  # noqa: BLE001 - no stream yet, or closed already
                pass

        def run() -> None:
            threading.Thread(target=close_when_stopped, daemon=True).start()
            while not stop.is_set():
                try:
                    response = current["response"] = self.request(
                        "GET", object_path(api_version, kind, namespace),
                        query={"watch": "true", "labelSelector": format_selector(selector), "timeoutSeconds": 30},
                        timeout=(10, 35),
                    )  # fmt: skip
                    for line in iter_resp_lines(response.response):
                        if stop.is_set():
                            break
                        if not line:
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED") and matches(obj, selector):
                            events.put(WatchEvent(event["type"], kind, obj, time.time()))
                except Exception as exc:  # noqa: BLE001 - a broken watch is restarted; the wait has its deadline
                    if stop.is_set():
                        return
                    events.put(WatchEvent("ERROR", kind, {"error": str(exc)[:300]}, time.time()))
                    stop.wait(1.0)

        thread = threading.Thread(target=run, name=f"servinglab-watch-{kind}", daemon=True)
        thread.start()
        return thread


def format_selector(selector: dict[str, str] | None) -> str | None:
    return ",".join(f"{k}={v}" for k, v in selector.items()) if selector else None


def matches(obj: dict[str, Any], selector: dict[str, str] | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in ((obj.get("status") or {}).get("conditions") or [])}


def iter_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    status = pod.get("status") or {}
    yield from status.get("initContainerStatuses") or []
    yield from status.get("containerStatuses") or []


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "2") as a number (cores, bytes, count)."""
    text = str(text).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text or 0)
