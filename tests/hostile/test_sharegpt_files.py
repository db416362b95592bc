"""Hostile ShareGPT files and multi-turn flags: each refused in one line naming the file (with the conversation's
index and key) or the flag, and from ``servinglab bench`` with exit code 2 before anything is sent."""

from __future__ import annotations

import json

import pytest

from servinglab.cli import main
from servinglab.errors import ParamsError
from servinglab.measure import sharegpt
from servinglab.measure.sharegpt import read_conversations

GOOD = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
# Where nothing listens: a command that got as far as the network would fail there with exit code 1, not 2.
NOWHERE = "http://127.0.0.1:9"

FILES = [
    ("not JSON", b"[{\"conversations\": ", "not valid JSON"),
    ("not UTF-8", b"\xff\xfe[]", "not UTF-8"),
    ("an object", json.dumps(GOOD).encode(), "not a ShareGPT file (a JSON object, expected a list of conversations)"),
    ("empty", b"[]", "no conversations in it"),
    ("a number", b"[1]", "[0]: a JSON number, expected an object with conversations"),
    ("no conversations", json.dumps([GOOD, {"id": "x"}]).encode(), "[1].conversations: missing"),
    ("conversations a string", json.dumps([{"conversations": "hi"}]).encode(),
     "[0].conversations: a JSON string, expected a list"),
    ("a turn a string", json.dumps([GOOD, GOOD, {"conversations": ["hi"]}]).encode(),
     "[2].conversations[0]: a JSON string, expected an object with from and value"),
    ("no from", json.dumps([{"conversations": [{"value": "hi"}]}]).encode(), "[0].conversations[0].from: missing"),
    ("another role", json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]}]).encode(),
     "[0].conversations[1].from: 'system' is not human or gpt"),
    ("a number for text", json.dumps([{"conversations": [{"from": "human", "value": 3}]}]).encode(),
     "[0].conversations[0].value: a JSON number, expected a string"),
    ("no text", json.dumps([{"conversations": [{"from": "gpt"}]}]).encode(), "[0].conversations[0].value: missing"),
]  # fmt: skip


@pytest.mark.parametrize("content, expected", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_a_file_not_of_the_format_is_named_with_the_index_and_key(tmp_path, content, expected):
    path = tmp_path / "sg.json"
    path.write_bytes(content)
    with pytest.raises(ParamsError) as refused:
        read_conversations(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_a_missing_or_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match="nope.json: ShareGPT file not found"):
        read_conversations(tmp_path / "nope.json")
    path = tmp_path / "big.json"
    path.write_text(json.dumps([GOOD] * 10))
    monkeypatch.setattr(sharegpt, "MAX_FILE_BYTES", 100)
    with pytest.raises(ParamsError, match=r"big.json: \d+ bytes, more than the 100 a ShareGPT file may have"):
        read_conversations(path)


def test_roles_are_read_as_chat_roles_and_other_keys_ignored(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([GOOD | {"id": "abc", "lang": "en"}]))
    assert read_conversations(path) == [[("user", "hello"), ("assistant", "hi")]]


BENCH = ["bench", "--base-url", NOWHERE, "--model", "m", "--output-len", "4", "--seed", "0"]
MULTI = ["--dataset-name", "sharegpt", "--multi-turn"]

FLAGS = [
    ("a conversation flag alone", ["--input-len", "8", "--num-prompts", "2", "--conversation-num", "3"],
     "--conversation-num: only with --multi-turn"),
    ("multi-turn without a file", ["--multi-turn"], "--multi-turn: needs --dataset-name sharegpt --dataset-path FILE"),
    ("requests counted twice", [*MULTI, "--dataset-path", "{good}", "--num-prompts", "5"],
     "--num-prompts: not with --multi-turn"),
    ("several client processes", [*MULTI, "--dataset-path", "{good}", "--workers", "2"], "--workers: not with --multi-turn"),
    ("no sessions", [*MULTI, "--dataset-path", "{good}", "--conversation-num", "0"],
     "--conversation-num 0: input should be greater than or equal to 1"),
    ("a negative ratio", [*MULTI, "--dataset-path", "{good}", "--conversation-turn-delay-ratio", "-1"],
     "--conversation-turn-delay-ratio -1.0: input should be greater than or equal to 0"),
    ("an infinite think time", [*MULTI, "--dataset-path", "{good}", "--conversation-turn-delay-mean", "inf"],
     "--conversation-turn-delay-mean inf: input should be a finite number"),
    ("a bad file", [*MULTI, "--dataset-path", "{bad}"], "{bad}: [0].conversations[0].from: missing"),
    ("only answers in the file", [*MULTI, "--dataset-path", "{answers}"], "{answers}: no conversation has a human turn"),
    ("random prompts without a length", ["--num-prompts", "2"], "--input-len: required unless --multi-turn"),
]  # fmt: skip


@pytest.mark.parametrize("argv, expected", [c[1:] for c in FLAGS], ids=[c[0] for c in FLAGS])
def test_multi_turn_flags_that_do_not_fit_exit_2_before_anything_is_sent(tmp_path, capsys, argv, expected):
    files = {"good": [GOOD], "bad": [{"conversations": [{"value": "x"}]}],
             "answers": [{"conversations": [{"from": "gpt", "value": "x"}]}]}  # fmt: skip
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    argv = [a.format(**paths) for a in argv]
    code = main([*BENCH, *argv, "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"servinglab: {expected.format(**paths)}") and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
