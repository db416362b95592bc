"""Multi-turn sessions in a study (``workloads.latency.dataset.conversation``): the key is checked before anything
starts; each closed-loop stage of the latency sweep keeps c sessions in flight against the stand-in endpoint's echo
mode, one record per turn and a stage record with TTFT by turn index; the report's block reads that record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS
from streaming_endpoint import StreamingEndpoint

from servinglab import api, records
from servinglab.cli import main
from servinglab.config import load_study
from servinglab.errors import ParamsError
from servinglab.experiments import latency
from servinglab.measure.client_metrics import validity
from servinglab.platforms import Endpoint
from servinglab.report import render_html

STUDY = PARAMS / "local-multiturn.yaml"
TURNS = [3, 2, 3, 1]  # human turns of each conversation of the test's file
ECHO_WAIT_MS = 20  # the echo mode's wait per message before its first token (tests/streaming_endpoint.py)


def sharegpt(path: Path) -> Path:
    """A ShareGPT file whose turns start with ``echo``: the stand-in answers from the history it was sent."""
    data = [{"id": f"c{c}", "conversations": [
        turn for t in range(n) for turn in ({"from": "human", "value": f"echo study-c{c} turn {t}"},
                                            {"from": "gpt", "value": "the file's answer"})]}
        for c, n in enumerate(TURNS)]  # fmt: skip
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def no_overrides(tmp_path, monkeypatch):
    """The study as its file says: the session's override file (params/ci.yaml) lists an open-loop rate."""
    (tmp_path / "paths.yaml").write_text(f"paths: {{runs_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}\n")
    monkeypatch.setenv("SERVINGLAB_OVERRIDES", str(tmp_path / "paths.yaml"))
    return tmp_path


# --- the study key ----------------------------------------------------------------------------------------


def test_the_example_study_is_accepted_as_it_ships(no_overrides, capsys):
    assert main(["check", str(STUDY)]) == 0, capsys.readouterr().err
    conversation = load_study(STUDY).workloads.latency.dataset.conversation
    assert (conversation.num, conversation.max_turns) == (8, 3)


@pytest.mark.parametrize(
    "items, problem",
    [
        (["workloads.latency.dataset.name=custom"],
         "workloads.latency.dataset: conversation: only with name: sharegpt (the sessions are a ShareGPT file's "
         "conversations), not with name: custom"),
        (["workloads.latency.sweep.rates=[5]"],
         "workloads.latency: dataset.conversation: multi-turn sessions run in the closed-loop stages only "
         "(concurrency: sessions in flight), so sweep.rates: must be empty"),
        (["workloads.latency.sweep.saturation_rates=3"], "so sweep.saturation_rates: must be 0"),
        (["workloads.latency.num_warmups=2"], "so num_warmups: must be 0"),
        (["workloads.latency.concurrency=[]"], "concurrency: empty, so no stage would send the sessions"),
        (["workloads.latency.dataset.conversation.max_turns=0"], "workloads.latency.dataset.conversation.max_turns: "),
        (["workloads.latency.dataset.conversation.turns=3"], "workloads.latency.dataset.conversation.turns: "),
    ],
)  # fmt: skip
def test_a_conversation_that_cannot_run_is_refused_in_one_line_naming_file_and_key(no_overrides, capsys, items,
                                                                                     problem):  # fmt: skip
    with pytest.raises(ParamsError) as caught:
        load_study(STUDY, items)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and problem in message, message
    assert message.startswith((str(STUDY), "--set ")), message
    assert main(["check", str(STUDY), *[a for item in items for a in ("--set", item)]]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"servinglab: {message}"]


def test_a_file_with_no_human_turn_is_refused_before_anything_starts(no_overrides):
    path = no_overrides / "answers-only.json"
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "an answer to nothing"}]}]))
    with pytest.raises(ParamsError) as caught:
        load_study(STUDY, [f"workloads.latency.dataset.path={path}"])
    message = str(caught.value)
    assert message.startswith("--set workloads.latency.dataset.path=") and len(message.splitlines()) == 1
    assert message.endswith(f": workloads.latency.dataset.path: {path}: no conversation has a human turn to send")


def test_the_in_cluster_client_sends_no_sessions(no_overrides):
    with pytest.raises(ParamsError, match=r"so client: must be local \(the sessions are sent from this machine\)"):
        load_study(STUDY, ["workloads.latency.client=in-cluster"])


