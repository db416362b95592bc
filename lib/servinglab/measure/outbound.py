"""How every client of a server under test connects: only what the study says, nothing from the environment.

httpx (and the SDK's clients built on it) read ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``
and ``SSL_CERT_FILE`` unless told not to; through a proxy the bearer key would travel to it, and its hop
would be in every latency. So the clients are built with ``trust_env=False``, the proxy the study names
(or none), and the certificate check the study sets.
"""

from __future__ import annotations

import ipaddress
import ssl
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from ..errors import PlatformError, ServinglabError


@lru_cache(maxsize=8)
def _ca_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def verify_option(verify_tls: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: True (the system's CAs), False (no check), or a context trusting a CA file."""
    return _ca_context(verify_tls) if isinstance(verify_tls, str) else verify_tls


def client_options(verify_tls: bool | str = True, proxy: str | None = None) -> dict[str, Any]:
    """Keyword arguments for an ``httpx``/``httpx2`` client (or the SDK's) that reaches a server under test.

    Parameters
    ----------
    verify_tls : bool or str
        True: check the certificate against the system's CAs; a path: against that CA file; False: no check.
    proxy : str, optional
        The proxy the study names (``client.proxy``); None sends requests straight to the server.
    """
    return {"trust_env": False, "proxy": proxy, "verify": verify_option(verify_tls)}


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine's loopback (where a port-forward listens)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified  # a client reaches 0.0.0.0 on this machine


def refuse_plain_http_key(name: str, url: str, api_key: str | None, allowed: bool,
                          error: type[ServinglabError] = PlatformError,
                          how_to_allow: str = "name the layer in client.allow_plain_http_key") -> None:  # fmt: skip
    """Raise ``error`` when a bearer key would go over plain http:// to another machine.

    Anyone on the path could read it; a study allows it for a layer by naming it in
    ``client.allow_plain_http_key`` (``how_to_allow`` says so in the message). Loopback (the local platform,
    a port-forward) is always allowed.
    """
    if api_key and not allowed and urlsplit(url).scheme == "http" and not is_loopback(url):
        raise error(
            f"{name}: refusing to send the API key over plain http:// to {urlsplit(url).netloc}; use https, "
            f"a port-forward, or {how_to_allow}"
        )
