"""Hostile values for the routing experiment (``workloads.routing``): each refused in one line naming the file
or ``--set`` item, the key and the problem, before anything starts; from the command line with exit code 2."""

from __future__ import annotations

import pytest
from conftest import run_cli
from study_cases import MINIMAL, Case

from servinglab.config import OVERRIDES_ENV, load_study
from servinglab.errors import ParamsError

ROUTING = MINIMAL + "workloads:\n  routing: {prefix_len: 256}\n"
CASES = [
    Case("prefix of no tokens", ROUTING, ["workloads.routing.prefix_len=0"],
         says=["workloads.routing.prefix_len", "greater than or equal to 1"]),
    Case("misspelt routing key", ROUTING, ["workloads.routing.prefix_lenn=64"],
         says=["workloads.routing.prefix_lenn: unknown key", "did you mean 'prefix_len'"]),
    Case("concurrency past the bound", ROUTING, ["workloads.routing.concurrency=1000000000"],
         says=["workloads.routing.concurrency", "less than or equal to 100000"]),
    Case("negative seed", ROUTING, ["workloads.routing.seed=-1"],
         says=["workloads.routing.seed", "greater than or equal to 0"]),
    Case("routing given as a list", MINIMAL + "workloads:\n  routing: [256]\n",
         says=["workloads.routing: Input should be a valid dictionary"]),
    Case("infinite prefix", MINIMAL + "workloads:\n  routing: {prefix_len: .inf}\n",
         says=["workloads.routing.prefix_len: inf is not a finite number"]),
]  # fmt: skip


@pytest.fixture()
def no_env_overrides(monkeypatch):
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_routing_values_are_refused_in_one_line(case, tmp_path, no_env_overrides):
    study, _ = case.write(tmp_path)
    with pytest.raises(ParamsError) as caught:
        load_study(study, case.sets)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    origin = f"--set {case.sets[-1]}" if case.sets else str(study)
    assert message.startswith(origin.partition("=")[0][:40]), message
    for fragment in case.says:
        assert fragment in message, message


def test_a_routing_study_is_read_and_an_empty_one_runs_no_experiment(tmp_path, no_env_overrides):
    path = tmp_path / "s.yaml"
    path.write_text(ROUTING)
    routing = load_study(path).workloads.routing
    assert routing is not None and (routing.prefix_len, routing.num_prefixes) == (256, 1)
    path.write_text(MINIMAL)
    assert load_study(path).workloads.routing is None


@pytest.mark.timeout(120)
def test_cli_check_refuses_with_exit_2_and_one_line(tmp_path):
    case = CASES[0]
    study, _ = case.write(tmp_path)
    done = run_cli("check", str(study), "--set", case.sets[0], extra_env={OVERRIDES_ENV: ""}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "workloads.routing.prefix_len: Input should be greater than or equal to 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
