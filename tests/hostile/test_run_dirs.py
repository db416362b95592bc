"""Run directories as a careless user or a neighbour leaves them: damaged, hand-edited or planted.

``report``, ``export`` and ``import`` read a run directory that someone else may have written. Each test
starts from a valid run (the one tests/test_report_compare.py makes), damages it one way, and checks that
the command either reads what it can and names every line it could not, or stops with one line naming the
file and the field (exit code 2, no traceback), and that nothing is ever written outside the folder asked for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_report_compare import make_run

from servinglab import cli, records
from servinglab.report import write_index

RUN_ID = "20261126T000000Z"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("pristine"), RUN_ID)


@pytest.fixture()
def run(pristine, tmp_path) -> Path:
    """A fresh copy of the valid run, at runs/ci/<run-id> under this test's folder."""
    copy = tmp_path / "runs" / "ci" / RUN_ID
    shutil.copytree(pristine, copy)
    return copy


def edit_context(run: Path, **fields) -> None:
    """Set (or, with None, remove) top-level fields of run.json."""
    context = json.loads((run / "run.json").read_text())
    for key, value in fields.items():
        if value is None:
            context.pop(key, None)
        else:
            context[key] = value
    (run / "run.json").write_text(json.dumps(context))


def edit_params(run: Path, **sections) -> None:
    context = json.loads((run / "run.json").read_text())
    edit_context(run, params=context["params"] | sections)


