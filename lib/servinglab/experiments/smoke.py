"""The smoke test: the source page's "Confirmed behavior", asserted and recorded per layer.

``GET /v1/models`` returns the served name; ``POST /v1/chat/completions`` returns 200; its
``system_fingerprint`` names vLLM and its version. With an API key configured, a request without the key
is refused (401): the layer enforces the key rather than merely accepting it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import httpx
import openai

from .. import records
from ..config import Study
from ..errors import SmokeCheckError
from ..measure.outbound import client_options
from ..platforms import Endpoint


def _check(layer: str, check: str, passed: bool, expected: str, observed: Any, elapsed_ms: float) -> dict:
    return {
        "layer": layer,
        "check": check,
        "passed": bool(passed),
        "expected": expected,
        "observed": observed,
        "latency_ms": round(elapsed_ms, 2),
        "at": records.utc_now(),
    }


def run_smoke(
    study: Study, endpoint: Endpoint, run_dir: str | os.PathLike, engine_version: str | None = None
) -> list[dict[str, Any]]:
    """Run the checks against one layer's endpoint, append them to ``data/smoke.jsonl``, return them.

    Parameters
    ----------
    study : Study
        The loaded study (its ``workloads.smoke`` says what to send).
    endpoint : Endpoint
        Where the layer answers (``platform.endpoint(layer)``).
    run_dir : path
        The run directory.
    engine_version : str, optional
        The vLLM version the platform reports; the fingerprint must name it when given.
    """
    workload = study.workloads.smoke
    rows: list[dict] = []
    # Measurement, not resilience: a retried request would hide exactly what a smoke test looks for.
    client = openai.OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key or "no-key",
        max_retries=0,
        timeout=workload.timeout_s,
        default_headers=endpoint.headers or None,
        http_client=openai.DefaultHttpxClient(**client_options(endpoint.verify_tls, endpoint.proxy)),
    )
    layer = endpoint.layer
    try:
        t = time.perf_counter()
        try:
            ids = [m.id for m in client.models.list().data]
        except openai.APIError as exc:
            ids = [f"error: {type(exc).__name__}: {exc}"]
        rows.append(
            _check(layer, "models_lists_served_name", endpoint.served_name in ids,
                   f"'{endpoint.served_name}' in GET /v1/models", ids, (time.perf_counter() - t) * 1000)
        )  # fmt: skip

        t = time.perf_counter()
        status, fingerprint, usage, text = None, None, None, None
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=endpoint.served_name,
                messages=[{"role": "user", "content": workload.prompt}],
                max_tokens=workload.max_tokens,
            )
            status = raw.http_response.status_code
            completion = raw.parse()
            fingerprint = completion.system_fingerprint
            usage = completion.usage.model_dump() if completion.usage else None
            text = (completion.choices[0].message.content or "")[:80] if completion.choices else None
        except openai.APIStatusError as exc:
            status = exc.status_code
        except openai.APIError as exc:
            status = f"error: {type(exc).__name__}: {exc}"
        elapsed = (time.perf_counter() - t) * 1000
        rows.append(
            _check(layer, "chat_completion_200", status == 200, "POST /v1/chat/completions returns 200",
                   {"status": status, "usage": usage, "text": text}, elapsed)
        )  # fmt: skip
        pattern = rf"^vllm-{re.escape(engine_version)}(-|$)" if engine_version else r"^vllm-\d"
        rows.append(
            _check(layer, "fingerprint_names_engine", bool(fingerprint and re.match(pattern, fingerprint)),
                   f"system_fingerprint vllm-{engine_version or '<version>'}-…", fingerprint, elapsed)
        )  # fmt: skip

        if endpoint.api_key:
            t = time.perf_counter()
            with httpx.Client(timeout=workload.timeout_s, headers=endpoint.headers,
                              **client_options(endpoint.verify_tls, endpoint.proxy)) as http:  # fmt: skip
                try:
                    refused = http.get(f"{endpoint.base_url}/models").status_code
                except httpx.HTTPError as exc:  # recorded as observed, like the checks above
                    refused = f"error: {type(exc).__name__}"
            rows.append(
                _check(layer, "api_key_enforced", refused == 401, "GET /v1/models without the key returns 401",
                       {"status": refused}, (time.perf_counter() - t) * 1000)
            )  # fmt: skip
    finally:
        client.close()
        for row in rows:
            row["via"] = endpoint.via  # the path the requests took (direct, port-forward, gateway, in-cluster)
            row["provenance"] = "measured"  # returned as recorded
        records.append(run_dir, records.SMOKE, rows)
    if fingerprint:
        records.update_context(run_dir, engine={"system_fingerprint": fingerprint})
    return rows


def smoke_layers(
    study: Study,
    platform,
    run_dir: str | os.PathLike,
    layers: list[str] | None = None,
    deploy_missing: bool = False,
) -> list[dict[str, Any]]:
    """Smoke-test every layer the platform can host (all of the study's when ``layers`` is empty).

    ``deploy_missing`` deploys a layer that is not running first (a notebook run on its own).
    """
    from .deploy import running_endpoints

    version = platform.engine_version()
    rows: list[dict[str, Any]] = []
    for endpoint in running_endpoints(study, platform, run_dir, layers, deploy_missing):
        rows += run_smoke(study, endpoint, run_dir, engine_version=version)
    return rows


def assert_passed(rows: list[dict[str, Any]]) -> None:
    """Raise SmokeCheckError listing every failed check (after they were recorded)."""
    failed = [r for r in rows if not r["passed"]]
    if failed:
        lines = [f"{r['layer']}: {r['check']}: expected {r['expected']}, observed {r['observed']!r}" for r in failed]
        raise SmokeCheckError("smoke checks failed:\n  " + "\n  ".join(lines))


def rows_frame(rows: list[dict[str, Any]]):
    """The smoke checks as a table."""
    import pandas as pd

    return pd.DataFrame(rows, columns=["layer", "check", "passed", "expected", "observed", "latency_ms", "via"])
