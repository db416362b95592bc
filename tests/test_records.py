"""The run directory through its one module: declared tables, checked writes, reads that name every line
they could not read, the writer off the measuring thread, run.json and its migrations, recorded manifests."""

from __future__ import annotations

import json
import threading
import time

import pytest

from servinglab import records
from servinglab.errors import RunDirError


def smoke(i: int) -> dict:
    return {"layer": "raw", "check": f"c{i}", "passed": True, "expected": "x", "observed": i, "latency_ms": 1.0,
            "at": "2026-12-01T00:00:00.000Z"}  # fmt: skip


def test_create_run_makes_the_layout_and_points_latest(tmp_path):
    first = records.create_run(tmp_path, "s", {"params": {"a": 1}})
    second = records.create_run(tmp_path, "s", {"params": {}})
    assert first != second and sorted([first.name, second.name]) == [first.name, second.name]
    assert (tmp_path / "s" / "latest").resolve() == second
    assert records.latest_run(tmp_path, "s") == second
    for sub in ("data", "logs", "notebooks"):
        assert (first / sub).is_dir()
    context = records.read_context(first)
    assert context["schema_version"] == records.SCHEMA_VERSION
    assert context["run_id"] == first.name and context["params"] == {"a": 1}


def test_every_table_is_declared_with_its_file_fields_and_units():
    assert set(records.TABLES) == {"preflight", "deployments", "smoke", "latency_stages", "latency_requests",
                                   "lifecycle", "lifecycle_requests", "conversation_turns"}  # fmt: skip
    for table in records.TABLES.values():
        assert table.file == f"data/{table.name}.jsonl" and table.doc
        assert all(f.doc for f in table.fields)
    requests = records.LATENCY_REQUESTS.by_name
    assert requests["ttft_ms"].unit == "ms" and requests["sent_s"].unit == "s"


def test_a_record_that_is_not_one_is_refused_before_the_disk(tmp_path):
    run = records.create_run(tmp_path, "s", {"params": {}})
    with pytest.raises(records.RecordError, match=r"data/smoke.jsonl.*passed: missing.*surprise: not a field"):
        records.append(run, records.SMOKE, [{k: v for k, v in smoke(1).items() if k != "passed"} | {"surprise": 1}])
    with pytest.raises(records.RecordError, match=r"latency_ms: is string, expected number"):
        records.append(run, records.SMOKE, [smoke(1) | {"latency_ms": "fast"}])
    assert not records.table_path(run, records.SMOKE).exists()


def test_a_torn_last_line_and_a_bad_line_are_counted_and_named_never_dropped_silently(tmp_path):
    run = records.create_run(tmp_path, "s", {"params": {}})
    records.append(run, records.SMOKE, [smoke(1), smoke(2)])
    with open(records.table_path(run, records.SMOKE), "a") as handle:
        handle.write("not json at all\n")
        handle.write(json.dumps({"layer": "raw"}) + "\n")  # JSON, but not a smoke record
        handle.write(json.dumps(smoke(3)) + "\n")
        handle.write('{"layer": "raw", "trunc')  # a crash in the middle of a write
    read = records.read(run, records.SMOKE)
    assert [r["check"] for r in read.rows] == ["c1", "c2", "c3"]
    assert [d.number for d in read.damaged] == [3, 4, 6]
    assert read.damaged[0].reason.startswith("not JSON") and "check: missing" in read.damaged[1].reason
    assert read.damaged[2].reason.startswith("cut short")
    warning = read.warning()
    assert warning.startswith("data/smoke.jsonl: 3 lines could not be read") and "line 6: cut short" in warning
    absent = records.read(run, records.LIFECYCLE)
    assert absent.rows == [] and absent.damaged == [] and absent.warning() is None
    assert list(records.read_frame(run, records.SMOKE)["check"]) == ["c1", "c2", "c3"]


def test_the_writer_never_blocks_its_caller_on_the_disk_and_syncs(tmp_path, monkeypatch):
    run = records.create_run(tmp_path, "s", {"params": {}})
    synced: list[float] = []
    real_fsync = records.os.fsync

    def slow_fsync(fd):  # a slow disk
        time.sleep(0.3)
        synced.append(time.monotonic())
        real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", slow_fsync)
    monkeypatch.setattr(records.Writer, "SYNC_EVERY_S", 0.1)
    writer = records.Writer.to_run(run, records.SMOKE, {"layer": "raw"})
    started = time.monotonic()
    for i in range(50):
        writer.write({k: v for k, v in smoke(i).items() if k != "layer"})
        time.sleep(0.01)
    assert time.monotonic() - started < 0.5 + 0.3  # 50 writes took their own time, not the disk's
    assert threading.current_thread() is threading.main_thread()
    writer.close()
    assert len(synced) >= 2  # during the writes, and at the end
    assert [r["check"] for r in records.read(run, records.SMOKE).rows] == [f"c{i}" for i in range(50)]
    assert len(writer.rows) == 50 and all(r["layer"] == "raw" for r in writer.rows)


def test_update_context_merges_one_level(tmp_path):
    run = records.create_run(tmp_path, "s", {"params": {}, "engine": {"version": "1"}})
    records.update_context(run, engine={"system_fingerprint": "vllm-1-x"}, status="ok")
    context = records.read_context(run)
    assert context["engine"] == {"version": "1", "system_fingerprint": "vllm-1-x"}
    assert context["status"] == "ok"


