"""A local TCP port that forwards to a pod's port, as ``kubectl port-forward`` does, from the library.

Each local connection gets its own stream to the pod (the API server's portforward subresource over a
websocket, through the official client); bytes are copied both ways by two threads. The forward lives
as long as the process, or until ``close()``.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

Connector = Callable[[], socket.socket]  # opens one stream to the target


def kubernetes_connector(api_client, namespace: str, pod: str, port: int) -> Connector:  # noqa: ANN001
    """Streams through the API server's ``pods/portforward`` (websocket) to ``pod:port``."""
    from kubernetes import client
    from kubernetes.stream import portforward

    core = client.CoreV1Api(api_client)

    def connect() -> socket.socket:
        forward = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port))
        return forward.socket(port)

    return connect


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (sink, source):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PortForward:
    """Listens on 127.0.0.1 and relays each connection through ``connector``."""

    def __init__(self, connector: Connector, description: str) -> None:
        self.connector = connector
        self.description = description
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"servinglab-forward-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            try:
                remote = self.connector()
            except Exception:  # noqa: BLE001 - the client sees a closed connection and reports it
                local.close()
                continue
            local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_pump, args=(local, remote), daemon=True).start()
            threading.Thread(target=_pump, args=(remote, local), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
