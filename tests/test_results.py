"""The run directory: incremental records, run.json updates, the latest pointer."""

from __future__ import annotations

import json

import pytest

from servinglab import results
from servinglab.errors import RunDirError


def test_create_run_makes_the_layout_and_points_latest(tmp_path):
    first = results.create_run(tmp_path, "s", {"params": {"a": 1}})
    second = results.create_run(tmp_path, "s", {})
    assert first != second and sorted([first.name, second.name]) == [first.name, second.name]
    assert (tmp_path / "s" / "latest").resolve() == second
    assert results.latest_run(tmp_path, "s") == second
    for sub in ("data", "logs", "notebooks"):
        assert (first / sub).is_dir()
    context = results.read_context(first)
    assert context["schema_version"] == results.SCHEMA_VERSION
    assert context["run_id"] == first.name and context["params"] == {"a": 1}


def test_records_are_appended_and_survive_a_torn_last_line(tmp_path):
    run = results.create_run(tmp_path, "s", {})
    results.append_records(run, "t", [{"i": 1}, {"i": 2}])
    results.append_records(run, "t", [{"i": 3}])
    with open(results.table_path(run, "t"), "a") as handle:
        handle.write('{"i": 4, "trunc')  # a crash in the middle of a write
    assert [r["i"] for r in results.read_records(run, "t")] == [1, 2, 3]
    assert list(results.read_table(run, "t")["i"]) == [1, 2, 3]
    assert results.read_records(run, "absent") == [] and results.read_table(run, "absent").empty


def test_update_context_merges_one_level(tmp_path):
    run = results.create_run(tmp_path, "s", {"engine": {"version": "1"}})
    results.update_context(run, engine={"system_fingerprint": "vllm-1-x"}, status="ok")
    context = results.read_context(run)
    assert context["engine"] == {"version": "1", "system_fingerprint": "vllm-1-x"}
    assert context["status"] == "ok"


def test_unknown_schema_version_and_missing_run_json(tmp_path):
    with pytest.raises(RunDirError, match="no run.json"):
        results.read_context(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunDirError, match="schema_version 99"):
        results.read_context(tmp_path)


def test_git_state_outside_a_repository(tmp_path):
    assert results.git_state(tmp_path) == {"sha": None, "dirty": None}