def test_a_broken_run_json_is_one_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="no run.json"):
        records.read_context(tmp_path)
    path = tmp_path / "run.json"
    for text, expected in ((json.dumps({"schema_version": 99}), "schema_version 99"),
                           ("[1, 2]", "not a JSON object but list"), ("{", "not valid JSON"),
                           (json.dumps({"schema_version": 2, "study": "s", "started_at": "x", "params": {}}), "run_id: missing"),
                           (json.dumps({"schema_version": 2, "run_id": 7, "study": "s", "started_at": "x", "params": {}}),
                            "run_id: is integer, expected string")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(RunDirError, match=expected) as caught:
            records.read_context(tmp_path)
        assert str(path) in str(caught.value)
    path.write_bytes(b'{"schema_version": 2, "study": "\xff"}')
    with pytest.raises(RunDirError, match="not valid JSON"):
        records.read_context(tmp_path)


def test_a_version_1_run_is_migrated_as_it_is_read(tmp_path):
    context = {"schema_version": 1, "run_id": "r", "study": "s", "started_at": "x",
               "params": {"layers": {"raw": {"kind": "raw-vllm"}, "ks": {"kind": "kserve", "mode": "Knative",
                                                                         "min_replicas": 0}}}}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(context))
    (tmp_path / "data").mkdir()
    lines = [
        {"layer": "raw", "kind": "raw-vllm", "platform": "local", "status": "ready", "reused": False, "phases_s": {},
         "command": [], "applied": [], "created": []},
        {"layer": "ks", "kind": "kserve", "platform": "local", "status": "unsupported", "reused": False,
         "phases_s": {}, "command": [], "applied": [], "created": []},
    ]  # fmt: skip
    (tmp_path / "data" / "deployments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    read = records.read_context(tmp_path)
    assert read["schema_version"] == records.SCHEMA_VERSION
    assert list(read["layer_kinds"]) == ["raw-vllm", "kserve"] and read["layer_kinds"]["raw-vllm"]["title"] == "raw vLLM"
    deployments = records.read(tmp_path, records.DEPLOYMENTS).rows
    assert [(d["serving_replicas"], d["idle_replicas"]) for d in deployments] == [(1, 1), (1, 0)]
    assert json.loads((tmp_path / "run.json").read_text())["schema_version"] == 1  # read, never rewritten


def test_a_version_2_run_gets_provenance_and_verdicts_from_its_numbers(tmp_path):
    """Stages recorded before verdicts: the verdict from p99_loop_lag_ms and burst_deliveries, never from the
    warnings' words (which go, since the verdict says them); the server's interpolated percentiles set apart."""
    context = {"schema_version": 2, "run_id": "r", "study": "s", "started_at": "x", "params": {"layers": {}}}
    (tmp_path / "run.json").write_text(json.dumps(context))
    (tmp_path / "data").mkdir()
    lag = "the client was the bottleneck: its event loop woke 243.0 ms late at p99 (over 5 ms), so latencies ..."
    burst = "42 of 60 streams reached the client in one burst at the end (first token after half the request's time)"
    base = {"layer": "raw", "mode": "closed", "max_concurrency": 1}
    stages = [
        base | {"stage": "c=1", "source": "servinglab", "server": {"mean_queue_ms": 0.02, "p50_queue_ms": 150.0},
                "summary": {"completed": 60, "p99_loop_lag_ms": 243.0, "burst_deliveries": 42,
                            "warnings": [lag, burst, "3 requests failed"]}},
        base | {"stage": "c=2", "source": "servinglab", "summary": {"completed": 60, "p99_loop_lag_ms": 1.2,
                                                                    "burst_deliveries": 42, "warnings": []}},
        base | {"stage": "c=4", "source": "servinglab", "summary": {"completed": 60, "p99_loop_lag_ms": 1.2,
                                                                    "burst_deliveries": 0, "warnings": [lag]}},
        base | {"stage": "c=8", "source": "vllm bench serve", "summary": {"completed": 80}},
    ]  # fmt: skip
    (tmp_path / "data" / "latency_stages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stages))
    (tmp_path / "data" / "smoke.jsonl").write_text(json.dumps(smoke(0)) + "\n")
    read = records.read(tmp_path, records.LATENCY_STAGES).rows
    assert [s["validity"]["verdict"] for s in read] == ["client-limited", "server-burst", "valid", "unchecked"]
    assert [s["provenance"] for s in read] == ["measured", "measured", "measured", "imported"]
    assert read[0]["summary"]["warnings"] == ["3 requests failed"] and read[2]["summary"]["warnings"] == []
    assert read[0]["server"] == {"mean_queue_ms": 0.02, "p50_queue_ms_interpolated": 150.0}
    assert records.read(tmp_path, records.SMOKE).rows[0]["provenance"] == "measured"
    assert records.read_context(tmp_path)["schema_version"] == records.SCHEMA_VERSION


def test_manifests_are_recorded_with_what_was_assumed(tmp_path):
    objects = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}]
    path = records.write_manifest(tmp_path, "raw", objects, "rendered as on a cluster")
    records.write_manifest(tmp_path, "raw", None, None, model="other", error="does not render: too long")
    assert path == tmp_path / "manifests" / "raw.yaml" and records.read_manifest(path) == objects
    index = records.read_manifest_index(tmp_path)
    assert index["raw.yaml"]["assumed"] == "rendered as on a cluster"
    assert index["compare/other/raw.yaml"]["error"] == "does not render: too long"
    (tmp_path / "manifests" / "raw.yaml").write_text("- just a list\n")
    with pytest.raises(RunDirError, match=r"raw.yaml: holds something that is not a Kubernetes object"):
        records.read_manifest(path)
    assert records.read_manifest_index(tmp_path / "elsewhere") is None


def test_git_state_outside_a_repository(tmp_path):
    assert records.git_state(tmp_path) == {"sha": None, "dirty": None}
