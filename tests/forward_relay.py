"""A stand-in for the API server's port-forward across processes, for notebooks run by ``servinglab run``.

The notebooks' kernels are other processes, so a monkeypatch in the test cannot reach them. The test
starts a ``Relay`` over its test network and puts a folder holding a ``sitecustomize`` module on the
kernels' PYTHONPATH; that module makes ``KubernetesPlatform.pod_connector`` dial the relay and name the
pod and port on the first line, and the relay connects the stream to that pod's server (or closes it,
as a port-forward to a pod without a listener does).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Callable

from servinglab.platforms.portforward import _pump

ENV = "SERVINGLAB_TEST_FORWARD_RELAY"

SITECUSTOMIZE = f'''
import os
import socket

_relay = os.environ.get("{ENV}")
if _relay:
    from servinglab.platforms.kubernetes import KubernetesPlatform

    def _pod_connector(self, pod, port):
        host, relay_port = _relay.rsplit(":", 1)

        def connect():
            stream = socket.create_connection((host, int(relay_port)))
            stream.sendall(f"{{pod}} {{port}}\\n".encode())
            return stream

        return connect

    KubernetesPlatform.pod_connector = _pod_connector
'''


class Relay:
    """Listens on 127.0.0.1; each connection's first line names ``pod port``, the rest is relayed to it."""

    def __init__(self, connect: Callable[[str, int], socket.socket]) -> None:
        self.connect = connect
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="test-forward-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\n" not in head:
            chunk = client.recv(1)
            if not chunk:
                client.close()
                return
            head += chunk
        pod, port = head.decode().split()
        try:
            pod_stream = self.connect(pod, int(port))
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(client, pod_stream), daemon=True).start()
        threading.Thread(target=_pump, args=(pod_stream, client), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def site_folder(self, folder: Path) -> Path:
        """A folder with the ``sitecustomize`` module that points the kernels' port-forwards here."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
        return folder
