"""Multi-turn sessions from a ShareGPT file, against the stand-in endpoint's echo mode: each turn carries the
answers the server really returned, in order; turns wait for the answer and the think time; sessions are
counted by the concurrency cap or arrive at a rate; one record per turn; the bench JSON's section."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from streaming_endpoint import StreamingEndpoint

from servinglab import records
from servinglab.cli import main
from servinglab.config import ConversationWorkload
from servinglab.measure.conversation import bench_conversations, plan_sessions, think_time_ms
from servinglab.measure.schedule import arrival_offsets_s

# What the file says the assistant answered: never to be sent, the server's own answers are.
FILE_ANSWER = "the file's answer, which no turn may carry"


@pytest.fixture(scope="module")
def endpoint():
    with StreamingEndpoint() as running:
        yield running


def sharegpt(path, turns_per_conversation, tag="", first_word="echo"):
    """A ShareGPT file of conversations with the given numbers of human turns, each followed by a gpt turn."""
    data = [{"id": f"c{c}", "conversations": [
        turn for t in range(n) for turn in ({"from": "human", "value": f"{first_word} {tag}c{c} turn {t} words here"},
                                            {"from": "gpt", "value": FILE_ANSWER})]}
        for c, n in enumerate(turns_per_conversation)]  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def by_session(rows):
    sessions = defaultdict(list)
    for row in rows:
        sessions[row["session"]].append(row)
    return {s: sorted(rows, key=lambda r: r["turn"]) for s, rows in sessions.items()}


def seen_for(endpoint, tag):
    """What the endpoint received for this test's conversations: per conversation, (messages, answer) by turn."""
    mine = [(m, a) for m, a in endpoint.conversations if f" {tag}c" in m[0]["content"]]
    grouped = defaultdict(list)
    for messages, answer in mine:
        grouped[messages[0]["content"]].append((messages, answer))
    return {first: sorted(pairs, key=lambda p: len(p[0])) for first, pairs in grouped.items()}


def test_every_turn_carries_the_servers_own_answers_verbatim_and_in_order(endpoint, tmp_path):
    path = sharegpt(tmp_path / "sg.json", [3, 2, 4], tag="order-")
    out = tmp_path / "turns.jsonl"
    result = bench_conversations(endpoint.url, "m", str(path), ConversationWorkload(), 5, max_concurrency=2,
                                 records_path=out)  # fmt: skip
    file_turns = {c: [f"echo order-c{c} turn {t} words here" for t in range(n)] for c, n in enumerate([3, 2, 4])}
    seen = seen_for(endpoint, "order-")
    assert len(seen) == 3 and sum(len(p) for p in seen.values()) == 9
    for pairs in seen.values():
        conversation = int(pairs[0][0][0]["content"].split()[1].removeprefix("order-c"))
        assert len(pairs) == len(file_turns[conversation])
        for k, (messages, _) in enumerate(pairs):
            # The k-th turn: the file's first k+1 human turns, between them the server's answers to the earlier turns.
            assert [m["role"] for m in messages] == ["user", "assistant"] * k + ["user"]
            assert [m["content"] for m in messages[0::2]] == file_turns[conversation][: k + 1]
            assert [m["content"] for m in messages[1::2]] == [answer for _, answer in pairs[:k]]
            assert FILE_ANSWER not in json.dumps(messages)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(not records.CONVERSATION_TURNS.problems(r) for r in rows) and len(rows) == 9
    for turns in by_session(rows).values():
        assert [r["turn"] for r in turns] == list(range(turns[0]["turns_planned"]))
        assert [r["messages"] for r in turns] == [2 * k + 1 for k in range(len(turns))]
        assert all(r["ok"] and r["output_tokens"] == 5 and r["tpot_ms"] is not None for r in turns)
        # The server's prompt tokens (the stand-in counts words) grow with the history: never the client's guess.
        prompts = [r["prompt_tokens"] for r in turns]
        assert prompts == sorted(prompts) and len(set(prompts)) == len(prompts)
        sends = [r["sent_s"] for r in turns]
        assert sends == sorted(sends)
    section = result["conversations"]
    assert section["sessions"] == section["sessions_completed"] == 3
    assert section["turns_planned"] == section["turns_sent"] == section["turns_completed"] == 9 == result["completed"]
    assert [t["turn"] for t in section["by_turn"]] == [0, 1, 2, 3]
    assert [t["completed"] for t in section["by_turn"]] == [3, 3, 2, 1]


