"""Records survive a crash without distorting what they record.

Per-request records go through a writer off the measuring event loop: the caller only queues, a thread of
the writer's own writes and flushes each record, syncs within a second and when the stage ends. These tests
try a slow disk, an interrupted load and a record that is not one of its table's, and watch where the
file is synced from (``os.fsync`` is wrapped only to see which thread calls it; the real one still runs).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PARAMS
from streaming_endpoint import StreamingEndpoint

from servinglab import records
from servinglab.config import load_study
from servinglab.errors import ServinglabError
from servinglab.experiments.lifecycle import traffic
from servinglab.experiments.lifecycle.trial import Trial, change_under_load
from servinglab.measure.client import run_local
from servinglab.measure.loadgen import StageSpec, Target
from servinglab.measure.stage import StagePlan
from servinglab.measure.workload import RequestSpec
from servinglab.platforms import Endpoint, get_platform


def request(i: int) -> dict[str, Any]:
    """A lifecycle request record, as the steady load hands it over."""
    return {"layer": "raw", "experiment": "model_update", "trial": 0, "index": i, "ok": True,
            "sent_at_unix": 1.0 + i, "ended_at_unix": 1.5 + i, "phase": "before"}  # fmt: skip


def on_disk(run: Path, table: records.Table) -> list[dict[str, Any]]:
    read = records.read(run, table)
    assert read.damaged == []
    return read.rows


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return records.create_run(tmp_path, "s", {"params": {}})


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """The name of the thread of every fsync, in order (the real fsync still runs)."""
    seen: list[str] = []
    real = records.os.fsync

    def watched(fd: int) -> None:
        seen.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(records.os, "fsync", watched)
    return seen


# ------------------------------------------------------------------------------------------- the writer


def test_a_record_is_synced_within_a_second_of_its_put_and_again_at_close(run):
    writer = records.Writer.to_run(run, records.LIFECYCLE_REQUESTS)
    put_at = time.monotonic()
    writer.put(request(0))
    deadline = put_at + 3 * writer.SYNC_EVERY_S
    while writer.stats.syncs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.stats.syncs == 1, "no sync within a second of the put"
    assert writer.stats.last_sync_monotonic_s - put_at <= writer.SYNC_EVERY_S + 0.25
    # Nothing new to sync: an idle writer does not touch the disk.
    time.sleep(1.5 * writer.SYNC_EVERY_S)
    assert writer.stats.syncs == 1
    writer.put(request(1))
    writer.close()
    assert writer.stats.syncs == 2 and writer.stats.written == 2  # the close synced the second one
    assert len(writer.stats.sync_threads) == 1 and threading.get_ident() not in writer.stats.sync_threads
    assert [r["index"] for r in on_disk(run, records.LIFECYCLE_REQUESTS)] == [0, 1]


class HeldDisk:
    """A file whose writes wait until the test lets them through: a disk that stalls."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.entered = threading.Event()  # a write is pending
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


def test_put_returns_at_once_while_the_disk_stalls(run):
    disks: list[HeldDisk] = []

    class StalledWriter(records.Writer):
        def open_file(self, path: Path) -> HeldDisk:
            disks.append(HeldDisk(path))
            return disks[-1]

    writer = StalledWriter.to_run(run, records.LIFECYCLE_REQUESTS)
    writer.put(request(0))
    assert disks[0].entered.wait(5), "the writer never wrote"
    took_s = []
    for i in range(1, 201):  # every one of these is queued behind a write the disk holds
        started = time.perf_counter()
        writer.put(request(i))
        took_s.append(time.perf_counter() - started)
    assert not disks[0].release.is_set() and writer.stats.written == 0
    assert statistics.median(took_s) < 0.001, f"put waits: median {statistics.median(took_s) * 1000:.3f} ms"
    assert max(took_s) < 0.05  # a scheduling hiccup on a busy machine at most, never the held write
    disks[0].release.set()
    writer.close()
    assert [r["index"] for r in on_disk(run, records.LIFECYCLE_REQUESTS)] == list(range(201))


def test_a_record_that_is_not_one_of_its_table_is_told_at_close_not_lost_silently(run):
    writer = records.Writer.to_run(run, records.LIFECYCLE_REQUESTS)
    writer.put(request(0))
    writer.put({k: v for k, v in request(1).items() if k != "sent_at_unix"})  # the caller is not stopped
    writer.put(request(2))
    refused = r"1 records for data/lifecycle_requests.jsonl .*sent_at_unix: missing"
    with pytest.raises(records.RecordError, match=refused):
        writer.close()
    assert [r["index"] for r in on_disk(run, records.LIFECYCLE_REQUESTS)] == [0, 2]
    assert [r["index"] for r, _ in writer.refused] == [1]