def edit_records(run: Path, table: str, change) -> None:
    path = run / "data" / f"{table}.jsonl"
    rows = [change(json.loads(line)) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def refused(capsys, argv: list[str]) -> str:
    """Run the command, which must refuse with exit code 2; its one line of error."""
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- run.json ---------------------------------------------------------------------------------------------

BROKEN_CONTEXTS = {
    "unparseable": (lambda r: (r / "run.json").write_text('{"run_id": '), "run.json: not valid JSON"),
    "not an object": (lambda r: (r / "run.json").write_text("[1, 2]"), "run.json: not a JSON object but list"),
    "no run_id": (lambda r: edit_context(r, run_id=None), "run.json: run_id: missing"),
    "run_id not a string": (lambda r: edit_context(r, run_id=20261126), "run.json: run_id: is integer, expected string"),
    "params not an object": (lambda r: edit_context(r, params=["raw"]), "run.json: params: is list, expected object"),
    "a non-UTF-8 byte": (
        lambda r: (r / "run.json").write_bytes((r / "run.json").read_bytes().replace(b'"ci"', b'"c\xe9"', 1)),
        "run.json: not valid JSON ('utf-8' codec can't decode byte 0xe9",
    ),
    "layers a list": (lambda r: edit_params(r, layers=["raw"]), "run.json: params.layers: is list, expected object"),
    "workloads a string": (lambda r: edit_params(r, workloads="x"), "run.json: params.workloads: is string, expected object"),
    "latency workload a list": (
        lambda r: edit_params(r, workloads={"latency": [1]}),
        "run.json: params.workloads.latency: is list, expected object",
    ),
    "a layer without kind": (lambda r: edit_params(r, layers={"raw": {}}), "run.json: params.layers.raw: not a layer with a kind"),
    "a layer kind not an object": (
        lambda r: edit_context(r, layer_kinds={"raw-vllm": "raw"}),
        "run.json: layer_kinds.raw-vllm: not an object with a title and a column",
    ),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(BROKEN_CONTEXTS))
def test_a_broken_run_json_is_one_line_naming_file_and_field(run, tmp_path, capsys, damage):
    breaks, expected = BROKEN_CONTEXTS[damage]
    breaks(run)
    out = tmp_path / "out"
    for argv in (["report", str(run), "--out", str(out)], ["export", "llmd-benchmark", str(run), "--out", str(out)]):
        err = refused(capsys, argv)
        assert f"{run}/{expected}" in err
    assert not out.exists()


# --- names from run.json never become paths outside the output folder -----------------------------------

HOSTILE_NAMES = {
    "study climbing out": (dict(study="../../x"), "study: '../../x' is not a study name"),
    "study as an absolute path": (dict(study="/tmp/x"), "study: '/tmp/x' is not a study name"),
    "study with markup": (dict(study="<script>alert(1)</script>"), "study: '<script>alert(1)</script>' is not a study name"),
    "run_id climbing out": (dict(run_id="../../y"), "run_id: '../../y' is not a run id"),
    "run_id with a separator": (dict(run_id="20261126T000000Z/../../z"), "is not a run id"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE_NAMES))
def test_names_from_run_json_are_checked_as_at_study_time(run, tmp_path, capsys, case):
    fields, expected = HOSTILE_NAMES[case]
    edit_context(run, **fields)
    out = tmp_path / "a" / "b" / "out"
    before = files_under(tmp_path)
    for argv in (["report", str(run), "--out", str(out)], ["export", "llmd-benchmark", str(run), "--out", str(out)]):
        assert expected in refused(capsys, argv)
    assert files_under(tmp_path) == before


def test_a_layer_name_that_climbs_out_is_refused(run, tmp_path, capsys):
    edit_params(run, layers={"../../../w": {"kind": "raw-vllm"}})
    err = refused(capsys, ["export", "llmd-benchmark", str(run), "--out", str(tmp_path / "out")])
    assert f"{run}/run.json: params.layers: '../../../w' is not a valid name" in err


def test_a_record_whose_layer_climbs_out_is_a_damaged_line(run, tmp_path, capsys):
    """A latency stage naming layer ``../../z`` would name an export file outside --out: it is counted and
    reported as a line that could not be read, never written anywhere."""
    edit_records(run, "latency_stages", lambda r: r | {"layer": "../../z"} if r["stage"] == "c=4" else r)
    out = tmp_path / "deep" / "er" / "out"
    assert cli.main(["export", "llmd-benchmark", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run}/data/latency_stages.jsonl: 1 line could not be read" in err
    assert "line 2: layer: '../../z' is not a valid name" in err
    assert {p.relative_to(tmp_path) for p in files_under(tmp_path) if "runs" not in p.parts} == {
        Path("deep/er/out/br_v0.2.1_raw_c1.yaml")
    }


def test_run_json_never_chooses_where_reports_go(run, tmp_path, capsys, monkeypatch):
    """``project_dir`` and ``paths.reports_dir`` are the run's data: without --out the reports go to the current
    project's reports/ folder."""
    elsewhere = tmp_path / "elsewhere"
    edit_context(run, project_dir=str(elsewhere))
    edit_params(run, paths={"reports_dir": str(tmp_path / "planted"), "runs_dir": "runs", "cache_dir": "cache"})
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    assert cli.main(["report", str(run)]) == 0
    assert cli.main(["export", "llmd-benchmark", str(run)]) == 0
    assert cli.main(["export", "csv", str(run)]) == 0
    written = {p.relative_to(tmp_path) for p in files_under(tmp_path) if "runs" not in p.parts}
    assert written == {
        Path("project/reports") / name for name in ("ci-20261126T000000Z.html", "ci.html", "index.html")
    } | {Path("project/reports/llmd-benchmark/ci-20261126T000000Z") / f"br_v0.2.1_raw_{s}.yaml" for s in ("c1", "c4")} | {
        Path("project/reports/csv/ci-20261126T000000Z") / name  # the report's tables, which it links
        for name in ("decision_table.csv", "latency_stages.csv", "lifecycle_trials.csv")
    }
    assert not elsewhere.exists() and not (tmp_path / "planted").exists()


def test_a_link_in_the_reports_folder_is_not_written_through(run, tmp_path, capsys):
    """A neighbour's link named like the study's newest report would have the copy land on its target."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out / "ci.html").symlink_to(target)
    err = refused(capsys, ["report", str(run), "--out", str(out)])
    assert f"{out}: refusing to write 'ci.html', which is not a file directly inside it" in err
    assert target.read_text() == "keep me"


def test_out_that_is_a_file_is_refused(run, tmp_path, capsys):
    out = tmp_path / "out.html"
    out.write_text("x")
    for argv in (["report", str(run), "--out", str(out)], ["export", "llmd-benchmark", str(run), "--out", str(out)]):
        assert f"{out}: not a folder" in refused(capsys, argv)
    assert out.read_text() == "x"


def test_out_under_a_file_is_one_line_naming_it(run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "reports"
    assert cli.main(["report", str(run), "--out", str(out)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err == f"servinglab: {out}: Not a directory"


# --- reports/index.html -------------------------------------------------------------------------------------


def test_the_index_escapes_every_name_it_lists(tmp_path):
    """The index lists every .html file in the folder, whoever put it there: a name with markup stays text."""
    (tmp_path / '<img src=x onerror="alert(1)">.html').write_text("x")
    (tmp_path / "ci-20261126T000000Z.html").write_text("x")
    index = write_index(tmp_path).read_text()
    assert "<img" not in index and "onerror=\"" not in index
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</a>" in index
    assert 'href="%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E.html"' in index
    assert '<a href="ci-20261126T000000Z.html">ci-20261126T000000Z</a>' in index


# --- data files ---------------------------------------------------------------------------------------------


def test_damaged_lines_are_counted_and_reported_never_dropped(run, tmp_path, capsys):
    """A deployment without ``status``, a byte that is not UTF-8, a failed deployment without a reason."""
    edit_records(run, "deployments", lambda r: {k: v for k, v in r.items() if k != "status"})
    records.append(run, records.DEPLOYMENTS, [{
        "layer": "raw", "kind": "raw-vllm", "platform": "local", "status": "failed", "reused": False,
        "phases_s": {}, "command": [], "applied": [], "created": []}])  # fmt: skip
    with open(run / "data" / "smoke.jsonl", "ab") as handle:
        handle.write(b'{"layer": "raw", "check": "caf\xe9"}\n')
    out = tmp_path / "out"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    page = (out / "ci-20261126T000000Z.html").read_text()
    assert "data/deployments.jsonl: 1 line could not be read and is left out (line 1: status: missing)" in page
    assert "data/smoke.jsonl: 1 line could not be read and is left out (line 1: not UTF-8)" in page
    assert "Deploy failed" in page and "no reason recorded" in page  # the failed deployment is listed, without a reason
    assert cli.main(["export", "llmd-benchmark", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run}/data/deployments.jsonl: 1 line could not be read" in err
    assert f"warning: {run}/data/smoke.jsonl: 1 line could not be read" in err


def test_a_data_file_that_is_not_utf8_has_every_line_counted(run, tmp_path, capsys):
    """A whole table in another encoding: each of its lines is named as not UTF-8 (none is read as text)."""
    path = run / "data" / "latency_stages.jsonl"
    lines = path.read_text().splitlines()
    path.write_bytes(b"".join(line.encode("utf-16") + b"\n" for line in lines))
    assert cli.main(["export", "llmd-benchmark", str(run), "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{run}/data/latency_stages.jsonl: {len(lines)} lines could not be read" in err and "not UTF-8" in err
    assert f"servinglab: {run}: no latency stage in this run; nothing to export" in err


def test_a_record_value_the_report_cannot_read_is_named_not_a_traceback(run, tmp_path, capsys):
    """A stage summary stripped of its numbers (a hand edit): one line naming the run directory."""
    edit_records(run, "latency_stages", lambda r: r | {"summary": {"completed": "many"}})
    err = refused(capsys, ["report", str(run), "--out", str(tmp_path / "out")])
    assert err.startswith(f"servinglab: {run}: holds a value the report cannot read")


def test_a_broken_run_among_compared_runs_is_named(run, tmp_path, capsys):
    other = make_run(tmp_path / "second", "20261127T000000Z")
    edit_context(run, study="../x")
    err = refused(capsys, ["report", str(other), str(run), "--out", str(tmp_path / "out")])
    assert f"{run}/run.json: study: '../x' is not a study name" in err
    assert not (tmp_path / "out").exists()


# --- import ------------------------------------------------------------------------------------------------

VLLM_RESULT = {"completed": 4, "duration": 2.0, "mean_ttft_ms": 12.0, "max_concurrency": 2, "request_rate": "inf"}


@pytest.mark.parametrize("layer", ["../../x", "raw/../../x", "Raw", "-raw", "x" * 41, ""])
def test_import_refuses_a_layer_that_is_not_a_layer_name(run, tmp_path, capsys, layer):
    result = tmp_path / "result.json"
    result.write_text(json.dumps(VLLM_RESULT))
    before = (run / "data" / "latency_stages.jsonl").read_bytes()
    err = refused(capsys, ["import", "vllm-bench", str(result), "--run-dir", str(run), f"--layer={layer}"])
    assert f"--layer {layer[:60]!r}: not a layer name" in err
    assert (run / "data" / "latency_stages.jsonl").read_bytes() == before


@pytest.mark.parametrize(("content", "expected"), [
    (b"\xff\xfe{}", "not valid JSON ('utf-8' codec can't decode byte 0xff"),
    (b"[1, 2]", "not a vllm bench serve result (a JSON list, not an object)"),
    (b"7", "not a vllm bench serve result (a JSON int, not an object)"),
])  # fmt: skip
def test_import_refuses_a_file_that_is_not_a_result(run, tmp_path, capsys, content, expected):
    result = tmp_path / "result.json"
    result.write_bytes(content)
    err = refused(capsys, ["import", "vllm-bench", str(result), "--run-dir", str(run), "--layer", "raw"])
    assert f"{result}: {expected}" in err


def test_import_of_a_valid_layer_still_works(run, tmp_path, capsys):
    result = tmp_path / "result.json"
    result.write_text(json.dumps(VLLM_RESULT))
    assert cli.main(["import", "vllm-bench", str(result), "--run-dir", str(run), "--layer", "raw"]) == 0
    assert records.read(run, records.LATENCY_STAGES).rows[-1]["source_file"] == str(result)
