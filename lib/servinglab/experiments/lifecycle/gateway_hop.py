"""Gateway hop: the same requests through the gateway and straight to the engine, interleaved in pairs."""

from __future__ import annotations

from typing import Any

from ...errors import PlatformError
from . import traffic
from .stats import paired_difference
from .trial import Trial


def run(trial: Trial) -> dict[str, Any]:
    """The same requests through the gateway and straight to the engine, interleaved, as pairs."""
    s = trial.settings
    # Through the gateway first: a layer scaled to zero is woken, so the direct path has a pod to reach.
    gateway = trial.platform.endpoint(trial.layer, via="gateway")
    traffic.send_batch(gateway, trial.request(), 1, 1, s.request_timeout_s, trial.sink, trial.tags(phase="wake"))
    paths = trial.platform.paths(trial.layer)
    sent = traffic.send_interleaved({"gateway": paths["gateway"], "direct": paths["direct"]}, trial.request(),
                                    s.hop_requests, s.request_timeout_s, trial.sink, trial.tags())  # fmt: skip
    out: dict[str, Any] = {"gateway_via": paths["gateway"].via, "direct_via": paths["direct"].via}
    pairs = [(g, d) for g, d in zip(sent["gateway"], sent["direct"]) if g.get("ok") and d.get("ok")]
    out["failed"] = {name: sum(1 for r in rs if not r.get("ok")) for name, rs in sent.items()}
    if len(pairs) < 2:
        raise PlatformError(f"only {len(pairs)} request pairs succeeded on both paths; failures: {out['failed']}")
    for metric in ("ttft_ms", "e2el_ms"):
        out[f"overhead_{metric}"] = paired_difference([g[metric] for g, _ in pairs], [d[metric] for _, d in pairs],
                                                      s.confidence, seed=s.seed)  # fmt: skip
    if "port-forward" in paths["direct"].via:
        out["note"] = ("the direct path runs through the API server's port-forward tunnel, which adds its own "
                       "hop; run from inside the cluster (platform.endpoint: in-cluster) for the gateway alone")
    return out