def test_a_turn_is_sent_after_the_previous_answer_and_its_think_time(endpoint, tmp_path):
    path = sharegpt(tmp_path / "sg.json", [3, 3], tag="think-")
    out = tmp_path / "turns.jsonl"
    workload = ConversationWorkload(turn_delay_mean_ms=120, turn_delay_ratio=0.5)  # 60 ms each
    bench_conversations(endpoint.url, "m", str(path), workload, 3, max_concurrency=2, records_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for turns in by_session(rows).values():
        assert [r["think_time_ms"] for r in turns] == [0.0, 60.0, 60.0]
        for before, after in zip(turns, turns[1:]):
            answered_s = before["sent_s"] + before["e2el_ms"] / 1000
            assert after["sent_s"] - answered_s >= 0.058  # a sleep may wake a hair early on the loop's clock


def test_think_times_are_drawn_as_aiperf_draws_turn_delays():
    rng = np.random.default_rng(1)
    assert think_time_ms(rng, 0, 50, 1) == 0.0  # no mean, no delay
    assert think_time_ms(rng, 99.6, 0, 2) == 200  # the mean rounded, times the ratio
    drawn = [think_time_ms(rng, 5, 20, 1) for _ in range(300)]
    assert min(drawn) >= 1 and all(d == int(d) for d in drawn)  # truncated at 0, rounded up, at least 1 ms
    workload = ConversationWorkload(num=5, turn_delay_mean_ms=100, turn_delay_stddev_ms=30)
    conversations = [[("user", f"q{i}"), ("assistant", "a"), ("user", "next")] for i in range(3)]
    again = plan_sessions(conversations, workload, seed=7)
    assert again == plan_sessions(conversations, workload, seed=7) != plan_sessions(conversations, workload, seed=8)
    # Five sessions from three conversations: each used, two of them again.
    assert len(again) == 5 and {s.conversation for s in again} == {0, 1, 2}
    capped = plan_sessions(conversations, ConversationWorkload(max_turns=1), seed=7)
    assert [s.user_turns for s in capped] == [(f"q{s.conversation}",) for s in capped]


def test_the_concurrency_cap_counts_sessions_and_a_rate_starts_them(endpoint, tmp_path):
    path = sharegpt(tmp_path / "sg.json", [3, 3, 3], tag="loop-")
    one = tmp_path / "one.jsonl"
    bench_conversations(endpoint.url, "m", str(path), ConversationWorkload(turn_delay_mean_ms=20), 3,
                        max_concurrency=1, records_path=one)  # fmt: skip
    spans = sorted((turns[0]["sent_s"], turns[-1]["sent_s"] + turns[-1]["e2el_ms"] / 1000)
                   for turns in by_session([json.loads(x) for x in one.read_text().splitlines()]).values())  # fmt: skip
    # One session in flight: a session holds its slot through its think times, the next starts after it.
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))
    paced = tmp_path / "paced.jsonl"
    result = bench_conversations(endpoint.url, "m", str(path), ConversationWorkload(), 3, request_rate=20, seed=3,
                                 records_path=paced)  # fmt: skip
    firsts = sorted(r["sent_s"] for r in map(json.loads, paced.read_text().splitlines()) if r["turn"] == 0)
    planned = arrival_offsets_s(3, 20, 1.0, 3)
    assert all(sent >= at - 0.001 for sent, at in zip(firsts, planned))
    assert result["conversations"]["session_rate"] == 20 and result["conversations"]["max_concurrency_sessions"] is None