def test_a_record_after_close_is_refused(run):
    writer = records.Writer.to_run(run, records.LIFECYCLE_REQUESTS)
    writer.close()
    with pytest.raises(records.RecordError, match="after its writer was closed"):
        writer.put(request(0))


# --------------------------------------------------------------------------------- the lifecycle load


@dataclass
class WatchedTrial(Trial):
    """A trial that also keeps what its load handed over, and how long each hand-over took."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    sink_s: list[float] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)

    def sink(self, record: dict[str, Any]) -> None:
        started = time.perf_counter()
        super().sink(record)
        self.sink_s.append(time.perf_counter() - started)
        self.seen.append(record)
        self.threads.add(threading.current_thread().name)


@pytest.fixture
def trial(run: Path) -> WatchedTrial:
    study = load_study(PARAMS / "local.yaml")
    settings = study.workloads.lifecycle
    settings.steady_rate, settings.baseline_s, settings.max_tokens = 40.0, 0.5, 4
    settings.prompt = "slow steady"  # 50 ms a token: requests are in flight when the load stops
    return WatchedTrial(study, get_platform(study), run, "raw", "model_update")


def interrupted_change_under_load(trial: WatchedTrial) -> None:
    """The steady load runs, the change starts, and Ctrl-C comes in the middle of it."""

    def change() -> None:
        time.sleep(0.5)
        raise KeyboardInterrupt

    with StreamingEndpoint() as server:
        endpoint = Endpoint("raw", f"{server.url}/v1", trial.study.model.served_name)
        with pytest.raises(KeyboardInterrupt), trial.recording():
            change_under_load(trial, change, None, endpoint)


def test_an_interrupted_load_keeps_every_record_it_saw(trial, run):
    interrupted_change_under_load(trial)
    assert len(trial.seen) >= 10 and {r["phase"] for r in trial.seen} == {"before", "during"}
    written = on_disk(run, records.LIFECYCLE_REQUESTS)
    assert written == [{"provenance": "measured"} | r for r in trial.seen]


def test_the_load_never_syncs_the_disk_from_its_event_loop(trial, fsyncs):
    interrupted_change_under_load(trial)
    assert trial.threads == {"servinglab-steady"}  # the load's event loop handed every record over
    assert fsyncs and "servinglab-steady" not in fsyncs
    assert set(fsyncs) == {"servinglab-writer-lifecycle_requests"}


def test_a_slow_disk_does_not_slow_the_load(trial, monkeypatch):
    real = records.os.fsync

    def slow_fsync(fd: int) -> None:  # a disk that takes 50 ms to sync
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(records.os, "fsync", slow_fsync)
    interrupted_change_under_load(trial)
    assert len(trial.sink_s) >= 10
    assert statistics.median(trial.sink_s) < 0.001 and max(trial.sink_s) < 0.04


def test_a_batch_outside_a_trial_recording_is_refused_before_a_request_is_lost(trial):
    with StreamingEndpoint() as server:
        endpoint = Endpoint("raw", f"{server.url}/v1", trial.study.model.served_name)
        with pytest.raises(ServinglabError, match="outside its trial's recording"):
            traffic.send_batch(endpoint, RequestSpec("ok", 0, 2), 1, 1, 10.0, trial.sink, trial.tags())


# ------------------------------------------------------------------------------------ the latency client


def test_the_latency_client_never_syncs_from_its_event_loop(run, fsyncs):
    loop_threads: set[str] = set()

    class Watched(records.Writer):
        def put(self, record: dict[str, Any]) -> None:
            loop_threads.add(threading.current_thread().name)
            super().put(record)

    specs = [RequestSpec("slow request", 2, 4) for _ in range(12)]
    plan = StagePlan.make("c=4", specs, [], StageSpec(max_concurrency=4))
    with StreamingEndpoint() as server:
        with Watched.to_run(run, records.LATENCY_REQUESTS, {"layer": "raw", "stage": "c=4"}) as writer:
            merged = run_local(Target(f"{server.url}/v1", "m"), plan, writer)
    assert loop_threads == {threading.current_thread().name}  # here the stage's loop runs in this thread
    assert fsyncs and set(fsyncs) == {"servinglab-writer-latency_requests"}
    assert len(on_disk(run, records.LATENCY_REQUESTS)) == len(merged.records) == 12
