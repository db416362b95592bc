"""The decision table, the advice and the report on cluster runs read back from static run directories.

tests/fixtures/report-runs holds three runs of params/cluster-example.yaml (README there says how they were
made): ``cluster-full`` measured everything, ``cluster-partial`` stopped after the smoke test,
``cluster-failed`` has a layer that never got ready and experiments that failed or were interrupted.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_report import make_run

from servinglab import records, report
from servinglab.config import Study
from servinglab.layers.render import render_layer, with_model
from servinglab.report import manifests
from servinglab.report.advice import derive_advice, derive_recommendations
from servinglab.report.rundata import load_run
from servinglab.report.table import ROWS, decision_table

RUNS = Path(__file__).parent / "fixtures" / "report-runs"
RUNS_V1 = Path(__file__).parent / "fixtures" / "report-runs-v1"  # written before schema_version 2
LAYERS = [("raw", "raw-vllm"), ("kserve-standard", "kserve"), ("kserve-knative", "kserve"), ("llm-d", "llm-d")]


def cells_of(run_dir):
    table = decision_table(load_run(run_dir))
    return table, table.cells()


def advice_of(run):
    table = decision_table(run)
    return {a.layer: a for a in derive_advice(run, table)}, {r.need: r for r in derive_recommendations(run, table)}


def test_full_cluster_run_measures_every_cell():
    table, cells = cells_of(RUNS / "cluster-full")
    assert table.layers == LAYERS
    # Under the source page's columns, as the run recorded its layer kinds.
    assert table.groups == [("raw vLLM", 1), ("KServe InferenceService", 2), ("LLMInferenceService (llm-d)", 1)]
    html = report.render_html(RUNS / "cluster-full")
    for row, row_cells in table.rows:
        for (layer, _), cell in zip(table.layers, row_cells):
            if row.key == "routing":  # the cluster example does not opt into the routing experiment
                assert cell.status == "not-run" and "workloads.routing" in cell.text, (layer, cell)
                continue
            assert cell.status in ("measured", "observed"), (row.key, layer, cell)
            assert cell.evidence and f'id="{cell.evidence[1:]}"' in html, (row.key, layer, cell.evidence)
            if cell.status == "measured":
                assert cell.trials, (row.key, layer)

    write = cells["what_you_write"]
    assert write["raw"].text.startswith("you write 2 objects (Deployment, Service): 150 YAML lines, 109 fields")
    assert "the platform created 2 more (Pod, ReplicaSet)" in write["raw"].text
    assert "you write 1 object (InferenceService)" in write["kserve-standard"].text
    assert "HTTPRoute, HorizontalPodAutoscaler" in write["kserve-standard"].text

    lifecycle = cells["model_lifecycle"]
    assert lifecycle["raw"].trials == 3 and "ready from nothing: median 0.83 s (0.59–0.86 s, 3 starts)" in lifecycle["raw"].text
    assert "served after 1.87 s, by Deployment rollout (Recreate)" in lifecycle["raw"].text
    assert "tracked 2 revisions during the canary" in lifecycle["kserve-knative"].text

    rollout = cells["rollout_canary"]
    assert rollout["raw"].text.startswith("no traffic split: raw vLLM has no traffic split")
    assert "13 of 58 requests failed (connection_error 11, disconnect 2)" in rollout["raw"].text
    assert "longest gap without an answer 1.87 s" in rollout["raw"].text
    knative = rollout["kserve-knative"]
    assert knative.trials == 300 and knative.evidence == "#fig-canary"
    assert "20 % requested, 21.3 % observed [17.1, 26.3] (95 % interval, 300 answers)" in knative.text
    assert "promote: 12 of 159 requests failed" in knative.text and "rollback: 53 of 181 requests failed" in knative.text
    assert rollout["llm-d"].text.startswith("no traffic split: LLMInferenceService has no canary field")

    scale = cells["scale_to_zero"]
    assert scale["kserve-standard"].status == "observed" and "the HPA keeps at least one replica" in scale["kserve-standard"].text
    assert "first token from zero after 2.33 s against a warm TTFT of 73.8 ms" in scale["kserve-knative"].text
    assert scale["raw"].text.startswith("by hand: kubectl scale to 0")
    assert scale["llm-d"].status == "observed"

    ingress = cells["ingress_url"]
    assert ("stable URL http://qwen-cluster-kserve-standard.servinglab.example.com (status.url), the same at all 4 starts"
            in ingress["kserve-standard"].text)  # fmt: skip
    assert "routes the platform created: HTTPRoute/qwen-cluster-kserve-standard" in ingress["kserve-standard"].text
    assert "no HTTPRoute created" in ingress["kserve-knative"].text  # Knative routes it itself
    assert ingress["raw"].text.startswith("no URL published") and "Service/qwen-cluster-raw" in ingress["raw"].text

    assert cells["multi_model"]["raw"].text.startswith("qwen2.5-0.5b → llama-3.2-1b: 3 of 109 fields change (same shape")
    assert "3 of 53 fields change" in cells["multi_model"]["llm-d"].text

    control = cells["control"]
    assert control["raw"].text.startswith("no controller of its own")
    assert "control plane: 10 pods (kserve 2, cert-manager 3, knative-serving 5)" in control["kserve-knative"].text
    assert "control plane: 5 pods (kserve 2, cert-manager 3)" in control["kserve-standard"].text
    assert "Knative Serving (v1)" in control["kserve-knative"].text
    assert "nothing it needs is missing" in cells["prereqs"]["llm-d"].text
    assert "llmisvc-controller-manager v0.20.0 (1 ready)" in cells["prereqs"]["llm-d"].text

    assert cells["gateway"]["raw"].status == "observed" and "raw vLLM has no gateway" in cells["gateway"]["raw"].text
    assert cells["gateway"]["llm-d"].trials == 25 and cells["gateway"]["llm-d"].text.startswith("TTFT 8.67 ms [8.18, 9.67]")
    # Every layer's c=32 meets the objectives; llm-d's was client-limited, so its best valid stage is c=16.
    assert cells["goodput"]["kserve-knative"].text.startswith("concurrency 32: 55.83 [55.35–56.19] req/s")
    assert cells["goodput"]["llm-d"].text.startswith("concurrency 16: ")
    assert cells["goodput"]["llm-d"].text.endswith("left out as not valid: c=32 (client-limited)")
    assert cells["ttft"]["llm-d"].badge == "measured · client-limited · synthetic"
    cost = cells["cost"]
    assert cost["raw"].text.startswith("0.0035 USD per 1,000 requests at c=32 within the SLOs (56.07 req/s on 1 replica")
    assert "idle: 1 replica kept, 511.00 USD a month" in cost["raw"].text
    assert "at c=16 within the SLOs" in cost["llm-d"].text and "idle: 0 replicas kept, 0.00 USD" in cost["kserve-knative"].text


def test_full_cluster_advice_and_recommendations():
    run = load_run(RUNS / "cluster-full")
    advice, needs = advice_of(run)
    assert advice["raw"].verdict == "misses"
    assert any("failed 13 of 58 requests" in r and "over the 5 the study allows" in r for r in advice["raw"].reasons)
    assert advice["llm-d"].verdict == "misses"  # its rollout cut 49 of 319 requests in this run
    assert any("failed 49 of 319 requests" in r for r in advice["llm-d"].reasons)
    # It fits every objective measured; the routing experiment was not run, so "so far".
    assert advice["kserve-standard"].verdict == "fits so far" and advice["kserve-knative"].verdict == "misses"
    assert "not measured in this run: Routing with shared prefixes" in advice["kserve-standard"].reasons
    assert any("canary split held" in r for r in advice["kserve-standard"].reasons)

    update = needs["Model updates with at most 5 failed requests"]
    assert update.layers == ["kserve-standard"]
    assert "raw replaces its pods in place" in update.reading and "second replica" in update.reading
    assert needs["A traffic-split canary"].layers == ["kserve-standard", "kserve-knative"]
    assert "raw: raw vLLM has no traffic split" in needs["A traffic-split canary"].reading
    scale = needs["Scale to zero when idle, woken by a request"]
    assert scale.layers == ["kserve-knative"] and "scaled by hand" in scale.reading
    assert needs["A stable URL made for each model"].layers == ["kserve-standard", "kserve-knative", "llm-d"]
    assert needs["The fewest moving parts to run and upgrade"].layers == ["raw"]
    load = next(r for need, r in needs.items() if need.startswith("The most load within"))
    # Tied within their 95 % intervals; llm-d's best valid stage trails them beyond the noise.
    assert load.layers == ["raw", "kserve-standard", "kserve-knative"]
    assert "are within each other's 95 % intervals" in load.reading and "llm-d trails raw by 9.62 req/s" in load.reading
    assert needs["The lowest cost per request"].layers == ["raw", "kserve-standard", "kserve-knative"]
    assert needs["The least to write and review per model"].layers == ["llm-d"]

    # The same measurements against other objectives give other advice.
    slos = run.context["params"]["slos"]
    slos.update(cold_start_s=0.5, update_failed_requests=0, time_to_ready_s=2)
    advice, needs = advice_of(run)
    knative = advice["kserve-knative"]
    assert knative.verdict == "misses"
    assert any("cold start 2.33 s exceeds the cold-start objective of 0.5 s" in r and "511.00 USD a month" in r
               for r in knative.reasons)  # fmt: skip
    assert any("ready in 3.23 s at worst, over the time-to-ready objective of 2 s" in r for r in knative.reasons)
    assert advice["kserve-knative"].verdict == "misses"  # 64 failed requests are over 0
    assert needs["Model updates without failed requests"].layers == ["kserve-standard"]
    assert needs["Scale to zero when idle, woken by a request"].layers == []


def test_partial_cluster_run_explains_what_is_missing():
    table, cells = cells_of(RUNS / "cluster-partial")
    assert cells["model_lifecycle"]["raw"].status == "measured" and "start to ready: 0.41 s (apply → Ready)" in cells["model_lifecycle"]["raw"].text
    for key in ("rollout_canary", "scale_to_zero", "gateway"):
        for layer, _ in LAYERS:
            cell = cells[key][layer]
            assert cell.status == "not-run" and cell.text.startswith("experiment not run"), (key, layer)
    assert cells["multi_model"]["raw"].status == "not-run" and "compare_models" in cells["multi_model"]["raw"].text
    assert cells["cost"]["llm-d"].text.startswith("the study sets no price")
    assert cells["ttft"]["raw"].text == "no latency stage in this run (30_latency did not run)"
    assert cells["ingress_url"]["kserve-knative"].text.startswith(
        "stable URL http://qwen-cluster-kserve-knative.servinglab.example.com (status.url); no HTTPRoute created")
    run = load_run(RUNS / "cluster-partial")
    advice, needs = advice_of(run)
    assert {a.verdict for a in advice.values()} == {"fits so far"}
    assert "Rollout / canary" in advice["raw"].reasons[-1]
    assert "A traffic-split canary" not in needs and "The fewest moving parts to run and upgrade" in needs
    html = report.render_html(RUNS / "cluster-partial")
    assert "No lifecycle experiment ran in this run." in html and "The study sets no price that applies here" in html


def test_failed_cluster_run_carries_every_reason():
    table, cells = cells_of(RUNS / "cluster-failed")
    crash = ("deploy failed: layers.llm-d: pod qwen-cluster-llm-d-kserve-6b9c8-x2mzq container main: CrashLoopBackOff after "
             "3 restarts; last log lines: ValueError: --max-model-len 8192 exceeds the KV cache of this GPU")  # fmt: skip
    for key in ("model_lifecycle", "rollout_canary", "ingress_url", "confirmed", "ttft"):
        assert cells[key]["llm-d"].status == "failed" and cells[key]["llm-d"].text == crash, key
    assert cells["what_you_write"]["llm-d"].status == "measured"  # rendered, whatever the cluster did
    assert "what the platform creates is unknown: deploy failed" in cells["what_you_write"]["llm-d"].text
    scale = cells["scale_to_zero"]["raw"]
    assert scale.status == "failed" and scale.text.startswith("experiment failed: LayerNotReadyError: layers.raw: pod ")
    assert scale.text.endswith("3 Insufficient nvidia.com/gpu. (the layer was torn down after it)")
    assert "model update: experiment interrupted: KeyboardInterrupt: (the layer was restored after it)" in (
        cells["model_lifecycle"]["kserve-standard"].text)
    assert cells["rollout_canary"]["kserve-standard"].status == "not-run"
    canary = cells["rollout_canary"]["kserve-knative"]
    assert "canary: experiment failed: LayerNotReadyError" in canary.text and "64 of 340 requests failed" in canary.text
    # Its model update was measured, its canary failed: the badge says the worse part, not a plain "measured".
    assert canary.status == "measured" and canary.badge == "measured · partly failed · synthetic"
    assert not any(c.partly_failed for key, row in cells.items() for layer, c in row.items()
                   if (key, layer) != ("rollout_canary", "kserve-knative"))  # fmt: skip

    run = load_run(RUNS / "cluster-failed")
    advice, needs = advice_of(run)
    assert advice["llm-d"].verdict == "broken"
    assert "failed in this run: Scale-to-zero" in advice["raw"].reasons
    assert "kserve-knative: the canary failed" in needs["A traffic-split canary"].reading
    html = report.render_html(RUNS / "cluster-failed")
    listed = warnings_section(html)
    # Grouped by kind, with counts, what each concerns named, and every reason whole.
    for kind, count in (("Deploy failed", 1), ("Lifecycle experiment failed", 2), ("Lifecycle experiment interrupted", 1),
                        ("Notebook failed", 1), ("Run status", 1)):  # fmt: skip
        assert f'<span class="wkind">{kind}</span> · {count}<ul>' in listed, kind
    assert "Failures and warnings (6)" in html
    for where, reason in (("llm-d", "layers.llm-d: pod qwen-cluster-llm-d-kserve-6b9c8-x2mzq"),
                          ("raw (scale_to_zero #1)", "LayerNotReadyError"),
                          ("kserve-standard (model_update #1)", "KeyboardInterrupt: (the layer was restored)"),
                          ("40_lifecycle", "ServinglabError"), ("", "the run ended as failed")):  # fmt: skip
        assert (f'<span class="where">{where}</span>: {reason}' if where else reason) in listed, where
    # A short log stays in view under its first line; the root cause is on the page, not folded away.
    for first, log in (("llm-d</span>: layers.llm-d: pod qwen-cluster-llm-d-kserve-6b9c8-x2mzq container "
                        "main: CrashLoopBackOff after 3 restarts; last log lines:",
                        "ValueError: --max-model-len 8192 exceeds the KV cache of this GPU"),
                       ("kserve-knative (canary #1)</span>: LayerNotReadyError: layers.kserve-knative:",
                        "RuntimeError: engine core initialization failed")):  # fmt: skip
        start = listed.index(first)
        shown = listed.index('<pre class="log">', start)
        assert shown < listed.index(log, start) < listed.index("</li>", start)
    assert html.count('<td class="cell-measured cell-partly-failed"><details class="cell"><summary>'
                      '<span class="tag tone-failed">measured · partly failed · synthetic<') == 1


def warnings_section(html: str) -> str:
    return html[html.index('<section id="warnings"') : html.index("</section>", html.index('<section id="warnings"'))]


def test_latency_warnings_reach_the_run_context():
    html = report.render_html(RUNS / "cluster-full")
    warnings = warnings_section(html)
    # One line per verdict, the stages named under their layers, with the numbers behind it.
    assert ("client-limited: llm-d (c=32): the client's event loop woke late at p99 by 16.1 ms (limit 5 ms)"
            in warnings.replace("&#39;", "'"))  # fmt: skip
    assert warnings.count("client-limited") == 1 and "the client was the bottleneck" not in warnings
    # Everything in these runs was made by a script, and the report says so before the table, in one line.
    top = html[: html.index('id="decision-table"')]
    assert ('id="provenance-line"><b>Provenance</b> measured here: none · imported: none · synthetic: 16 latency '
            "stages, 28 lifecycle trials, 2,541 other records — every cell they reach says so") in top
    assert "<b>Validity</b> valid stages 15 of 16 (client-limited: llm-d c=32)" in top
    assert "95 % intervals shown for 16 of 16 stages (bootstrap, over 3 repeats)" in top
    # The detail of what is synthetic stays in the run context.
    context = html[html.index('<section id="context"') : html.index('<section id="warnings"')]
    assert 'id="provenance"' in context and "Synthetic data: latency stages (16), latency requests" in context


@pytest.mark.parametrize("name", ["cluster-full", "cluster-partial", "cluster-failed"])
def test_cluster_reports_are_byte_identical_wherever_rendered(name, tmp_path):
    first = report.render_html(RUNS / name)
    moved = tmp_path / "elsewhere" / name
    shutil.copytree(RUNS / name, moved)
    assert report.render_html(moved) == first
    assert "<script" not in first and "<link" not in first and " src=" not in first
    assert "pending" not in first
    ids = re.findall(r'id="([^"]+)"', first)
    assert len(ids) == len(set(ids)), "anchors are unique"
    for anchor in re.findall(r'href="#([^"]+)"', first):
        assert anchor in ids, anchor


def test_full_cluster_report_shows_every_figure():
    html = report.render_html(RUNS / "cluster-full")
    for anchor in ("fig-time-to-ready", "fig-latency-throughput", "fig-distributions", "fig-goodput",
                   "fig-lifecycle-ready", "fig-update-timeline", "fig-cold-start", "fig-canary", "fig-cost"):  # fmt: skip
        assert f'<figure id="{anchor}">' in html, anchor
    assert "kserve-knative is cheapest at c=32" in html and "hollow points missed the p95 latency objectives" in html
    for section in ("manifests-table", "model-distances", "lifecycle-table", "cost-table", "idle-cost-table",
                    "control-plane", "recommendations"):  # fmt: skip
        assert f'id="{section}"' in html, section
    # Long tables below the first screen are folded, their size on the fold; short ones stay open.
    assert '<details class="fold"><summary>Every trial (28)</summary><div class="scroll"><table id="lifecycle-table">' in html
    assert '<details class="fold"><summary>Every stage (16)</summary><div class="scroll"><table id="latency-stages">' in html
    assert '<h2>Manifests: what you write, what the platform creates</h2>\n<p>Recorded' in html
    toc = html[html.index('<nav class="toc"') : html.index("</nav>")]
    sections = re.findall(r'<section id="([a-z-]+)"', html)
    assert re.findall(r'href="#([a-z-]+)"', toc) == ["table"] + [s for s in sections if s not in ("verdict", "table")]


# --- on the local platform --------------------------------------------------------------------------


def test_local_run_renders_the_cluster_manifests_and_a_second_model(tmp_path):
    run_dir = make_run(tmp_path, "complete")
    table, cells = cells_of(run_dir)
    assert cells["what_you_write"]["kserve"].status == "measured"
    assert "rendered as on a cluster: this run's platform is local" in cells["what_you_write"]["kserve"].text
    assert "what a cluster creates from them needs platform: kubernetes" in cells["what_you_write"]["raw"].text
    assert cells["multi_model"]["raw"].status == "not-run"
    assert cells["control"]["kserve"].status == "needs-platform"
    assert cells["rollout_canary"]["raw"].status == "not-run"  # no lifecycle in this run
    assert cells["cost"]["raw"].text.startswith("the study sets no price")

    other = ("compare_models={other: {name: other-tiny, served_name: other, source: {kind: built, shape: tiny, seed: 1}, "
             "engine_args: {dtype: bfloat16, max-model-len: 2048}}}")  # fmt: skip
    cells = decision_table(load_run(make_run(tmp_path / "two", "complete", [other]))).cells()
    for layer in ("raw", "kserve", "llm-d"):
        assert cells["multi_model"][layer].status == "measured"
        assert cells["multi_model"][layer].text.startswith("tiny → other: ")


def test_local_lifecycle_records_fill_the_lifecycle_rows(tmp_path):
    from servinglab import records

    run_dir = make_run(tmp_path, "complete")
    base = {"layer": "raw", "kind": "raw-vllm", "platform": "local", "trial": 0, "reason": None, "settled": None,
            "started_at_unix": 1.0, "ended_at_unix": 2.0, "measurements": {}}  # fmt: skip
    during = {"requests": 12, "failed": 12, "errors": {"connection_error": 12}, "p50_e2el_ms": None, "p99_e2el_ms": None}
    records.append(run_dir, records.LIFECYCLE, [
        base | {"experiment": "model_update", "status": "measured", "measurements": {
            "how": "restart with the new arguments", "replaces_in_place": True, "change_to_ready_s": 40.2,
            "change_to_served_s": 40.9,
            "longest_gap_s": 41.0, "changed_args": {"max-num-seqs": 128}, "during": during,
            "before": during | {"failed": 0, "errors": {}}, "after": during | {"failed": 0, "errors": {}}}},
        base | {"experiment": "canary", "status": "unsupported", "reason": "raw vLLM has no traffic split: by hand",
                "refused_by": "layer"},
        base | {"experiment": "gateway_hop", "status": "unsupported", "reason": "raw vLLM has no gateway: none",
                "refused_by": "layer"},
        base | {"layer": "kserve", "kind": "kserve", "experiment": "canary", "status": "unsupported",
                "reason": "needs platform: kubernetes", "refused_by": "platform"},
    ])  # fmt: skip
    run = load_run(run_dir)
    cells = decision_table(run).cells()
    assert cells["rollout_canary"]["raw"].status == "measured"
    assert "12 of 12 requests failed (connection_error 12)" in cells["rollout_canary"]["raw"].text
    assert cells["gateway"]["raw"].status == "observed"  # the layer's own limit, not a gap of this run
    assert cells["rollout_canary"]["kserve"].status == "needs-platform"
    advice, needs = advice_of(run)
    update = needs["Model updates without failed requests"]
    assert update.layers == [] and "raw replaces its pods in place" in update.reading


# --- the pieces -------------------------------------------------------------------------------------


def test_fields_and_model_distance_are_counted_from_the_manifests():
    assert manifests.count_fields({"a": 1, "b": {"c": [1, 2], "d": {}}, "e": []}) == 5
    run = load_run(RUNS / "cluster-full")
    [distance] = manifests.recorded(run)["raw"].distances
    assert (distance.changed_fields, distance.added_or_removed, distance.diff_lines) == (3, 0, 6)
    assert distance.paths == ["Deployment/qwen-cluster-raw.spec.template.spec.containers.vllm.args"]
    # A flag more shifts the ones after it: only what was inserted counts.
    study = Study.model_validate(run.params)
    extra = study.model.model_copy(deep=True)
    extra.engine_args = {**study.model.engine_args, "enforce-eager": True}
    # Against today's rendering of the same study: the recorded run predates objects servinglab now adds.
    ours = render_layer(study, "raw")
    same_but_one = manifests.distance("eager", extra.served_name, ours, render_layer(with_model(study, extra), "raw"))
    assert (same_but_one.changed_fields, same_but_one.added_or_removed) == (1, 1)


def test_a_run_written_before_runs_kept_their_manifests_still_renders():
    """Version 1 runs: read through the migrations, rendered, and honest about what they did not record."""
    table, cells = cells_of(RUNS_V1 / "cluster-full")
    assert table.groups == [("raw vLLM", 1), ("KServe InferenceService", 2), ("LLMInferenceService (llm-d)", 1)]
    for layer, _ in LAYERS:
        for key in ("what_you_write", "multi_model"):
            assert cells[key][layer].status == "not-run" and cells[key][layer].text.startswith("not recorded in this run")
    assert cells["rollout_canary"]["raw"].text.startswith("no traffic split: raw vLLM has no traffic split")  # refused_by: layer
    assert "control plane: 10 pods (kserve 2, cert-manager 3, knative-serving 5)" in cells["control"]["kserve-knative"].text
    assert "kserve-controller-manager v0.20.0 (1 ready), default deployment mode Knative" in cells["prereqs"]["kserve-standard"].text
    assert cells["cost"]["raw"].text.startswith("0.0021 USD per 1,000 requests at c=32")
    html = report.render_html(RUNS_V1 / "cluster-full")
    assert "Manifests: not recorded in this run" in html
    for name in ("cluster-partial", "cluster-failed"):
        assert "<table" in report.render_html(RUNS_V1 / name)


def test_compare_models_and_update_objective_are_validated():
    from servinglab.config import load_study
    from servinglab.errors import ParamsError

    example = Path(__file__).resolve().parents[1] / "params" / "cluster-example.yaml"
    study = load_study(example, ["compare_models={llama: {name: m, served_name: l, source: {kind: uri, uri: hf://m/l}}}",
                                 "slos.update_failed_requests=0"])  # fmt: skip
    assert study.compare_models["llama"].served_name == "l" and study.slos.update_failed_requests == 0
    with pytest.raises(ParamsError, match="compare_models: .*must be lowercase"):
        load_study(example, ["compare_models={Llama: {name: m, served_name: l, source: {kind: uri, uri: hf://m/l}}}"])
    with pytest.raises(ParamsError, match=r"compare_models\.llama\.served_name: required key is missing"):
        load_study(example, ["compare_models={llama: {name: m, source: {kind: uri, uri: hf://m/l}}}"])
    with pytest.raises(ParamsError, match="slos.update_failed_requests"):
        load_study(example, ["slos.update_failed_requests=-1"])


def test_every_row_is_in_the_fixture_table():
    table, _ = cells_of(RUNS / "cluster-full")
    assert [row.key for row, _ in table.rows] == [row.key for row in ROWS]


# --- the report reads what the run recorded -----------------------------------------------------------


def _leaves(obj) -> int:
    if isinstance(obj, dict):
        return sum(_leaves(v) for v in obj.values()) if obj else 1
    if isinstance(obj, list):
        return sum(_leaves(v) for v in obj) if obj else 1
    return 1


def _as_written(obj):
    """An object as its user writes it: servinglab's spec-hash label and run-id annotation taken out."""
    if isinstance(obj, dict):
        out = {k: _as_written(v) for k, v in obj.items() if k not in ("servinglab.io/spec-hash", "servinglab.io/run-id")}
        return {k: v for k, v in out.items() if not (k == "annotations" and v == {})}
    if isinstance(obj, list):
        return [_as_written(v) for v in obj]
    return obj


