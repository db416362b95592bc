"""Multi-turn flags that do not fit, and files it cannot send: each refused by ``servinglab bench`` in one line
naming the flag or the file (with the conversation's index and key), exit code 2, before anything is sent.

(Malformed ShareGPT files as such are tests/test_datasets.py's.)"""

from __future__ import annotations

import json

import pytest

from servinglab.cli import main

GOOD = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
# Where nothing listens: a command that got as far as the network would fail there with exit code 1, not 2.
NOWHERE = "http://127.0.0.1:9"

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
    ("a bad file", [*MULTI, "--dataset-path", "{bad}"], "{bad}: item 0: conversations[0].from: expected a string"),
    ("only answers in the file", [*MULTI, "--dataset-path", "{answers}"], "{answers}: no conversation has a human turn"),
    ("random prompts without a length", ["--num-prompts", "2"], "--random-input-len: required with the random dataset"),
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