# --- a latency sweep of sessions --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The example study's closed-loop stages (c=1, c=2) as sessions against the echo endpoint, measured once."""
    folder = tmp_path_factory.mktemp("multiturn")
    sets = [f"workloads.latency.dataset.path={sharegpt(folder / 'sg.json')}", "workloads.latency.concurrency=[1, 2]",
            "workloads.latency.dataset.conversation.num=5", "workloads.latency.dataset.conversation.turn_delay_mean_ms=30",
            "workloads.latency.dataset.conversation.turn_delay_stddev_ms=0", "workloads.latency.past_validity=true"]  # fmt: skip
    (folder / "paths.yaml").write_text(f"paths: {{runs_dir: {folder}/runs, cache_dir: {folder}/cache}}\n")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch, StreamingEndpoint() as endpoint:
        patch.setenv("SERVINGLAB_OVERRIDES", str(folder / "paths.yaml"))
        run = api.open_study(STUDY, overrides=sets)
        stages = latency.run_layer_sweep(run.study, run.platform, Endpoint("raw", f"{endpoint.url}/v1", "tiny"),
                                         run.run_dir, modes=("closed",), say=lines.append)  # fmt: skip
        open_part = latency.run_layer_sweep(run.study, run.platform, Endpoint("raw", f"{endpoint.url}/v1", "tiny"),
                                            run.run_dir, modes=("open",))  # fmt: skip
    return run.run_dir, stages, lines, open_part


def test_each_stage_keeps_its_sessions_in_flight_and_records_every_turn(swept):
    run_dir, stages, lines, open_part = swept
    assert [s["stage"] for s in stages] == ["c=1", "c=2"] and open_part == []
    turns = records.read(run_dir, records.CONVERSATION_TURNS)
    assert turns.damaged == []
    for stage in stages:
        mine = [r for r in turns.rows if r["stage_id"] == stage["stage_id"]]
        assert all(r["layer"] == "raw" and r["stage"] == stage["stage"] and r["repeat"] == 0 for r in mine)
        assert all(not records.CONVERSATION_TURNS.problems(r) for r in mine)
        # Five sessions drawn from four conversations (one reused), each sending all its turns (at most 3).
        sessions = {r["session"] for r in mine}
        assert sessions == set(range(5))
        for session in sessions:
            its = sorted((r for r in mine if r["session"] == session), key=lambda r: r["turn"])
            assert [r["turn"] for r in its] == list(range(TURNS[its[0]["conversation"]]))
            assert [r["messages"] for r in its] == [2 * k + 1 for k in range(len(its))]
            assert all(r["ok"] for r in its) and [r["think_time_ms"] for r in its[1:]] == [30.0] * (len(its) - 1)
        assert stage["num_prompts"] == len(mine) == stage["summary"]["completed"]
        assert stage["max_concurrency"] == stage["conversations"]["max_concurrency_sessions"]
    assert len(lines) == 2 and lines[0].startswith("stage raw c=1: ") and "TTFT median by turn" in lines[0]


def test_the_stage_record_is_over_every_turn_with_ttft_by_turn_index(swept):
    run_dir, stages, _, _ = swept
    written = records.read(run_dir, records.LATENCY_STAGES).rows
    assert [s["stage_id"] for s in written] == [s["stage_id"] for s in stages]
    for stage in written:
        assert not records.LATENCY_STAGES.problems(stage)
        # The verdict is the one the stage machinery computes from the summary: never "valid" unchecked.
        assert stage["validity"]["verdict"] == validity(stage["summary"])["verdict"]
        assert stage["summary"]["median_ttft_ms"] is not None and "uncertainty" in stage
        section = stage["conversations"]
        assert (section["sessions"], section["sessions_completed"], section["repeats"]) == (5, 5, 1)
        by_turn = section["by_turn"]
        assert [t["turn"] for t in by_turn] == [0, 1, 2]
        # The echo endpoint waits 20 ms a message: the history makes each later turn's first token later.
        means = [t["mean_ttft_ms"] for t in by_turn]
        assert means[0] >= ECHO_WAIT_MS and means[0] < means[1] < means[2]
        prompts = [t["mean_prompt_tokens"] for t in by_turn]
        assert prompts[0] < prompts[1] < prompts[2]
        assert section["median_session_duration_s"] > 0 and section["p99_session_duration_s"] is not None


def test_the_report_shows_ttft_by_turn_from_the_stage_records(swept):
    run_dir, stages, _, _ = swept
    page = render_html(run_dir)
    assert '<h3 id="multi-turn">Multi-turn sessions</h3>' in page
    # The stages are computed from their turn records, and the report's consistency check finds them so.
    assert "its records disagree" not in page and "no request records behind" not in page
    for index, stage in enumerate(stages, start=1):
        table = page.split(f'<table id="multi-turn-{index}">', 1)[1].split("</table>", 1)[0]
        assert f"raw {stage['stage']} · 5 of 5 sessions completed" in table
        first = stage["conversations"]["by_turn"][0]
        cell = f"{first['mean_ttft_ms']:.1f} / {first['median_ttft_ms']:.1f} / {first['p99_ttft_ms']:.1f}"
        assert f"<tr><td>1</td><td>{first['completed']}</td><td>0</td>" in table and cell in table
        assert table.count("<tr><td>") == 3  # turn indices 1 to 3


def test_a_run_without_sessions_has_no_multi_turn_block(tmp_path):
    from test_report import make_run

    page = render_html(make_run(tmp_path, "complete"))
    assert "latency-stages" in page and 'id="multi-turn"' not in page
