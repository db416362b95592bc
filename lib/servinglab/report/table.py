"""The serving-layer decision table, one cell per (dimension, layer), each measured or explained.

The rows are the source page's dimensions plus the smoke test and the performance rows. Every cell is
built from the run's data only and says what kind of statement it is:

- ``measured``: a number from this run, with its unit and the number of trials;
- ``observed``: a behaviour seen in this run (a URL, a process count, checks passed);
- ``pending``: the suite has no experiment for it yet; the text names what will measure it;
- ``needs-platform``: the layer cannot run on this run's platform;
- ``not-deployed`` / ``failed``: the layer was not deployed in this run, or failed, with the reason;
- ``not-run``: the layer ran, but the experiment that measures this row did not.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

from .rundata import RunData

LIFECYCLE_PENDING = "measured by the lifecycle experiments (40_lifecycle), not yet part of this suite"
RENDER_PENDING = "counted from the rendered manifests once the layer renderers are part of this suite"


@dataclass(frozen=True)
class Cell:
    status: str
    text: str
    trials: int | None = None
    evidence: str | None = None  # an anchor in the report or a data file of the run

    @property
    def has_value(self) -> bool:
        return self.status in ("measured", "observed")


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    claims: dict[str, str]  # by layer kind: the source page's claim, in this project's words
    measure: Callable[[RunData, str, str], Cell]


def _deployment_gate(run: RunData, layer: str) -> Cell | None:
    """The cell for a layer that is not running in this run, or None when it is."""
    record = run.last_deployment(layer)
    if record is None:
        return Cell("not-deployed", "layer not deployed in this run", evidence="#deployments")
    if record["status"] == "unsupported":
        return Cell("needs-platform", record["reason"], evidence="#deployments")
    if record["status"] == "failed":
        first_line = (record["reason"] or "").splitlines()[0]
        return Cell("failed", f"deploy failed: {first_line}", evidence="#deployments")
    return None


def _gated(pending_text: str) -> Callable[[RunData, str, str], Cell]:
    def measure(run: RunData, layer: str, kind: str) -> Cell:
        return _deployment_gate(run, layer) or Cell("pending", pending_text)

    return measure


def _what_you_write(run: RunData, layer: str, kind: str) -> Cell:
    return Cell("pending", RENDER_PENDING)


def _lifecycle(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    fresh = [d["time_to_ready_s"] for d in run.fresh_starts(layer) if d.get("time_to_ready_s") is not None]
    if fresh:
        value = statistics.median(fresh)
        label = "median " if len(fresh) > 1 else ""
        return Cell(
            "measured",
            f"start to ready: {label}{value:.1f} s (process start → /v1/models lists the model); "
            "model update: " + LIFECYCLE_PENDING,
            trials=len(fresh),
            evidence="#deployments",
        )
    record = run.last_deployment(layer)
    earlier = record.get("time_to_ready_s")
    return Cell(
        "observed",
        f"reused a server started at {record['started_at']}"
        + (f" (ready then in {earlier:.1f} s)" if earlier is not None else "")
        + "; no fresh start in this run",
        trials=0,
        evidence="#deployments",
    )


def _ingress(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    if run.context.get("platform", {}).get("name") == "local":
        urls = sorted({d["base_url"] for d in run.deployments if d["layer"] == layer and d.get("base_url")})
        return Cell(
            "observed",
            f"no route object: clients use the process address {urls[-1]}; its port is picked at each "
            f"start ({len(urls)} distinct address{'es' if len(urls) != 1 else ''} in this run)",
            trials=len([d for d in run.deployments if d["layer"] == layer and d["status"] == "ready"]),
            evidence="#deployments",
        )
    return Cell("pending", LIFECYCLE_PENDING)


def _control(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    record = run.last_deployment(layer)
    if record.get("processes"):
        return Cell(
            "observed",
            f"no controller: the engine is {record['processes']} processes using "
            f"{record['rss_mib']:.0f} MiB of memory when ready",
            trials=1,
            evidence="#deployments",
        )
    return Cell("pending", "control-plane inventory comes from the cluster preflight")


def _prereqs(run: RunData, layer: str, kind: str) -> Cell:
    if not run.preflight:
        return Cell("not-deployed", "no preflight in this run", evidence="#preflight")
    latest = run.preflight[-1]
    support = {row["layer"]: row for row in latest["layers"]}.get(layer)
    if support is None:
        return Cell("not-deployed", "layer not in this run's preflight", evidence="#preflight")
    if not support["hostable"]:
        return Cell("needs-platform", support["reason"], evidence="#preflight")
    engine = latest["facts"].get("engine", {})
    return Cell(
        "observed",
        f"found {engine.get('distribution', 'vllm')} {engine.get('version')} in the engine's Python; "
        "no cluster components needed on this platform",
        trials=1,
        evidence="#preflight",
    )


def _smoke(run: RunData, layer: str, kind: str) -> Cell:
    gate = _deployment_gate(run, layer)
    if gate:
        return gate
    checks = run.smoke_of(layer)
    if not checks:
        return Cell("not-deployed", "smoke test not run on this layer", evidence="#smoke")
    passed = [c for c in checks if c["passed"]]
    fingerprint = next((c["observed"] for c in checks if c["check"] == "fingerprint_names_engine"), None)
    status = "observed" if len(passed) == len(checks) else "failed"
    failed = [c["check"] for c in checks if not c["passed"]]
    text = f"{len(passed)}/{len(checks)} checks passed; system_fingerprint {fingerprint}"
    if failed:
        text += f"; failed: {', '.join(failed)}"
    return Cell(status, text, trials=len(checks), evidence="#smoke")


def _closed_stages(run: RunData, layer: str) -> list[dict]:
    stages = [s for s in run.latency_stages if s["layer"] == layer and s.get("mode") == "closed"]
    return sorted(stages, key=lambda s: s.get("max_concurrency") or 0)


def _finished_closed_stages(run: RunData, layer: str) -> list[dict]:
    return [s for s in _closed_stages(run, layer) if s["summary"].get("completed")]


def _no_latency(run: RunData, layer: str) -> Cell:
    """Why a layer has no latency figures: not running here, or the latency notebook did not run."""
    return _deployment_gate(run, layer) or Cell(
        "not-run", "no latency stage in this run (30_latency did not run)", evidence="#latency"
    )


def _percentiles(metric: str) -> Callable[[RunData, str, str], Cell]:
    def measure(run: RunData, layer: str, kind: str) -> Cell:
        stages = _finished_closed_stages(run, layer)
        if not stages:
            return _no_latency(run, layer)
        parts = [
            f"c={s['max_concurrency']}: {s['summary'][f'median_{metric}_ms']:.1f} / {s['summary'][f'p95_{metric}_ms']:.1f} ms"
            for s in stages
            if s["summary"].get(f"median_{metric}_ms") is not None
        ]
        trials = sum(s["summary"]["completed"] for s in stages)
        return Cell("measured", "; ".join(parts), trials=trials, evidence="#latency")

    return measure


def _goodput(run: RunData, layer: str, kind: str) -> Cell:
    stages = _finished_closed_stages(run, layer)
    if not stages:
        return _no_latency(run, layer)
    slos = run.params.get("slos", {})
    limits = {k: slos.get(f"{k}_ms_p95") for k in ("ttft", "tpot", "e2e")}
    limits = {k: v for k, v in limits.items() if v}
    if not limits:
        return Cell("observed", "the study sets no p95 latency objectives (slos.*_ms_p95) to test the stages against",
                    trials=len(stages), evidence="#latency")  # fmt: skip
    key = {"ttft": "p95_ttft_ms", "tpot": "p95_tpot_ms", "e2e": "p95_e2el_ms"}
    meeting = [s for s in stages if all((s["summary"].get(key[k]) or float("inf")) <= v for k, v in limits.items())]
    objectives = ", ".join(f"{k.upper()} p95 ≤ {v:g} ms" for k, v in limits.items())
    if not meeting:
        return Cell("measured", f"no tested concurrency met {objectives}", trials=len(stages), evidence="#latency")
    best = meeting[-1]
    s = best["summary"]
    text = (f"concurrency {best['max_concurrency']}: {s['request_throughput']:.2f} req/s, "
            f"{s['output_throughput']:.0f} output tok/s within {objectives}")  # fmt: skip
    if s.get("request_goodput") is not None:
        text += f"; goodput {s['request_goodput']:.2f} req/s"
    return Cell("measured", text, trials=len(stages), evidence="#latency")


ROWS: list[Row] = [
    Row("what_you_write", "What you write", {
        "raw-vllm": "You write the Deployment, Service, volume claim and probes yourself.",
        "kserve": "You write one InferenceService; the controller makes the rest.",
        "llm-d": "You write one LLMInferenceService; the controller makes workloads and routing.",
    }, _what_you_write),
    Row("model_lifecycle", "Model lifecycle", {
        "raw-vllm": "Manual: change image or arguments and restart.",
        "kserve": "Declarative; the controller tracks revisions.",
        "llm-d": "Declarative, through the LLMInferenceService spec.",
    }, _lifecycle),
    Row("rollout_canary", "Rollout / canary", {
        "raw-vllm": "Build it yourself: Recreate strategy, no traffic split.",
        "kserve": "canaryTrafficPercent splits traffic between revisions.",
        "llm-d": "No claim on the source page.",
    }, _gated(LIFECYCLE_PENDING)),
    Row("scale_to_zero", "Scale-to-zero", {
        "raw-vllm": "By hand: replicas to 0 (and a GitOps exception for it).",
        "kserve": "Built in: minReplicas 0.",
        "llm-d": "No claim on the source page.",
    }, _gated(LIFECYCLE_PENDING)),
    Row("ingress_url", "Ingress / URL", {
        "raw-vllm": "A Service; you wire the gateway route.",
        "kserve": "An HTTPRoute and a stable URL per InferenceService, made for you.",
        "llm-d": "Routed by the inference gateway's KV-aware scheduler.",
    }, _ingress),
    Row("multi_model", "Multi-model contract", {
        "raw-vllm": "None: each model is its own set of manifests.",
        "kserve": "One resource shape for every model (governance).",
        "llm-d": "One resource shape for every model.",
    }, _what_you_write),
    Row("control", "Control / blast radius", {
        "raw-vllm": "Total control, fewest moving parts.",
        "kserve": "A controller, cert-manager and KServe's opinionated defaults.",
        "llm-d": "KServe's controller plus the inference gateway and scheduler.",
    }, _control),
    Row("prereqs", "Prereqs", {
        "raw-vllm": "Nothing beyond the cluster.",
        "kserve": "cert-manager, the KServe controller, a network controller.",
        "llm-d": "KServe's LLMInferenceService controller and the Gateway API inference extension.",
    }, _prereqs),
    Row("confirmed", "Confirmed behavior", {
        "raw-vllm": "Serves /v1/models and chat (200) with a vLLM system_fingerprint.",
        "kserve": "Ready; /v1/models and chat (200) answer as on raw vLLM.",
        "llm-d": "No claim on the source page.",
    }, _smoke),
    Row("ttft", "TTFT p50 / p95", {}, _percentiles("ttft")),
    Row("tpot", "TPOT p50 / p95", {}, _percentiles("tpot")),
    Row("e2e", "E2E p50 / p95", {}, _percentiles("e2el")),
    Row("goodput", "Highest load within the SLOs", {}, _goodput),
    Row("gateway", "Gateway overhead", {}, _gated(LIFECYCLE_PENDING)),
]


@dataclass(frozen=True)
class Table:
    layers: list[tuple[str, str]]  # (layer name, kind) in study order
    rows: list[tuple[Row, list[Cell]]]


def decision_table(run: RunData) -> Table:
    """Every row of ROWS measured (or explained) for every layer of the run's study."""
    layers = [(name, spec["kind"]) for name, spec in run.layers.items()]
    rows = [(row, [row.measure(run, name, kind) for name, kind in layers]) for row in ROWS]
    return Table(layers, rows)


def table_frame(table: Table):
    """The table as a pandas DataFrame (rows × layers, cell texts), for notebooks."""
    import pandas as pd

    data = {name: [cells[i].text for _, cells in table.rows] for i, (name, _) in enumerate(table.layers)}
    return pd.DataFrame(data, index=[row.title for row, _ in table.rows])