def test_the_report_calls_no_renderer_and_counts_the_recorded_manifests(monkeypatch):
    from servinglab import layers
    from servinglab.layers import render as rendering

    run_dir = RUNS / "cluster-full"
    before = report.render_html(run_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the report rendered a manifest instead of reading the recorded one")

    for kind in layers.kinds():
        monkeypatch.setattr(type(kind), "render", refuse)
    for name in ("render_layer", "render_study", "as_cluster_study"):
        monkeypatch.setattr(rendering, name, refuse)
    after = report.render_html(run_dir)
    assert after == before
    table = after[after.index('id="manifests-table"') : after.index("</table>", after.index('id="manifests-table"'))]
    for layer in ("raw", "kserve-standard", "kserve-knative", "llm-d"):
        objects = [_as_written(o) for o in records.read_manifest(records.manifest_path(run_dir, layer))]
        lines, fields = len(records.to_yaml(objects).splitlines()), sum(_leaves(o) for o in objects)
        assert f"<tr><td>{layer}</td><td>" in table
        row = table[table.index(f"<tr><td>{layer}</td>") :].split("</tr>", 1)[0]
        assert f"<td>{lines}</td><td>{fields}</td>" in row, (layer, lines, fields, row)


def test_a_damaged_line_is_named_in_the_report_never_dropped_silently(tmp_path):
    run_dir = tmp_path / "cluster-full"
    shutil.copytree(RUNS / "cluster-full", run_dir)
    path = run_dir / "data" / "latency_requests.jsonl"
    count = len(path.read_text().splitlines())
    with open(path, "a") as handle:
        handle.write("{not json\n")
        handle.write('{"layer": "raw", "stage": "c=1", "ind')  # a write cut short when the run stopped
    run = load_run(run_dir)
    assert len(run.latency_requests) == count
    html = report.render_html(run_dir)
    warnings = warnings_section(html)
    assert '<span class="wkind">Damaged records</span> · 1' in warnings
    assert (f"data/latency_requests.jsonl: 2 lines could not be read and are left out (line {count + 1}: not JSON"
            in warnings)  # fmt: skip
    assert f"line {count + 2}: cut short (the last line, written when the run stopped)" in warnings