def test_a_failed_turn_ends_its_session_and_is_recorded(endpoint, tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "echo fails-c0 first"}, {"from": "gpt", "value": FILE_ANSWER},
        {"from": "human", "value": "fail fails-c0 second"}, {"from": "gpt", "value": FILE_ANSWER},
        {"from": "human", "value": "echo fails-c0 never sent"}]}]))  # fmt: skip
    out = tmp_path / "turns.jsonl"
    result = bench_conversations(endpoint.url, "m", str(path), ConversationWorkload(), 3, records_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["turn"], r["ok"], r["error_kind"]) for r in rows] == [(0, True, None), (1, False, "http_500")]
    [session] = result["conversations"]["per_session"]
    assert session | {"duration_s": 0} == {"session": 0, "conversation": 0, "turns_planned": 3, "turns_sent": 2,
                                           "turns_completed": 1, "ended_by": "http_500", "duration_s": 0}  # fmt: skip
    assert result["conversations"]["sessions_completed"] == 0 and result["failed"] == 1
    assert not any("never sent" in json.dumps(m) for m, _ in endpoint.conversations)


def test_bench_multi_turn_writes_the_conversations_section(endpoint, tmp_path, capsys):
    path = sharegpt(tmp_path / "sg.json", [3, 3, 3, 3], tag="cli-")
    out, turns = tmp_path / "r.json", tmp_path / "turns.jsonl"
    code = main(["bench", "--base-url", endpoint.url, "--model", "m", "--dataset-name", "sharegpt", "--dataset-path",
                 str(path), "--multi-turn", "--conversation-num", "6", "--conversation-turn-delay-mean", "5",
                 "--output-len", "4", "--max-concurrency", "3", "--seed", "1", "--out", str(out), "--records", str(turns)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "sessions: 6 of 6 completed, 18 turns; TTFT median by turn:" in printed.out
    result = json.loads(out.read_text())
    section = result["conversations"]
    assert result["multi_turn"] and result["completed"] == 18 and result["max_concurrency"] == 3
    assert section["sessions"] == 6 and section["turns_completed"] == 18 and len(section["per_session"]) == 6
    assert section["turn_delay_mean_ms"] == 5 and section["median_session_duration_s"] > 0
    by_turn = section["by_turn"]
    assert [t["turn"] for t in by_turn] == [0, 1, 2] and all(t["completed"] == 6 for t in by_turn)
    assert {"mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_prompt_tokens"} <= set(by_turn[0])
    # The stand-in waits 20 ms per message before the first token: TTFT grows with the history (1, 3, 5 messages).
    assert by_turn[0]["median_ttft_ms"] < by_turn[2]["median_ttft_ms"]
    assert by_turn[0]["mean_prompt_tokens"] < by_turn[1]["mean_prompt_tokens"] < by_turn[2]["mean_prompt_tokens"]
    assert len(turns.read_text().splitlines()) == 18


def test_a_stopped_run_records_the_turn_in_flight_as_cancelled_and_keeps_the_rest(endpoint, tmp_path):
    """Stop the sessions while a slow second turn streams: the first turn's record is kept, the second is marked."""
    import asyncio
    import threading

    from servinglab.measure.conversation import make_plan, run_sessions_async
    from servinglab.measure.loadgen import StageSpec, Target

    conversations = [[("user", "echo stop-c0 first"), ("assistant", FILE_ANSWER), ("user", "slow stop-c0 second")]]
    plan = make_plan("c=1", plan_sessions(conversations, ConversationWorkload(), seed=0), 40, StageSpec(max_concurrency=1))
    rows, stop = [], threading.Event()

    def sink(record):
        rows.append(record)
        if record["turn"] == 0:
            threading.Timer(0.3, stop.set).start()  # the second turn takes 2 s (50 ms a token)

    outcome = asyncio.run(run_sessions_async(Target(f"{endpoint.url}/v1", "m"), plan, sink, stop))
    assert outcome.interrupted and [(r["turn"], r["ok"], r.get("error_kind")) for r in rows] == [
        (0, True, None), (1, False, "cancelled")]  # fmt: skip
    assert all(not records.CONVERSATION_TURNS.problems(r | {"layer": "bench", "stage": "c=1"}) for r in rows)
    assert outcome.sessions[0]["ended_by"] == "cancelled" and outcome.sessions[0]["turns_completed"] == 1
